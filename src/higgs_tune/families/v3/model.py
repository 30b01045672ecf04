"""The Higgs Audio v3 model for training: a transformers `Qwen3Model` plus ONE fused audio table.

Released model (`model_type: higgs_multimodal_qwen3`): a plain Qwen3 decoder. Audio enters
and leaves through one table `[K * 1026, H]` (K = 8 codebooks, 1024 codes + BOC + EOC):

- embedding: codebook k, code c -> row `k * 1026 + c`; the K rows of one delayed audio row are
  SUMMED into one input position (an audio slot);
- head: `linear(h, table)` reshaped `[.., K, 1026]` — the SAME tensor (tied), so training
  updates one weight through both paths and an export has one tensor to write.

`HiggsV3Model.audio_table` is that single `nn.Module`/parameter; there is no second copy to
drift (the community trainer's `modules_to_save` on both embedding and head split it in two).
The text head is not used for speech and not built.

The loss (`forward`) mirrors v2's `train/loss.py`: the backbone runs once, then the head is
applied ONLY at the positions whose next position carries a label (position t predicts t+1),
so no `[B, L, K, 1026]` logits are ever built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from higgs_tune.families.v3.layout import AUDIO_SLOT, CODEBOOK_VOCAB, IGNORE_INDEX, NUM_CODEBOOKS

ATTENTION_BACKENDS = ("sdpa", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# LoRA pathways of v3 (plain Qwen3 decoder layers; no DualFFN, no audio attention).
LORA_PATHWAYS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
AUDIO_TABLE_MODULE = "audio_table"


@dataclass
class V3ModelConfig:
    """What the model needs from a released `config.json` (see `checkpoint.read_v3_config`).

    `text_config` is a transformers `Qwen3Config` (rope_theta already patched); `raw` is the
    config.json as read, written back unchanged on export.
    """

    text_config: object  # transformers.Qwen3Config
    num_codebooks: int = NUM_CODEBOOKS
    codebook_vocab: int = CODEBOOK_VOCAB
    raw: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)


class FusedAudioTable(nn.Module):
    """One `[K * V, H]` weight used as the audio embedding (summed per row) and as the audio head."""

    def __init__(self, num_codebooks: int, codebook_vocab: int, hidden_size: int):
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebook_vocab = codebook_vocab
        self.weight = nn.Parameter(torch.empty(num_codebooks * codebook_vocab, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., K) codes in 0..V-1 -> (..., H): the sum of the K rows `k * V + code`."""
        offsets = torch.arange(self.num_codebooks, device=codes.device) * self.codebook_vocab
        return F.embedding(codes + offsets, self.weight).sum(-2)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K, V) logits with the same weight."""
        out = F.linear(hidden, self.weight)
        return out.view(*hidden.shape[:-1], self.num_codebooks, self.codebook_vocab)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed(codes)


@dataclass
class V3LossOutput:
    """The audio loss at the scored positions only. Shapes: K codebooks, M scored positions."""

    loss: torch.Tensor  # () mean over codebooks of the per-codebook mean CE
    per_codebook_loss: torch.Tensor  # (K,)
    ce_sum_per_codebook: torch.Tensor  # (K,) differentiable sums (for token-weighted steps)
    n_tokens_per_codebook: torch.Tensor  # (K,) long
    correct_per_codebook: torch.Tensor  # (K,) long
    rows: torch.Tensor  # (M,) batch row of each scored position
    positions: torch.Tensor  # (M,) position of the LABEL (the predictor is positions - 1)
    target: torch.Tensor  # (M, K) -100 where a codebook is not scored
    pred: torch.Tensor  # (M, K) argmax

    @property
    def accuracy(self) -> torch.Tensor:
        return self.correct_per_codebook.sum() / self.n_tokens_per_codebook.sum().clamp(min=1)


class HiggsV3Model(nn.Module):
    """`body` = transformers `Qwen3Model` (embed_tokens, layers, norm); `audio_table` = the fused table.

    Module names equal the released keys after the explicit map in `checkpoint.py`
    (`body.layers.N.*` stays `body.layers.N.*`).
    """

    def __init__(self, config: V3ModelConfig, *, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen3Model

        if attn_implementation not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {attn_implementation!r}")
        config.text_config._attn_implementation = attn_implementation
        self.config = config
        self.body = Qwen3Model(config.text_config)
        self.audio_table = FusedAudioTable(config.num_codebooks, config.codebook_vocab, config.hidden_size)

    # ------------------------------------------------------------------ plumbing
    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def codebook_vocab(self) -> int:
        return self.config.codebook_vocab

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward (non-reentrant)."""
        self.body.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def embed_inputs(self, input_ids: torch.Tensor, audio_codes: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) with AUDIO_SLOT at slots; audio_codes (B, L, K) -> (B, L, H).

        Text positions take the text embedding; slots take the sum of their K table rows only
        (the engines replace the placeholder embedding entirely; no text embedding is added).
        """
        slots = input_ids == AUDIO_SLOT
        embeds = self.body.embed_tokens(input_ids.masked_fill(slots, 0))
        if bool(slots.any()):
            embeds = embeds.clone()
            embeds[slots] = self.audio_table.embed(audio_codes[slots]).to(embeds.dtype)
        return embeds

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        audio_codes: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache=None,
        use_cache: bool = False,
    ):
        """The backbone's output (last_hidden_state (B, L, H), cache): a transformers `Cache` for generation."""
        return self.body(
            inputs_embeds=self.embed_inputs(input_ids, audio_codes),
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K, V) with the tied table."""
        return self.audio_table.logits(hidden)

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        input_ids: torch.Tensor,
        audio_codes: torch.Tensor,
        audio_labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> V3LossOutput:
        """input_ids / attention_mask (B, L); audio_codes / audio_labels (B, L, K) -> V3LossOutput.

        Position t is scored against the labels at t + 1, per batch row (never across rows),
        and only where at least one codebook of t + 1 is labelled: (M, H) states go through
        the head, (M, K, V) logits in float32.
        """
        hidden = self.hidden_states(input_ids, audio_codes, attention_mask).last_hidden_state  # (B, L, H)
        K, V = self.num_codebooks, self.codebook_vocab
        next_labels = audio_labels[:, 1:]  # (B, L-1, K)
        rows, pos = (next_labels != IGNORE_INDEX).any(-1).nonzero(as_tuple=True)
        target = next_labels[rows, pos]  # (M, K)
        logits = self.audio_logits(hidden[rows, pos]).float()  # (M, K, V)
        ce = F.cross_entropy(
            logits.reshape(-1, V), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(-1, K)
        scored = target != IGNORE_INDEX
        n = scored.sum(0)
        ce_sum = ce.sum(0)
        per_cb = ce_sum / n.clamp(min=1)
        has = (n > 0).to(per_cb.dtype)
        loss = (per_cb * has).sum() / has.sum().clamp(min=1)
        pred = logits.detach().argmax(-1)
        return V3LossOutput(
            loss=loss,
            per_codebook_loss=per_cb,
            ce_sum_per_codebook=ce_sum,
            n_tokens_per_codebook=n,
            correct_per_codebook=((pred == target) & scored).sum(0),
            rows=rows,
            positions=pos + 1,
            target=target,
            pred=pred,
        )


# ----------------------------------------------------------------------------- building
def build_v3_model(
    config: V3ModelConfig,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> HiggsV3Model:
    """A randomly initialised model in `dtype` ('float32' or 'bfloat16').

    Built directly in `dtype` (no float32 copy of a 4B model first); RoPE's inv_freq is computed
    in float32 by transformers either way.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        model = HiggsV3Model(config, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def lora_target_names(model: HiggsV3Model, pathways=("attention", "mlp")) -> list[str]:
    """Full names of the nn.Linear modules of the chosen pathways (explicit, for peft's target_modules)."""
    suffixes = tuple(s for p in pathways for s in LORA_PATHWAYS[p])
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def apply_v3_lora(
    model: HiggsV3Model,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    pathways=("attention", "mlp"),
    train_audio_table: bool = True,
):
    """LoRA on the decoder's q/k/v/o/gate/up/down; the fused audio table trainable as ONE tensor.

    The table is NOT put in peft's `modules_to_save` (that would make a wrapped copy: one for
    the input path only or, with two entries, two drifting copies); it simply keeps
    `requires_grad=True`, and the same parameter serves embedding and head. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_names(model, pathways), bias="none"
    )
    peft_model = get_peft_model(model, config)
    model.audio_table.weight.requires_grad_(train_audio_table)
    return peft_model


AUDIO_TABLE_FILE = "audio_table.safetensors"


def v3_table_weight(peft_model, state_dict=None) -> torch.Tensor:
    """The trained audio table of a LoRA model: from `state_dict` (the full state dict of a sharded
    model, keyed as `peft_model.state_dict()`) when given, else the live parameter."""
    if state_dict is None:
        return peft_model.get_base_model().audio_table.weight
    key = next((k for k in state_dict if k.endswith(f"{AUDIO_TABLE_MODULE}.weight")), None)
    if key is None:
        raise KeyError(f"the state dict holds no {AUDIO_TABLE_MODULE}.weight (keys: {sorted(state_dict)[:4]} ...)")
    return state_dict[key]


def save_v3_adapter(peft_model, out_dir, state_dict=None) -> None:
    """A LoRA checkpoint: peft's adapter folder (`adapter_model.safetensors` + `adapter_config.json`,
    loadable by plain `PeftModel.from_pretrained`) + `audio_table.safetensors` with the ONE trained
    table (`audio_table.weight`), which peft does not save because it is not a modules_to_save copy.
    `state_dict`: the full state dict of a sharded (FSDP) model, saved instead of the live tensors."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    peft_model.save_pretrained(str(out), **({} if state_dict is None else {"state_dict": state_dict}))
    if peft_model.get_base_model().audio_table.weight.requires_grad:
        table = v3_table_weight(peft_model, state_dict)
        save_file({f"{AUDIO_TABLE_MODULE}.weight": table.detach().contiguous()}, str(out / AUDIO_TABLE_FILE))


def load_v3_adapter(base_model: HiggsV3Model, in_dir, *, is_trainable: bool = False):
    """Inverse of `save_v3_adapter`: LoRA weights via peft, then the trained table (if saved) in place."""
    from pathlib import Path

    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(in_dir)
    peft_model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)
    table_file = folder / AUDIO_TABLE_FILE
    if table_file.exists():
        tensors = load_file(str(table_file))
        unexpected = sorted(set(tensors) - {f"{AUDIO_TABLE_MODULE}.weight"})
        if unexpected:
            raise ValueError(f"{table_file}: unexpected tensors {unexpected}")
        with torch.no_grad():
            base_model.audio_table.weight.copy_(tensors[f"{AUDIO_TABLE_MODULE}.weight"])
        base_model.audio_table.weight.requires_grad_(is_trainable)
    return peft_model

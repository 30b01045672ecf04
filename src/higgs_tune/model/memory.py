"""How much accelerator memory a training step needs, per component, before anything is built.

    est = estimate_memory(MemoryPlan(arch=HIGGS_V2, mode="lora", seq_len=2048, gradient_checkpointing=True))
    print(est.format())                          # one line per component, GiB
    plan = plan_from_config(cfg, seq_len=2048)   # the same from a higgs-tune Config (no torch model built)

Components (bytes):

- weights: every parameter in its dtype. LoRA adapter weights are float32 whatever the base dtype
  (peft's `autocast_adapter_dtype=True` default); a module trained in LoRA mode
  (`finetune.train_modules`, PEFT `modules_to_save`) exists twice (frozen original + trained copy).
- autocast_weights: with float32 weights and `train.mixed_precision: bf16`, autocast casts every
  `nn.Linear` weight to bf16 and the copies live until the backward has used them: 2 bytes per
  linear parameter during forward + backward (measured: the bf16 weight copies are saved tensors).
- grads: one per trainable parameter, in its dtype.
- optimizer: AdamW keeps exp_avg + exp_avg_sq per trainable parameter (torch: in the parameter's
  dtype; "adamw_fp32_states": float32; "adamw_8bit": torchao's AdamW8bit, 1 byte + a float32 scale
  per 256 elements, float32 below 4096 elements; "adamw_bf16_sr": torchao _AdamW, parameter dtype)
  + one float32 `step` per parameter tensor.
- optimizer_step_temp: torch's foreach AdamW (the default on CUDA) makes one temporary the size of
  the states (sqrt of exp_avg_sq) during `step()`; fused AdamW and torchao make none.
- activations: the tensors autograd saves for the backward, per decoder layer and token, listed
  term by term in `layer_activation_terms` from the real `HiggsAudioV2DecoderLayer` code path
  (DualFFN: each position goes through ONE of the two FFNs of the same size, so the per-token
  figure does not depend on the audio share). With gradient checkpointing a layer keeps only its
  input (hidden x dtype) and one layer is recomputed at a time during the backward.
- loss_heads: the loss module applies the heads only at labelled rows (train/loss.py): M audio
  rows x (8 x 1026) and P text rows x 128256 logits, their float32 copy and the log-softmax the
  cross-entropy saves. `text_head_all_positions` shows what computing the 128k text head at every
  position would cost instead.

Peak = weights + autocast_weights + optimizer + max(activations + loss_heads, grads + step temp)
(+ grads during the forward for LoRA, which are tiny): activations are freed layer by layer while the
gradients fill, so the two are never both whole. This is a model: `benchmarks/memory_table.py`
prints the table; tests/test_model_memory.py checks the parameter, gradient and optimizer terms
byte for byte against real models and the activation terms against the tensors autograd saves.
Nothing here builds a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "adamw_fp32_states", "adamw_8bit", "adamw_bf16_sr")
PATHWAYS = ("text_attn", "text_mlp", "audio_mlp", "audio_attn")
TRAIN_MODULES = ("audio_lm_head", "audio_embeddings", "text_lm_head", "text_embeddings", "audio_attn")
# torchao AdamW8bit: block-wise scales, tensors smaller than this keep float32 states
_8BIT_BLOCK = 256
_8BIT_MIN_SIZE = 4096
_8BIT_QMAP_BYTES = 256 * 4


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide memory. `dual_ffn`: v2's second FFN + norms for audio positions."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_codebooks: int = 8
    codebook_size: int = 1026  # 1024 codes + stream BOS + EOS
    dual_ffn: bool = True
    qk_norm: bool = False  # Qwen3 (v3): RMSNorm on q and k per head
    audio_head_tied: bool = False  # v3: the audio head is the fused audio table
    text_head_tied: bool = False  # v3: a text head would be the text embedding

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config, name: str = "model") -> Architecture:
        """From a `HiggsAudioV2Config` (or anything with the same attribute names)."""
        return cls(
            name=name,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
        )


# Released Higgs Audio v2 3B (Llama-3.2-3B backbone + DualFFN), see shared HIGGS_FACTS.md.
HIGGS_V2 = Architecture("higgs-audio-v2 (3B + DualFFN)", 3072, 28, 24, 8, 128, 8192, 128256)
# Higgs TTS 3 4B: plain Qwen3 decoder, fused tied audio table 8 x 1026 (HIGGS_V3_FACTS.md; shapes
# from third-party header dumps, not yet read from config.json).
HIGGS_V3 = Architecture(
    "higgs-tts-3 (Qwen3 4B)",
    2560,
    36,
    32,
    8,
    128,
    9728,
    151936,
    dual_ffn=False,
    qk_norm=True,
    audio_head_tied=True,
    text_head_tied=True,
)


# ----------------------------------------------------------------------------- parameters
def _attn_params(a: Architecture) -> int:
    d = a.hidden_size
    return d * a.q_dim + 2 * d * a.kv_dim + a.q_dim * d + (2 * a.head_dim if a.qk_norm else 0)


def _mlp_params(a: Architecture) -> int:
    return 3 * a.hidden_size * a.intermediate_size


def parameter_groups(a: Architecture, use_text_head: bool = True, audio_self_attention: bool = False) -> dict[str, int]:
    """Parameters per group, the groups of `model.lora.parameter_report` (text_attn, text_mlp,
    audio_mlp, audio_attn, norms, embeddings, heads)."""
    d, L = a.hidden_size, a.num_hidden_layers
    audio_table = a.num_codebooks * a.codebook_size * d
    norms_per_layer = 4 if a.dual_ffn else 2
    heads = 0 if a.audio_head_tied else audio_table
    if use_text_head and not a.text_head_tied:
        heads += a.vocab_size * d
    return {
        "text_attn": L * _attn_params(a),
        "text_mlp": L * _mlp_params(a),
        "audio_mlp": L * _mlp_params(a) if a.dual_ffn else 0,
        "audio_attn": L * (_attn_params(a) + d) if audio_self_attention else 0,
        "norms": (L * norms_per_layer + 1) * d,
        "embeddings": a.vocab_size * d + audio_table,
        "heads": heads,
    }


def _linear_shapes(a: Architecture, pathway: str) -> list[tuple[int, int]]:
    """(in, out) of the linears of one layer's pathway."""
    d, q, kv, i = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size
    if pathway in ("text_attn", "audio_attn"):
        return [(d, q), (d, kv), (d, kv), (q, d)]
    if pathway == "text_mlp" or (pathway == "audio_mlp" and a.dual_ffn):
        return [(d, i), (d, i), (i, d)]
    return []


def lora_parameters(a: Architecture, pathways, r: int) -> tuple[int, int]:
    """(LoRA parameters, LoRA tensors) for rank r on the pathways: r x (in + out) per linear."""
    n = tensors = 0
    for p in pathways:
        for fan_in, fan_out in _linear_shapes(a, p):
            n += a.num_hidden_layers * r * (fan_in + fan_out)
            tensors += a.num_hidden_layers * 2
    return n, tensors


def module_parameters(a: Architecture, name: str) -> tuple[int, int]:
    """(parameters, tensors) of a `finetune.train_modules` / `finetune.freeze` name."""
    d = a.hidden_size
    audio_table = a.num_codebooks * a.codebook_size * d
    if name == "audio_lm_head":
        return (0, 0) if a.audio_head_tied else (audio_table, 1)
    if name == "audio_embeddings":
        return audio_table, 1
    if name == "text_lm_head":
        return (0, 0) if a.text_head_tied else (a.vocab_size * d, 1)
    if name == "text_embeddings":
        return a.vocab_size * d, 1
    if name == "audio_attn":
        return a.num_hidden_layers * (_attn_params(a) + d), a.num_hidden_layers * 5
    if name in PATHWAYS:
        groups = parameter_groups(a, audio_self_attention=name == "audio_attn")
        return groups[name], a.num_hidden_layers * len(_linear_shapes(a, name))
    raise ValueError(f"unknown module {name!r}")


def parameter_tensors(a: Architecture, use_text_head: bool = True, audio_self_attention: bool = False) -> int:
    """How many parameter tensors the model has (AdamW keeps one `step` per tensor)."""
    L = a.num_hidden_layers
    per_layer = (
        4 + (2 if a.qk_norm else 0) + 3 + 2 + ((3 + 2) if a.dual_ffn else 0) + (5 if audio_self_attention else 0)
    )
    n = L * per_layer + 1 + 2  # final norm, text + audio embeddings
    n += 0 if a.audio_head_tied else 1
    n += 1 if use_text_head and not a.text_head_tied else 0
    return n


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """One training setting. seq_len x batch_size tokens per micro-batch, all real (no padding)."""

    arch: Architecture = HIGGS_V2
    mode: str = "lora"  # lora | full
    weight_dtype: str = "bfloat16"  # model.dtype
    autocast_bf16: bool = False  # train.mixed_precision bf16 on float32 weights (fp32 master weights)
    optimizer: str = "adamw"  # see OPTIMIZERS
    foreach_optimizer: bool = True  # torch AdamW's default on CUDA: one state-sized temporary in step()
    pathways: tuple[str, ...] = ("text_attn", "text_mlp", "audio_mlp")
    train_modules: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    lora_r: int = 16
    lora_dropout: float = 0.0
    use_text_head: bool = True
    audio_self_attention: bool = False
    gradient_checkpointing: bool = False
    seq_len: int = 2048
    batch_size: int = 1
    audio_share: float = 0.8  # positions holding an audio column (TTS: a few dozen text tokens, then frames)
    audio_label_share: float = 0.55  # positions whose next label is audio (voice cloning: 2/3 of the audio is target)
    text_labels_per_sample: float = 3  # <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>
    padded: bool = False  # rows of different lengths in the batch: SDPA gets an explicit mask
    device: str = "cuda"  # dropout saves a bool mask on CUDA, a noise tensor of the input dtype on CPU

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


@dataclass
class MemoryEstimate:
    plan: MemoryPlan
    params: int
    trainable: int
    weights: int
    autocast_weights: int
    grads: int
    optimizer: int
    optimizer_step_temp: int
    activations: int  # saved for the backward, all layers + outside the layers, at the end of the forward
    activations_per_token_layer: int  # one decoder layer, one token, no checkpointing
    recompute: int  # one layer's activations rebuilt during the backward (checkpointing only)
    loss_heads_saved: int  # gathered rows + float32 log-softmax, kept for the backward
    loss_heads: int  # saved + the logits (and their float32 copy) live at the cross-entropy
    text_head_all_positions: int  # what the text head alone would hold computed at every position
    components: dict[str, int] = field(default_factory=dict)

    @property
    def static(self) -> int:
        return self.weights + self.optimizer

    @property
    def peak(self) -> int:
        during_backward = self.activations + self.recompute + self.loss_heads + self.autocast_weights
        small_grads = self.grads if self.plan.mode == "lora" else 0
        return self.static + small_grads + max(during_backward, self.grads + self.optimizer_step_temp)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("autocast bf16 weight copies", self.autocast_weights),
            ("gradients", self.grads),
            ("optimizer states", self.optimizer),
            ("optimizer step temporaries", self.optimizer_step_temp),
            ("activations (saved)", self.activations),
            ("checkpoint recompute (1 layer)", self.recompute),
            ("loss heads (labelled rows)", self.loss_heads),
            ("peak", self.peak),
        ]

    def format(self) -> str:
        p = self.plan
        head = (
            f"{p.arch.name}, {p.mode}, weights {p.weight_dtype}{' + bf16 autocast' if p.autocast_bf16 else ''}, "
            f"{p.optimizer}, seq {p.seq_len} x {p.batch_size}, "
            f"grad ckpt {'on' if p.gradient_checkpointing else 'off'}: "
            f"{self.trainable:,} of {self.params:,} parameters trained"
        )
        lines = [head] + [f"  {name:<32} {b / GIB:8.2f} GiB" for name, b in self.rows()]
        lines.append(f"  (text head at every position would hold {self.text_head_all_positions / GIB:.2f} GiB instead)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- activations
def layer_activation_terms(plan: MemoryPlan) -> list[tuple[str, float]]:
    """(what, bytes per token) saved by one decoder layer for the backward, no checkpointing.

    Follows HiggsAudioV2DecoderLayer.forward: norm(x[mask]) scattered back -> q/k/v -> RoPE -> SDPA
    (flash/efficient kernels save q, k, v, the output and a float32 logsumexp per head; GQA without
    repeating k/v) -> o_proj -> residual -> norm -> MLP (gate, silu, up, product) -> down.
    RMSNorm upcasts to float32 and saves that copy and the float32 rsqrt. Under autocast every
    linear casts its input to bf16 separately (q, k, v: three copies). LoRA: the base weight is
    frozen, so the base linear saves nothing of its input; lora_A saves its input (a float32 copy
    per module when the adapter dtype differs from the activations, else the shared tensor once),
    lora_B saves lora_A's output (r values); dropout saves its output + a mask per module.
    """
    a = plan.arch
    d, q, kv, i, h = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size, a.num_attention_heads
    w = DTYPE_BYTES[plan.weight_dtype]
    b = 2 if plan.autocast_bf16 else w  # matmul inputs/outputs
    res = w  # residual stream (float32 under autocast on float32 weights)
    lora = plan.mode == "lora"
    frozen_base = set(PATHWAYS) if lora else set(plan.freeze) & set(PATHWAYS)
    adapter_bytes = 4  # peft keeps adapters in float32 (autocast_adapter_dtype=True)
    p = set(plan.pathways) if lora else set()
    norms_trained = not lora
    t: list[tuple[str, float]] = []
    # --- input norm (on x[mask] and x[~mask]), then masked_scatter
    t.append(("input norm: float32 input + rsqrt", 4 * d + 4))
    if norms_trained:
        t.append(("input norm: normalised (for the norm weight grad)", res * d))
    # --- attention input: saved by q/k/v when their base weights train
    if "text_attn" not in frozen_base:
        t.append(("q/k/v input", (3 if plan.autocast_bf16 else 1) * b * d))
    if a.qk_norm:
        t.append(("q/k norm: float32 inputs + rsqrt", 4 * (q + kv) + 4 * (h + a.num_key_value_heads)))
        if norms_trained:
            t.append(("q/k norm: normalised", res * (q + kv)))
    t.append(("RoPE q + attention output", 2 * b * q))
    t.append(("RoPE k + v", 2 * b * kv))
    if plan.padded:
        # a padded batch hands SDPA a (B, 1, S, S) mask: each layer saves it as an additive bias,
        # and transformers repeats k/v to all heads (SDPA's GQA path takes no mask)
        t.append(("attention mask as additive bias (padded batch)", plan.seq_len * b))
        t.append(("k/v repeated to all heads (padded batch)", 2 * b * (q - kv)))
    t.append(("attention logsumexp (float32 per head)", 4 * h))
    # o_proj's input is the attention output already counted (SDPA returns it in (B, S, H, D) layout)
    # --- post-attention norm + MLP (one of the two FFNs per position)
    t.append(("post-attention norm: float32 input + rsqrt", 4 * d + 4))
    if norms_trained:
        t.append(("post-attention norm: normalised", res * d))
    mlp_frozen = lora or {"text_mlp", "audio_mlp"} & set(plan.freeze) == (
        {"text_mlp", "audio_mlp"} if a.dual_ffn else {"text_mlp"}
    )
    if not mlp_frozen:
        t.append(("gate/up input", (2 if plan.autocast_bf16 else 1) * b * d))
    t.append(("gate output, silu output, up output", 3 * b * i))
    if not mlp_frozen:
        t.append(("down input (gate x up)", b * i))
    if a.dual_ffn:
        t.append(("DualFFN position masks (bool)", 4))
    # --- LoRA
    if lora:
        inputs = []  # (what, width, shared input already saved?)
        if "text_attn" in p:
            inputs += [("q/k/v", d, 3, False), ("o", q, 1, True)]
        if "text_mlp" in p or "audio_mlp" in p:
            inputs += [("gate/up", d, 2, False), ("down", i, 1, False)]
        for what, width, modules, already in inputs:
            if plan.lora_dropout > 0:
                mask = 1 if plan.device == "cuda" else adapter_bytes
                t.append((f"LoRA {what}: dropout output + mask", modules * width * (adapter_bytes + mask)))
            elif adapter_bytes != b:
                t.append((f"LoRA {what}: float32 input copies", modules * width * adapter_bytes))
            elif not already:
                t.append((f"LoRA {what}: input", width * b))
        n_lora_mod = (4 if "text_attn" in p else 0) + (3 if ("text_mlp" in p or "audio_mlp" in p) else 0)
        t.append(("LoRA A outputs (rank r)", n_lora_mod * plan.lora_r * adapter_bytes))
    return t


def _trains(plan: MemoryPlan, module: str) -> bool:
    if plan.mode == "full":
        return module not in plan.freeze
    return module in plan.train_modules


def _outside_layers_per_token(plan: MemoryPlan) -> float:
    """Saved outside the decoder layers, per token: the final norm (float32 input + rsqrt, and its
    normalised output when the norm trains), RoPE cos/sin; when the embeddings train, their int64
    ids (embedding backward) and the bool masks that scatter audio embeddings into the sequence."""
    a, w = plan.arch, DTYPE_BYTES[plan.weight_dtype]
    out = (
        4 * a.hidden_size + 4 + 2 * a.head_dim * w / plan.batch_size
    )  # cos/sin: one row per position, shared by the batch
    if plan.mode == "full":
        out += w * a.hidden_size
    if _trains(plan, "text_embeddings") or _trains(plan, "audio_embeddings"):
        out += 8 + 2 + plan.audio_share * (8 * a.num_codebooks + 1)
    elif not plan.gradient_checkpointing:
        # frozen embeddings: layer 0's input needs no gradient, so its input norm saves nothing
        # (with checkpointing, peft's enable_input_require_grads makes it require one)
        out -= 4 * a.hidden_size + 4
    return out


def loss_rows(plan: MemoryPlan) -> tuple[int, int]:
    """(M audio rows, P text rows) the loss module scores in one micro-batch."""
    m = int(plan.audio_label_share * plan.tokens)
    pt = round(plan.text_labels_per_sample * plan.batch_size) if plan.use_text_head else 0
    return m, pt


def _loss_head_bytes(plan: MemoryPlan) -> tuple[int, int, int]:
    """(saved for the backward, transient at the cross-entropy, text head at every position instead).

    Saved: the gathered hidden rows (activation dtype) and the float32 log-softmax the CE keeps,
    per audio row K x C values, per text row V. Transient: the logits in the activation dtype and,
    when that is not float32, their float32 copy (`.float()` before the CE).
    """
    a = plan.arch
    b = 2 if plan.autocast_bf16 else DTYPE_BYTES[plan.weight_dtype]
    kc = a.num_codebooks * a.codebook_size
    m, pt = loss_rows(plan)
    # the gathered rows are saved only when the head trains (a frozen head saves its weight instead)
    audio_rows = a.hidden_size * b if _trains(plan, "audio_lm_head") else 0
    text_rows = a.hidden_size * b if _trains(plan, "text_lm_head") else 0
    saved = m * (audio_rows + 4 * kc) + pt * (text_rows + 4 * a.vocab_size)
    logits = b + (4 if b != 4 else 0)
    transient = m * kc * logits + pt * a.vocab_size * logits
    all_positions = plan.tokens * a.vocab_size * (4 + logits) if plan.use_text_head else 0
    return saved, transient, all_positions


# ----------------------------------------------------------------------------- the estimate
def _optimizer_bytes(plan: MemoryPlan, sizes: list[tuple[int, int]]) -> int:
    """sizes: (numel, bytes per element) of each trainable tensor."""
    total = 0
    for n, elem in sizes:
        if plan.optimizer == "adamw_fp32_states":
            total += 2 * n * 4
        elif plan.optimizer == "adamw_8bit" and n >= _8BIT_MIN_SIZE:
            total += 2 * (n + 4 * math.ceil(n / _8BIT_BLOCK) + _8BIT_QMAP_BYTES)
        elif plan.optimizer == "adamw_8bit":
            total += 2 * n * 4
        else:  # adamw, adamw_bf16_sr: states in the parameter's dtype
            total += 2 * n * elem
        total += 4  # step
    return total


def trainable_tensors(plan: MemoryPlan) -> tuple[list[tuple[int, int]], int, int, int]:
    """(trainable (numel, elem bytes) list, total parameters, weight bytes, linear parameters)."""
    a = plan.arch
    w = DTYPE_BYTES[plan.weight_dtype]
    groups = parameter_groups(a, plan.use_text_head, plan.audio_self_attention)
    total = sum(groups.values())
    weight_bytes = total * w
    linear = (
        groups["text_attn"]
        + groups["text_mlp"]
        + groups["audio_mlp"]
        + groups["audio_attn"]
        + (0 if a.audio_head_tied else a.num_codebooks * a.codebook_size * a.hidden_size)
    )
    if plan.use_text_head and not a.text_head_tied:
        linear += a.vocab_size * a.hidden_size
    sizes: list[tuple[int, int]] = []
    if plan.mode == "lora":
        n, tensors = lora_parameters(a, plan.pathways, plan.lora_r)
        # every LoRA tensor of a pathway, as separate (numel, 4) entries: A and B per linear
        for p in plan.pathways:
            for fan_in, fan_out in _linear_shapes(a, p):
                sizes += [(plan.lora_r * fan_in, 4), (plan.lora_r * fan_out, 4)] * a.num_hidden_layers
        total += n
        weight_bytes += n * 4
        for m in plan.train_modules:
            mn, mt = module_parameters(a, m)
            total += mn  # modules_to_save: a trained copy beside the frozen original
            weight_bytes += mn * w
            sizes += _module_tensor_sizes(a, m, w)
    else:
        frozen = set(plan.freeze)
        sizes = [s for name in _all_tensor_names(a, plan) if _owner(name) not in frozen for s in [(_numel(a, name), w)]]
    return sizes, total, weight_bytes, linear


def _module_tensor_sizes(a: Architecture, name: str, w: int) -> list[tuple[int, int]]:
    if name == "audio_attn":
        per_layer = [
            (a.hidden_size * a.q_dim, w),
            (a.hidden_size * a.kv_dim, w),
            (a.hidden_size * a.kv_dim, w),
            (a.q_dim * a.hidden_size, w),
            (a.hidden_size, w),
        ]
        return per_layer * a.num_hidden_layers
    n, _ = module_parameters(a, name)
    return [(n, w)] if n else []


# Full mode: every parameter tensor with the freeze name it belongs to.
def _all_tensor_names(a: Architecture, plan: MemoryPlan) -> list[str]:
    names = ["text_embeddings", "audio_embeddings", "norms"]
    if not a.audio_head_tied:
        names.append("audio_lm_head")
    if plan.use_text_head and not a.text_head_tied:
        names.append("text_lm_head")
    layer = [
        "text_attn:q",
        "text_attn:k",
        "text_attn:v",
        "text_attn:o",
        "text_mlp:gate",
        "text_mlp:up",
        "text_mlp:down",
        "norms",
        "norms",
    ]
    if a.qk_norm:
        layer += ["norms:qk", "norms:qk"]
    if a.dual_ffn:
        layer += ["audio_mlp:gate", "audio_mlp:up", "audio_mlp:down", "norms", "norms"]
    if plan.audio_self_attention:
        layer += ["audio_attn:q", "audio_attn:k", "audio_attn:v", "audio_attn:o", "audio_attn:norm"]
    return names + layer * a.num_hidden_layers


def _owner(name: str) -> str:
    return name.split(":")[0]


def _numel(a: Architecture, name: str) -> int:
    d, q, kv, i = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size
    table = {
        "text_embeddings": a.vocab_size * d,
        "audio_embeddings": a.num_codebooks * a.codebook_size * d,
        "audio_lm_head": a.num_codebooks * a.codebook_size * d,
        "text_lm_head": a.vocab_size * d,
        "norms": d,
        "norms:qk": a.head_dim,
    }
    if name in table:
        return table[name]
    _, part = name.split(":")
    return {"q": d * q, "k": d * kv, "v": d * kv, "o": q * d, "gate": d * i, "up": d * i, "down": i * d, "norm": d}[
        part
    ]


def estimate_memory(plan: MemoryPlan) -> MemoryEstimate:
    """Predicted bytes per component of one training step at `plan` (see the module docstring)."""
    if plan.mode not in ("lora", "full"):
        raise ValueError(f"mode must be lora or full, got {plan.mode!r}")
    if plan.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {plan.optimizer!r}")
    sizes, total, weight_bytes, linear = trainable_tensors(plan)
    trainable = sum(n for n, _ in sizes)
    grads = sum(n * e for n, e in sizes)
    optimizer = _optimizer_bytes(plan, sizes)
    step_temp = 0
    if plan.foreach_optimizer and plan.optimizer in ("adamw", "adamw_fp32_states"):
        step_temp = optimizer // 2
    autocast = 2 * linear if plan.autocast_bf16 else 0
    per_layer = sum(v for _, v in layer_activation_terms(plan))
    outside = _outside_layers_per_token(plan) * plan.tokens
    res = DTYPE_BYTES[plan.weight_dtype]
    L = plan.arch.num_hidden_layers
    if plan.gradient_checkpointing:
        activations = L * plan.tokens * plan.arch.hidden_size * res + outside
        recompute = per_layer * plan.tokens
    else:
        activations = L * plan.tokens * per_layer + outside
        recompute = 0
    heads_saved, heads_transient, all_positions = _loss_head_bytes(plan)
    return MemoryEstimate(
        plan=plan,
        params=total,
        trainable=trainable,
        weights=weight_bytes,
        autocast_weights=autocast,
        grads=grads,
        optimizer=optimizer,
        optimizer_step_temp=step_temp,
        activations=int(activations),
        activations_per_token_layer=int(per_layer),
        recompute=int(recompute),
        loss_heads_saved=heads_saved,
        loss_heads=heads_saved + heads_transient,
        text_head_all_positions=all_positions,
    )


def architecture_of(name_or_path: str) -> Architecture:
    """The shapes in a local checkpoint's config.json; the released v2 shapes for anything else
    (a Hub id is not downloaded for this)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(name_or_path).expanduser() / "config.json"
    if not path.is_file():
        return HIGGS_V2
    data = json.loads(path.read_text(encoding="utf-8"))
    defaults = {"num_codebooks": 8, "codebook_size": 1026, "head_dim": None}
    return Architecture.from_hf_config(SimpleNamespace(**{**defaults, **data}), name=str(name_or_path))


def plan_from_config(
    cfg, seq_len: int | None = None, arch: Architecture | None = None, batch_size: int | None = None
) -> MemoryPlan:
    """A MemoryPlan from a higgs-tune Config: its model/finetune/train settings, `seq_len`
    (default data.max_sequence_length) and batch_size (default: max_tokens_per_batch // seq_len).
    `arch`: default the shapes of model.name_or_path when it is a local folder, else the released v2.
    Approximations: bf16 weights with mixed_precision bf16 count as bf16 without autocast; LoRA on
    a subset of the DualFFN pathways counts every position as adapted."""
    m, f, t, d = cfg.model, cfg.finetune, cfg.train, cfg.data
    arch = arch or architecture_of(m.name_or_path)
    seq = seq_len or d.max_sequence_length
    autocast = m.dtype == "float32" and t.mixed_precision == "bf16"
    return MemoryPlan(
        arch=arch,
        mode=f.mode,
        weight_dtype=m.dtype,
        autocast_bf16=autocast,
        optimizer=getattr(t, "optimizer", "adamw"),
        pathways=tuple(f.pathways) if f.mode == "lora" else (),
        train_modules=tuple(f.train_modules),
        freeze=tuple(f.freeze),
        lora_r=f.lora_r,
        lora_dropout=f.lora_dropout if f.mode == "lora" else 0.0,
        use_text_head=m.use_text_head,
        audio_self_attention=m.audio_self_attention,
        gradient_checkpointing=m.gradient_checkpointing,
        seq_len=seq,
        batch_size=batch_size or max(1, min(d.max_batch_size, d.max_tokens_per_batch // seq)),
    )


def with_(plan: MemoryPlan, **changes) -> MemoryPlan:
    """`plan` with some fields changed (dataclasses.replace, for tables)."""
    return replace(plan, **changes)


# ----------------------------------------------------------------------------- measuring
class SavedTensorBytes:
    """Counts the bytes autograd saves for the backward inside the `with` block: each distinct
    storage once, the given parameters excluded (they are weights, not activations). Works on any
    device; the same quantity the `activations` and `loss_heads_saved` terms predict.

        with SavedTensorBytes(model.parameters()) as saved:
            loss = loss_module(**batch).loss
        saved.bytes, saved.shapes   # total, and [(bytes, shape, dtype)] per storage
    """

    def __init__(self, parameters=()):
        self._exclude = {p.untyped_storage().data_ptr() for p in parameters}
        self._seen: dict[int, tuple[int, tuple, object]] = {}
        self._hooks = None

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = (storage.nbytes(), tuple(t.shape), t.dtype)
        return t

    def __enter__(self) -> SavedTensorBytes:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(v[0] for v in self._seen.values())

    @property
    def shapes(self) -> list[tuple[int, tuple, object]]:
        return sorted(self._seen.values(), key=lambda v: -v[0])


def memory_report(cfg, seq_lens=None) -> str:
    """What `higgs-tune inspect --memory CONFIG` prints: the estimate of `cfg` at its longest
    sequence (and 1024/2048 when shorter), with and without gradient checkpointing."""
    longest = cfg.data.max_sequence_length
    seqs = seq_lens or sorted({s for s in (1024, 2048) if s < longest} | {longest})
    blocks = []
    for seq in seqs:
        plan = plan_from_config(cfg, seq_len=seq)
        blocks.append(estimate_memory(plan).format())
        other = replace(plan, gradient_checkpointing=not plan.gradient_checkpointing)
        blocks.append(
            f"  with gradient checkpointing {'on' if other.gradient_checkpointing else 'off'} instead: "
            f"peak {estimate_memory(other).peak / GIB:.2f} GiB"
        )
    blocks.append(
        "Predicted by higgs_tune.model.memory (checked against real tensors on CPU; no GPU measurement yet). "
        "Add ~1 GiB for the CUDA context and allocator slack."
    )
    return "\n".join(blocks)

"""Higgs Audio v3 behind the family interface (families/base.py): what the recipe, the data
pipeline, inference and the app call. The pieces are this folder's layout, model, checkpoint,
data and generate modules.

Trained weights (what a checkpoint-N/ or final/ folder holds):
    LoRA   adapter_config.json + adapter_model.safetensors (peft) + audio_table.safetensors (the
           ONE tied table, embedding = head) — `model.save_v3_adapter`
    full   v3_trained.safetensors: every parameter under the model's own names (body.*,
           audio_table.weight) + higgs_tune_family.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from higgs_tune.config import ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.families.base import FAMILY_MARKER, GeneratedCodes, GenerationError, HealthSpec, ModelFamily, Processor
from higgs_tune.families.v3.checkpoint import (
    MODEL_TYPE,
    codec_config,
    load_v3_checkpoint,
    load_v3_codec,
    load_v3_tokenizer,
    read_released,
    save_v3_checkpoint,
)
from higgs_tune.families.v3.data import (
    V3Collator,
    V3SampleLayout,
    check_v3_trainable,
    render_v3_batch_statistics,
    v3_batch_statistics,
)
from higgs_tune.families.v3.generate import V3Sampling, generate_v3, generation_prompt
from higgs_tune.families.v3.inspect import render_v3_dataset_sample
from higgs_tune.families.v3.layout import CODEBOOK_VOCAB, EOC, V3Tokens
from higgs_tune.families.v3.model import (
    AUDIO_TABLE_FILE,
    AUDIO_TABLE_MODULE,
    apply_v3_lora,
    load_v3_adapter,
    save_v3_adapter,
    v3_table_weight,
)
from higgs_tune.model.load import resolve_checkpoint
from higgs_tune.model.lora import parameter_report

logger = logging.getLogger(__name__)

FULL_WEIGHTS_FILE = "v3_trained.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# v2 pathway names (config.finetune.pathways) -> v3 LoRA pathways; v3 has no separate audio
# attention/MLP (its audio side is the fused table, trained whole in LoRA mode)
PATHWAY_MAP = {"text_attn": "attention", "text_mlp": "mlp"}


def _base(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _adapter_keys(folder: Path) -> list[str]:
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def check_v3_weights_folder(folder: Path) -> None:
    """A v2 adapter / v2 full weights on a v3 base: a clear error before peft sees them."""
    keys = _adapter_keys(folder)
    if keys and not any(".body.layers." in k for k in keys):
        raise ModelLoadError(
            f"the adapter in {folder} was not trained on a Higgs Audio v3 model (its tensors are named like "
            f"{keys[0]!r}, v3 adapters have 'base_model.model.body.layers.*'): it is a Higgs Audio v2 adapter. "
            "Load it onto the v2 base model it was trained from, or train a new adapter on this v3 model."
        )
    if not keys and not (folder / FULL_WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"{folder} holds no Higgs Audio v3 trained weights ({ADAPTER_WEIGHTS} or {FULL_WEIGHTS_FILE}); "
            "a v2 full fine-tune (config.json + model.safetensors) does not fit a v3 base. "
            "Pass a checkpoint-N/ or final/ folder of a v3 run."
        )


class V3Family(ModelFamily):
    name = "v3"
    model_types = (MODEL_TYPE,)
    scored_rows_model = True  # HiggsV3Model.forward gathers the labelled rows itself
    has_text_loss = False  # v3 is trained on its audio rows only

    # ------------------------------------------------------------------ load
    def load_processor(self, name_or_path, audio_tokenizer=None):
        if audio_tokenizer is not None:
            raise ModelLoadError(
                f"model.audio_tokenizer is {audio_tokenizer!r}, but a Higgs Audio v3 checkpoint bundles its codec "
                "(tied.embedding.modality_embeddings.0.model.*): leave model.audio_tokenizer unset."
            )
        folder = resolve_checkpoint(name_or_path)
        return Processor(tokenizer=load_v3_tokenizer(folder), audio_tokenizer=load_v3_codec(folder))

    def load_codec(self, name_or_path, device="cpu"):
        return load_v3_codec(resolve_checkpoint(name_or_path)).to(device)

    def special_tokens(self, processor, model=None):
        return V3Tokens.from_tokenizer(processor.tokenizer)

    def load_model(self, model_cfg, device=None):
        if model_cfg.dtype not in ("float32", "bfloat16"):
            raise ModelLoadError(f"model.dtype {model_cfg.dtype!r}: Higgs Audio v3 trains in float32 or bfloat16.")
        if model_cfg.attn_implementation not in ("sdpa", "eager"):
            raise ModelLoadError(
                f"model.attn_implementation {model_cfg.attn_implementation!r}: the v3 model supports sdpa or eager."
            )
        if model_cfg.audio_self_attention:
            raise ModelLoadError("model.audio_self_attention is a Higgs Audio v2 option; v3 has no such block.")
        model = load_v3_checkpoint(
            resolve_checkpoint(model_cfg.name_or_path),
            dtype=model_cfg.dtype,
            attn_implementation=model_cfg.attn_implementation,
            gradient_checkpointing=model_cfg.gradient_checkpointing,
        ).model
        return model.to(device) if device is not None else model

    def load_for_inference(self, model, folder, adapter_dir, *, dtype, audio_tokenizer, use_text_head):
        if audio_tokenizer is not None:
            self.load_processor(folder, audio_tokenizer)  # raises: v3 bundles its codec
        cfg = ModelConfig(name_or_path=str(folder), dtype=dtype, use_text_head=False)
        net = self.load_model(cfg)
        if adapter_dir is not None:
            net = self.load_trainable(net, adapter_dir)
        return net, []

    # ------------------------------------------------------------------ trainable weights
    def apply_finetuning(self, model, finetune_cfg):
        if finetune_cfg.mode == "full":
            for name, p in model.named_parameters():
                p.requires_grad_(not any(name.startswith(f) for f in finetune_cfg.freeze))
            if not any(p.requires_grad for p in model.parameters()):
                raise ModelLoadError("finetune.freeze leaves no parameter to train. Remove some entries.")
            return model
        if finetune_cfg.mode != "lora":
            raise ModelLoadError(f"finetune.mode {finetune_cfg.mode!r} is not lora or full.")
        pathways = sorted({PATHWAY_MAP[p] for p in finetune_cfg.pathways if p in PATHWAY_MAP})
        dropped = [p for p in finetune_cfg.pathways if p not in PATHWAY_MAP]
        if dropped:
            logger.info(
                "v3: pathways %s have no v3 counterpart (its audio side is the fused table, trained whole)",
                ", ".join(dropped),
            )
        if finetune_cfg.train_modules:
            logger.info(
                "v3: finetune.train_modules %s ignored: the fused audio table (embedding = head) trains whole",
                ", ".join(finetune_cfg.train_modules),
            )
        if not pathways:
            raise ModelLoadError(
                f"finetune.pathways {finetune_cfg.pathways}: none applies to Higgs Audio v3; "
                "use text_attn and/or text_mlp (LoRA on q/k/v/o and gate/up/down)."
            )
        return apply_v3_lora(
            model,
            r=finetune_cfg.lora_r,
            alpha=finetune_cfg.lora_alpha,
            dropout=finetune_cfg.lora_dropout,
            pathways=tuple(pathways),
        )

    def load_trainable(self, model, folder, is_trainable: bool = False):
        folder = Path(folder)
        check_v3_weights_folder(folder)
        if (folder / "adapter_config.json").is_file():
            return load_v3_adapter(model, folder, is_trainable=is_trainable)
        tensors = load_file(str(folder / FULL_WEIGHTS_FILE))
        expected = model.state_dict()
        wrong = sorted(set(tensors) ^ set(expected))
        if wrong:
            raise ModelLoadError(f"{folder / FULL_WEIGHTS_FILE} does not fit this v3 model: keys {wrong[:6]} differ.")
        with torch.no_grad():
            model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
        for p in model.parameters():
            p.requires_grad_(is_trainable)
        return model

    def save_trainable(self, model, folder, state_dict=None):
        """LoRA: peft's adapter + audio_table.safetensors; full: v3_trained.safetensors. `state_dict`:
        the model's full state dict when its parameters are sharded (FSDP, gathered by the caller on
        the main process): what is saved then comes from it, not from the sharded live tensors."""
        from peft import PeftModel

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(model, PeftModel):
            save_v3_adapter(model, out, state_dict)
        else:
            state = state_dict if state_dict is not None else model.state_dict()
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / FULL_WEIGHTS_FILE))
        (out / FAMILY_MARKER).write_text(json.dumps({"family": self.name}) + "\n", encoding="utf-8")
        return out

    def verify_trainable(self, model, folder, state_dict=None) -> None:
        """Read the saved weights back and compare them bit for bit with the model's (with
        `state_dict` when given: the gathered weights of a sharded model, as saved)."""
        from peft import PeftModel, get_peft_model_state_dict

        folder = Path(folder)
        if isinstance(model, PeftModel):
            saved = load_file(str(folder / ADAPTER_WEIGHTS))
            live = dict(get_peft_model_state_dict(model, state_dict=state_dict))
            if _base(model).audio_table.weight.requires_grad:
                saved_table = load_file(str(folder / AUDIO_TABLE_FILE))[f"{AUDIO_TABLE_MODULE}.weight"]
                saved["audio_table"] = saved_table
                live["audio_table"] = v3_table_weight(model, state_dict)
        else:
            saved = load_file(str(folder / FULL_WEIGHTS_FILE))
            live = state_dict if state_dict is not None else model.state_dict()
        bad = sorted(k for k in set(saved) | set(live) if k not in saved or k not in live)
        bad += sorted(k for k in set(saved) & set(live) if not torch.equal(saved[k].cpu(), live[k].detach().cpu()))
        if bad:
            raise ModelLoadError(f"{folder}: the saved weights differ from the model's in memory: {bad[:6]}.")

    def parameter_report(self, model, finetune_cfg):
        return parameter_report(model, finetune_cfg)

    # ------------------------------------------------------------------ layout
    def sample_layout(self, data_cfg):
        return V3SampleLayout(data_cfg.eoc_labels)

    def collator(self, tokens, processor=None):
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return V3Collator(int(pad))

    def first_batch_report(self, batches: list, tokens) -> tuple[dict, str]:
        stats = v3_batch_statistics(batches, tokens.num_codebooks)
        return stats, render_v3_batch_statistics(stats)

    def render_sample(self, dataset, sample_id: str, tokenizer, tokens) -> str:
        return render_v3_dataset_sample(dataset, sample_id, tokenizer, tokens)

    def check_first_batches(self, stats: dict) -> None:
        check_v3_trainable(stats)

    # ------------------------------------------------------------------ loss and health
    def health_spec(self, model_config, tokenizer=None) -> HealthSpec:
        return HealthSpec(
            codebook_size=int(getattr(model_config, "codebook_vocab", CODEBOOK_VOCAB)),
            num_codebooks=int(model_config.num_codebooks),
            text_vocab_size=int(model_config.text_config.vocab_size),
            stream_eos_id=EOC,
            has_text_loss=False,
        )

    # ------------------------------------------------------------------ generation
    def generate_codes(
        self, model, processor, tokens, request, options, name: str, *, synced: bool = False
    ) -> GeneratedCodes:
        if request.ref_text is not None and request.ref_codes is None:
            raise GenerationError(f"{name}: a reference transcript without reference audio; give both (or neither).")
        base = _base(model)
        context = int(base.config.text_config.max_position_embeddings)
        prompt = generation_prompt(
            processor.tokenizer, tokens, request.text, ref_codes=request.ref_codes, ref_text=request.ref_text
        )
        prompt_len = len(prompt["input_ids"])  # the prompt generate_v3 feeds, built the same way
        room_frames = context - prompt_len - (tokens.num_codebooks - 1)
        if room_frames < 1:
            raise GenerationError(
                f"{name}: the prompt is {prompt_len} tokens but the model's context is {context}; one frame of audio "
                f"needs {tokens.num_codebooks} more rows. Shorten the text or use a shorter reference clip."
            )
        max_frames = min(options.max_new_tokens, room_frames)
        greedy = options.temperature == 0
        sampling = V3Sampling(
            temperature=options.temperature,
            top_p=options.top_p if (options.top_p and not greedy) else 1.0,
            top_k=options.top_k if (options.top_k and not greedy) else 0,
            max_frames=max_frames,
            seed=None,  # the caller seeds the global RNG per request
        )
        gen = generate_v3(
            base,  # LoRA layers are injected in place: the base module runs with them
            processor.tokenizer,
            tokens,
            request.text,
            ref_codes=request.ref_codes,
            ref_text=request.ref_text,
            sampling=sampling,
            synced=synced,
        )
        return GeneratedCodes(
            codes=gen.codes.cpu(),
            stopped=gen.stopped,
            prompt_tokens=prompt_len,
            num_columns=int(gen.rows.shape[0]),
            max_new_tokens=max_frames,
        )

    # ------------------------------------------------------------------ export
    def write_merged(self, net, base_folder: Path, out: Path, processor) -> dict:
        """Merged weights in the RELEASED layout (config.json as the base's, model.safetensors with
        tied.*/body.* keys and the base's bundled codec, head copies as the base had them, the
        tokenizer, codec_config.json): what `load_v3_checkpoint`, SGLang-Omni and vLLM-Omni read."""
        base_folder = resolve_checkpoint(base_folder)
        _, parts = read_released(base_folder)
        save_v3_checkpoint(
            net,
            out,
            codec_state=parts.codec_state,
            head_copies=parts.head_copies,
            passthrough=parts.passthrough,
            tokenizer=processor.tokenizer,
            codec_config=codec_config(base_folder).to_dict(),
        )
        return {"layout": "higgs_multimodal_qwen3 released (tied.*, body.*)", "head_copies": list(parts.head_copies)}


V3 = V3Family()

"""What is trained: LoRA on chosen pathways (PEFT), fully trained modules, or full fine-tuning.

Pathways are resolved from the real module tree of the decoder layers (`model.layers.N...`),
never by bare suffix, so nothing outside the layers (heads, embeddings) is adapted by accident:

    text_attn   model.layers.N.self_attn.{q,k,v,o}_proj      shared attention (text and audio)
    text_mlp    model.layers.N.mlp.{gate,up,down}_proj         FFN of text positions
    audio_mlp   model.layers.N.audio_mlp.{gate,up,down}_proj   FFN of audio positions (DualFFN)
    audio_attn  model.layers.N.audio_attn.{q,k,v,o}_proj       the added audio self-attention

Fully trained modules (PEFT `modules_to_save`): audio_lm_head, audio_embeddings
(model.embed_audio_tokens), text_lm_head, text_embeddings (model.embed_tokens), audio_attn
(the block + its norm). The adapter folder is plain PEFT (`adapter_model.safetensors` +
`adapter_config.json`); the audio self-attention weights, which no base checkpoint has, are
saved beside it in `extra_weights.safetensors` whenever they are not already in the adapter.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from higgs_tune import config as cfg_names  # the pathway and module names
from higgs_tune.config import FinetuneConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.audio_attention import (
    AUDIO_ATTN,
    AUDIO_ATTN_KEY_PARTS,
    AUDIO_ATTN_NORM,
    enable_audio_self_attention,
    has_audio_self_attention,
)
from higgs_tune.model.load import checkpoint_keys, read_tensors

logger = logging.getLogger(__name__)

_LAYER = r"model\.layers\.\d+\."
# pathway -> the modules LoRA adapts; module -> what is trained in full (regex over module names)
PATHWAYS: dict[str, str] = {
    cfg_names.TEXT_ATTN: _LAYER + r"self_attn\.(q|k|v|o)_proj",
    cfg_names.TEXT_MLP: _LAYER + r"mlp\.(gate|up|down)_proj",
    cfg_names.AUDIO_MLP: _LAYER + r"audio_mlp\.(gate|up|down)_proj",
    cfg_names.AUDIO_ATTN: _LAYER + AUDIO_ATTN + r"\.(q|k|v|o)_proj",
}
TRAIN_MODULES: dict[str, str] = {
    cfg_names.AUDIO_LM_HEAD: r"audio_lm_head",
    cfg_names.AUDIO_EMBEDDINGS: r"model\.embed_audio_tokens\.embed_audio_tokens",
    cfg_names.TEXT_LM_HEAD: r"text_lm_head",
    cfg_names.TEXT_EMBEDDINGS: r"model\.embed_tokens",
    cfg_names.AUDIO_ATTN: _LAYER + f"({AUDIO_ATTN}|{AUDIO_ATTN_NORM})",
}
EXTRA_WEIGHTS = "extra_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_GROUPS = (*cfg_names.PATHWAYS, "norms", "embeddings", "heads", "other")
# PEFT name parts that are not part of the base model's own names
_PEFT_PREFIX = "base_model.model."
_PEFT_PARTS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+|lora_[A-Za-z_]+\.[^.]+)(?=\.)")


def _base(model) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def canonical_name(name: str) -> str:
    """A parameter/module name as the plain transformers model spells it (PEFT wrappers removed)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return _PEFT_PARTS.sub("", name + ".")[:-1]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def resolve_targets(model, pathways) -> dict[str, list[str]]:
    """Full module names per LoRA pathway, from the decoder layers' module tree (in tree order)."""
    base = _base(model)
    unknown = [p for p in pathways if p not in PATHWAYS]
    if unknown:
        raise ModelLoadError(f"unknown LoRA pathway(s) {unknown}; known: {', '.join(PATHWAYS)}.")
    names = [n for n, m in base.named_modules() if n.startswith("model.layers.") and _is_linear(m)]
    out: dict[str, list[str]] = {}
    for pathway in pathways:
        pattern = re.compile(PATHWAYS[pathway])
        found = [n for n in names if pattern.fullmatch(n)]
        if not found:
            hint = " Set model.audio_self_attention: true to add the block." if pathway == cfg_names.AUDIO_ATTN else ""
            raise ModelLoadError(
                f"LoRA pathway {pathway!r} (pattern {PATHWAYS[pathway]}) matches no module of this model.{hint}"
            )
        out[pathway] = found
    return out


def resolve_train_modules(model, modules) -> dict[str, list[str]]:
    """Full module names per fully trained module group."""
    base = _base(model)
    unknown = [m for m in modules if m not in TRAIN_MODULES]
    if unknown:
        raise ModelLoadError(f"unknown trainable module(s) {unknown}; known: {', '.join(TRAIN_MODULES)}.")
    names = [canonical_name(n) for n, _ in base.named_modules()]
    out: dict[str, list[str]] = {}
    for group in modules:
        pattern = re.compile(TRAIN_MODULES[group])
        found = list(dict.fromkeys(n for n in names if pattern.fullmatch(n)))
        if not found:
            hints = {
                cfg_names.TEXT_LM_HEAD: " Load the model with model.use_text_head: true.",
                cfg_names.AUDIO_ATTN: " Set model.audio_self_attention: true to add the block.",
            }
            raise ModelLoadError(
                f"module {group!r} (pattern {TRAIN_MODULES[group]}) is not in this model.{hints.get(group, '')}"
            )
        out[group] = found
    return out


def apply_finetuning(model, cfg: FinetuneConfig):
    """Mark what trains. lora: returns a peft.PeftModel; full: the same model, `cfg.freeze` frozen."""
    if isinstance(model, PeftModel):
        raise ModelLoadError(
            "apply_finetuning got a model that already has PEFT adapters; pass the plain transformers model."
        )
    if cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        frozen = _freeze(model, cfg.freeze)
        if not any(p.requires_grad for p in model.parameters()):
            raise ModelLoadError("finetune.freeze leaves no parameter to train. Remove some entries.")
        logger.info("full fine-tuning; frozen: %s", ", ".join(frozen) or "nothing")
        return model
    if cfg.mode != "lora":
        raise ModelLoadError(f"finetune.mode {cfg.mode!r} is not lora or full.")
    if not cfg.pathways:
        raise ModelLoadError(
            "finetune.pathways is empty: PEFT needs at least one LoRA pathway. To train only "
            f"{', '.join(cfg.train_modules) or 'whole modules'}, use mode: full with freeze for everything else."
        )
    if cfg_names.AUDIO_ATTN in cfg.pathways and cfg_names.AUDIO_ATTN in cfg.train_modules:
        raise ModelLoadError(
            "audio_attn is both a LoRA pathway and a fully trained module: list it in one of finetune.pathways / "
            "finetune.train_modules."
        )
    targets = resolve_targets(model, cfg.pathways)
    to_save = resolve_train_modules(model, cfg.train_modules)
    # With activation checkpointing on, get_peft_model calls model.enable_input_require_grads():
    # frozen embeddings then still hand the checkpointed layers an input that requires grad
    # (needed for use_reentrant=True; harmless with the use_reentrant=False the loader sets).
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        target_modules=[n for names in targets.values() for n in names],
        modules_to_save=[n for names in to_save.values() for n in names] or None,
    )
    peft_model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA r=%d alpha=%d on %d modules (%s)%s; trainable %s of %s parameters (%.2f%%)",
        cfg.lora_r,
        cfg.lora_alpha,
        sum(len(v) for v in targets.values()),
        ", ".join(targets),
        f", fully trained: {', '.join(to_save)}" if to_save else "",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / total,
    )
    return peft_model


def _freeze(model, names) -> list[str]:
    """Full mode: freeze the named pathways/modules; returns the module names frozen."""
    frozen = []
    for name in names:
        if name in PATHWAYS:
            modules = resolve_targets(model, [name])[name]
        else:
            modules = resolve_train_modules(model, [name])[name]
        for module_name in modules:
            model.get_submodule(module_name).requires_grad_(False)
        frozen.extend(modules)
    return frozen


# ----------------------------------------------------------------------------- save / load
def _audio_attention_extras(model, state_dict=None) -> dict[str, torch.Tensor]:
    """Audio self-attention weights not stored by PEFT's adapter, under canonical names.
    `state_dict`: the model's full state dict when its parameters are sharded (FSDP)."""
    if not isinstance(model, PeftModel):
        return {}
    to_save = model.peft_config[model.active_adapter].modules_to_save or []
    if any(AUDIO_ATTN in m for m in to_save):
        return {}  # the adapter holds the trained copies
    out = {}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if "lora_" in name or not any(part in name for part in AUDIO_ATTN_KEY_PARTS):
            continue
        out[canonical_name(name)] = tensor.detach().contiguous()
    return out


def save_trainable(model, out_dir: str | Path, state_dict=None) -> Path:
    """lora: PEFT adapter folder (+ extra_weights.safetensors for audio self-attention);
    full: `save_pretrained` safetensors of the whole model. `state_dict`: the model's full
    state dict, given when its parameters are sharded (FSDP; gathered by the caller)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {} if state_dict is None else {"state_dict": state_dict}
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out), **kw)
        extras = _audio_attention_extras(model, state_dict)
        if extras:
            save_file(
                extras,
                str(out / EXTRA_WEIGHTS),
                metadata={"format": "pt", "content": "higgs-tune audio self-attention"},
            )
    else:
        model.save_pretrained(str(out), **kw)
    return out


def load_trainable(base_model, in_dir: str | Path, is_trainable: bool = False):
    """Inverse of save_trainable on a freshly loaded base model (audio self-attention is added when
    the folder has its weights). Returns a PeftModel for an adapter folder, else the base model."""
    folder = Path(in_dir)
    if (folder / ADAPTER_CONFIG).is_file():
        adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        extras = load_file(str(folder / EXTRA_WEIGHTS)) if (folder / EXTRA_WEIGHTS).is_file() else {}
        mentions = json.dumps(adapter_cfg.get("target_modules")) + json.dumps(adapter_cfg.get("modules_to_save"))
        if (extras or AUDIO_ATTN in mentions) and not has_audio_self_attention(base_model):
            enable_audio_self_attention(base_model)
        if extras:
            _load_exact(base_model, extras, folder / EXTRA_WEIGHTS, only_audio_attention=True)
        return PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} holds neither {ADAPTER_CONFIG} (LoRA) nor config.json + weights (full); nothing to load."
        )
    keys = checkpoint_keys(folder)
    tensors = read_tensors(keys, keys)
    if any(any(p in k for p in AUDIO_ATTN_KEY_PARTS) for k in tensors) and not has_audio_self_attention(base_model):
        enable_audio_self_attention(base_model)
    _load_exact(base_model, tensors, folder, only_audio_attention=False)
    for p in base_model.parameters():
        p.requires_grad_(is_trainable)
    return base_model


def verify_trainable(model, folder: str | Path, state_dict=None) -> None:
    """Check that `save_trainable(model, folder)` wrote exactly the weights `model` holds now.

    Reads the saved safetensors back (no model is built, so this is cheap even at 3B) and
    compares every tensor bit for bit with the live weights: LoRA -> the adapter state dict
    PEFT would save (+ audio self-attention extras), full -> the whole state dict. Also parses
    adapter_config.json the way peft does. Raises ModelLoadError naming the first mismatch.
    `state_dict`: the model's full state dict when its parameters are sharded (FSDP), as saved.
    """
    folder = Path(folder)
    if isinstance(model, PeftModel):
        PeftConfig.from_pretrained(str(folder))  # the config peft will read
        expected = {k: v for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()}
        files = {k: folder / "adapter_model.safetensors" for k in expected}
        extras = _audio_attention_extras(model, state_dict)
        expected.update(extras)
        files.update({k: folder / EXTRA_WEIGHTS for k in extras})
    else:
        expected = dict(model.state_dict() if state_dict is None else state_dict)
        files = checkpoint_keys(folder)
        # save_pretrained drops tied/ignored keys; every key it wrote must match the model
        expected = {k: v for k, v in expected.items() if k in files}
        if not expected:
            raise ModelLoadError(f"{folder}: none of the saved tensors belongs to the model being trained.")
    handles = {}
    try:
        for key, tensor in expected.items():
            path = files.get(key)
            if path is None or not path.is_file():
                raise ModelLoadError(f"{folder}: {key} was not saved ({path.name if path else 'no file'} missing).")
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            f = handles[path]
            if key not in f.keys():
                raise ModelLoadError(f"{path}: tensor {key} is missing.")
            saved = f.get_tensor(key)
            live = tensor.detach().to("cpu")
            if saved.shape != live.shape or saved.dtype != live.dtype or not torch.equal(saved, live):
                raise ModelLoadError(
                    f"{path}: tensor {key} differs from the weights in memory "
                    f"(saved {tuple(saved.shape)} {saved.dtype}, live {tuple(live.shape)} {live.dtype})."
                )
    finally:
        handles.clear()


def _load_exact(model, tensors: dict[str, torch.Tensor], where, only_audio_attention: bool) -> None:
    expected = set(model.state_dict())
    if only_audio_attention:
        expected = {k for k in expected if any(p in k for p in AUDIO_ATTN_KEY_PARTS)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{where} does not fit this model: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. Load it onto the base model it was "
            "trained from (same use_text_head and audio_self_attention)."
        )
    model.load_state_dict(tensors, strict=False)


# ----------------------------------------------------------------------------- report
def _group(name: str) -> str:
    n = canonical_name(name)
    if any(part in n for part in AUDIO_ATTN_KEY_PARTS):
        return cfg_names.AUDIO_ATTN
    if ".self_attn." in n:
        return cfg_names.TEXT_ATTN
    if ".audio_mlp." in n:
        return cfg_names.AUDIO_MLP
    if ".mlp." in n:
        return cfg_names.TEXT_MLP
    if "layernorm" in n or n.startswith("model.norm."):
        return "norms"
    if n.startswith(("model.embed_tokens.", "model.embed_audio_tokens.")):
        return "embeddings"
    if n.startswith(("audio_lm_head.", "text_lm_head.")):
        return "heads"
    return "other"


def _layer_set(ids: list[int]) -> str:
    if len(ids) == 1:
        return str(ids[0])
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{{{ids[0]}..{ids[-1]}}}"
    return "{" + ",".join(map(str, ids)) + "}"


def collapse_names(names) -> list[str]:
    """['model.layers.0.self_attn.q_proj', ...] -> ['model.layers.{0..27}.self_attn.{q,k,v,o}_proj']."""
    layers: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
    plain = []
    for name in names:
        m = re.fullmatch(r"(.*?\.layers)\.(\d+)\.(.+)", name)
        if m is None:
            plain.append(name)
            continue
        layers.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
    grouped: OrderedDict[tuple[str, str, str, str], list[str]] = OrderedDict()
    for (prefix, rest), ids in layers.items():
        parent, _, leaf = rest.rpartition(".")
        stem, sep, suffix = leaf.rpartition("_")
        key = (prefix, _layer_set(sorted(set(ids))), parent, sep + suffix if stem else "")
        grouped.setdefault(key, []).append(stem if stem else leaf)
    out = []
    for (prefix, layer_set, parent, suffix), stems in grouped.items():
        leaf = stems[0] + suffix if len(stems) == 1 else "{" + ",".join(stems) + "}" + suffix
        out.append(".".join(p for p in (prefix, layer_set, parent, leaf) if p))
    return out + plain


@dataclass
class ParamRow:
    group: str
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass
class ParamReport:
    mode: str  # "lora" or "full"
    rows: list[ParamRow]
    total: int
    trainable: int
    dtypes: dict[str, int]  # dtype -> parameter count
    targets: dict[str, list[str]] = field(default_factory=dict)  # pathway -> collapsed LoRA module names
    modules_to_save: list[str] = field(default_factory=list)  # collapsed
    weight_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def format(self) -> str:
        def pct(n):
            return f"{100.0 * n / self.total:6.2f}%" if self.total else "   -  "

        lines = [
            f"parameters ({self.mode} fine-tuning; dtype {', '.join(f'{d}: {n:,}' for d, n in self.dtypes.items())})"
        ]
        lines.append(f"  {'group':<11} {'trainable':>15} {'':>7}  {'frozen':>15} {'':>7}")
        for r in self.rows:
            lines.append(f"  {r.group:<11} {r.trainable:>15,} {pct(r.trainable)}  {r.frozen:>15,} {pct(r.frozen)}")
        lines.append(
            f"  {'total':<11} {self.trainable:>15,} {pct(self.trainable)}  {self.frozen:>15,} {pct(self.frozen)}"
        )
        if self.targets:
            lines.append("LoRA targets:")
            for pathway, patterns in self.targets.items():
                lines.extend(f"  {pathway:<10} {p}" for p in patterns)
        if self.modules_to_save:
            lines.append("fully trained modules:")
            lines.extend(f"  {p}" for p in self.modules_to_save)
        lines.append(
            f"memory estimate: weights {_size(self.weight_bytes)} + grads {_size(self.grad_bytes)} + AdamW state "
            f"{_size(self.optimizer_bytes)} = {_size(self.weight_bytes + self.grad_bytes + self.optimizer_bytes)} "
            "(torch AdamW keeps 2 states per trained parameter in its dtype; activations not included)"
        )
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parameter_report(model, cfg: FinetuneConfig | None = None) -> ParamReport:
    """Trainable/frozen parameters per pathway; counts add up to sum(p.numel() for p in model.parameters())."""
    counts = {g: [0, 0] for g in REPORT_GROUPS}
    dtypes: dict[str, int] = {}
    weight_bytes = grad_bytes = 0
    for name, p in model.named_parameters():
        n = p.numel()
        counts[_group(name)][0 if p.requires_grad else 1] += n
        dtypes[str(p.dtype).replace("torch.", "")] = dtypes.get(str(p.dtype).replace("torch.", ""), 0) + n
        weight_bytes += n * p.element_size()
        if p.requires_grad:
            grad_bytes += n * p.element_size()
    rows = [ParamRow(g, t, f) for g, (t, f) in counts.items()]
    targets: dict[str, list[str]] = {}
    to_save: list[str] = []
    for name, module in model.named_modules():
        canon = canonical_name(name)
        if isinstance(module, LoraLayer):
            for pathway, pattern in PATHWAYS.items():
                if re.fullmatch(pattern, canon):
                    targets.setdefault(pathway, []).append(canon)
        elif isinstance(module, ModulesToSaveWrapper):
            to_save.append(canon)
    mode = cfg.mode if cfg is not None else ("lora" if isinstance(model, PeftModel) else "full")
    return ParamReport(
        mode=mode,
        rows=rows,
        total=sum(r.total for r in rows),
        trainable=sum(r.trainable for r in rows),
        dtypes=dtypes,
        targets={k: collapse_names(v) for k, v in targets.items()},
        modules_to_save=collapse_names(to_save),
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=2 * grad_bytes,
    )

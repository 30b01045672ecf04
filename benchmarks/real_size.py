"""A Higgs Audio v2 stack at the released shapes with random weights, in the real folder layout.

    python benchmarks/real_size.py OUT                              # 28 layers, bf16 (~11.6 GB on disk)
    python benchmarks/real_size.py OUT --layers 2 --dtype float32   # real width, reduced depth

The model folder is what `higgs-tune` reads from the Hub (config.json + sharded safetensors +
index, text tokenizer, processor config, `audio_tokenizer/`), so `load_model`, `prepare`, `train`,
`export` run on it unchanged. Only the weights are random and the tokenizers are the tiny stack's
(2048-token BPE with the Llama-3 specials, the tiny 8-codebook codec at 25 frames/s): the model's
own vocabulary stays 128,256, so the embeddings and the 128k text head have their real size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REAL = {
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "vocab_size": 128256,
}
SMOKE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 344,
    "vocab_size": 128256,
}
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "processor_config.json",
    "generation_config.json",
)


def make_real_size_stack(
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    shapes: dict | None = None,
    layers: int | None = None,
    seed: int = 0,
    max_shard_size: str = "2GB",
) -> Path:
    """Write the stack into `out` (must be empty or absent); returns it."""
    from transformers import HiggsAudioV2Config

    from higgs_tune.tiny import make_tiny

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    shapes = dict(shapes or REAL)
    if layers is not None:
        shapes["num_hidden_layers"] = layers
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny(Path(tmp) / "tiny", seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        for name in _COPIED:
            if (tiny / name).is_file():
                shutil.copy2(tiny / name, out / name)
        shutil.copytree(tiny / "audio_tokenizer", out / "audio_tokenizer")
        config = HiggsAudioV2Config.from_pretrained(str(tiny))
    for key, value in shapes.items():
        setattr(config, key, value)
    config.max_position_embeddings = 8192
    write_random_weights(config, out, getattr(torch, dtype), seed=seed, max_shard_bytes=_parse_size(max_shard_size))
    # the processor config records where its audio tokenizer is: point it at this folder's copy
    proc = out / "processor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text(encoding="utf-8"))
        if isinstance(data.get("audio_tokenizer"), dict):
            data["audio_tokenizer"]["audio_tokenizer_name_or_path"] = str((out / "audio_tokenizer").resolve())
        proc.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return out


def _parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6}
    return int(float(text[:-2]) * units[text[-2:].upper()])


def write_random_weights(
    config, out: Path, dtype: torch.dtype, seed: int = 0, max_shard_bytes: int = 2 * 10**9
) -> None:
    """config.json + sharded safetensors + index for HiggsAudioV2ForConditionalGeneration(config, use_text_head=True),
    written tensor by tensor: the names and shapes come from the model built on the meta device, each
    tensor is drawn (N(0, initializer_range) for matrices, ones for norms, as transformers
    initialises them) and written, so memory stays at one shard (the full 5.8B model in bf16 would
    otherwise take 12.5 GB of RAM just to be written)."""
    from safetensors.torch import save_file
    from transformers import HiggsAudioV2ForConditionalGeneration

    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    size = 0
    names = list(shapes)
    element = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    for name in names:  # shard boundaries first, so the file names can say "of N"
        n = element * int(torch.Size(shapes[name]).numel())
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(plan):
        file = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in group:
            shape = shapes[name]
            t = torch.empty(shape, dtype=dtype)
            if len(shape) >= 2:
                t.normal_(0.0, config.initializer_range, generator=g)
            else:
                t.fill_(1.0)  # RMSNorm weights (the only 1-D parameters)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    if len(plan) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
        )
    config.architectures = ["HiggsAudioV2ForConditionalGeneration"]
    config.dtype = str(dtype).replace("torch.", "")
    config.save_pretrained(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--smoke", action="store_true", help="hidden 128, 2 layers (the vocabulary stays 128,256)")
    args = ap.parse_args(argv)
    path = make_real_size_stack(args.out, dtype=args.dtype, shapes=SMOKE if args.smoke else REAL, layers=args.layers)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {path} ({size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

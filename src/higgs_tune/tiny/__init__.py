"""Tiny random-weight stacks, built offline, for the tests, the benchmarks and `higgs-tune demo`.

    v2.py           the tiny Higgs Audio v2 stack (`make_tiny`, `higgs-tune make-tiny`)
    v3.py           the tiny Higgs Audio v3 checkpoint in the released layout (`make_tiny_v3`)
    eval_models.py  tiny Whisper-style ASR and WavLM speaker models, and a tiny LoRA adapter

The layer above infer/ and train/: the tiny builders use the library's own loaders and
savers, and nothing in the library imports them.
"""

from higgs_tune.tiny.v2 import (
    OutputDirNotEmpty,
    TinySpec,
    build_audio_tokenizer,
    build_model,
    build_processor,
    build_text_tokenizer,
    make_tiny,
    special_token_names,
)

__all__ = [
    "OutputDirNotEmpty",
    "TinySpec",
    "build_audio_tokenizer",
    "build_model",
    "build_processor",
    "build_text_tokenizer",
    "make_tiny",
    "special_token_names",
]

"""The optimizer a run trains with (`train.optimizer`), and why there is a choice.

bf16 weights updated by a plain AdamW lose most fine-tuning updates: an AdamW step moves a weight
by about the learning rate, and a bf16 weight of magnitude |w| can only move in steps of
|w| x 2^-7, so at lr 2e-5 any weight above ~0.005 rounds back to itself
(`benchmarks/bf16_precision.py`, a small model, lr 2e-5: 29% of the weights a step's gradient
reaches change, against all of them with float32 master weights; over 40 steps the loss falls 0.19
instead of 0.55). Two fixes:

- float32 master weights: `model.dtype: float32` + `train.mixed_precision: bf16` (the forward runs in
  bf16 under autocast, the update lands in float32). Memory: 4 (weights) + 4 (grads) + 8 (AdamW)
  + 2 (autocast's bf16 weight copies) bytes per parameter (`model/memory.py`).
- `train.optimizer: adamw_bf16_sr`: bf16 weights, torchao's AdamW computing in float32 and writing
  the new weight back with stochastic rounding (unbiased: small updates survive on average).
  Memory: 2 + 2 + 4 bytes per parameter. Needs `pip install torchao` (the `lowbit` extra).
  Not under DDP: every rank holds a full copy of the weights and applies the update itself, and
  the random rounding (torch's global RNG, drawn inside torchao's compiled step) would differ
  between ranks, so the copies drift apart. With FSDP each rank rounds only its own shard: fine.
"""

from __future__ import annotations

import torch

from higgs_tune.config import ConfigError

OPTIMIZERS = ("adamw", "adamw_bf16_sr")


def make_optimizer(params, t, replicas: int = 1) -> torch.optim.Optimizer:
    """AdamW over `params` as the TrainConfig `t` says (learning_rate, adam_betas, weight_decay, optimizer).
    `replicas`: processes that each hold and update a full copy of the weights (DDP: the world size)."""
    kind = getattr(t, "optimizer", "adamw")
    if kind == "adamw_bf16_sr" and replicas > 1:
        raise ConfigError(
            [
                f"train.optimizer: adamw_bf16_sr under DDP ({replicas} processes, each updating its own copy of the "
                "weights): the random rounding differs between processes and the copies drift apart. Use FSDP "
                "(accelerate launch with an FSDP config), or model.dtype: float32 with train.mixed_precision: bf16."
            ]
        )
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    if kind == "adamw_bf16_sr":
        try:
            from torchao.optim import _AdamW
        except ImportError as e:
            raise ConfigError(
                [
                    f"train.optimizer: adamw_bf16_sr needs torchao ({e}). Install it with "
                    "`pip install torchao` (or `pip install higgs-tune[lowbit]`), or use model.dtype: float32 "
                    "with train.mixed_precision: bf16."
                ]
            ) from e
        return _AdamW(
            params,
            lr=t.learning_rate,
            betas=tuple(t.adam_betas),
            weight_decay=t.weight_decay,
            bf16_stochastic_round=True,
        )
    raise ConfigError([f"train.optimizer: {kind!r} is not one of {', '.join(OPTIMIZERS)}."])

"""Higgs Audio v3 generation: the delayed-row sampling loop and the reference stop rule.

One audio row (K codes) per step. The prompt is `build_v3_sample(..., target_codes=None)`
(the same layout as training); `<|audio|>` predicts row 0; each sampled row is fed back as
the next position's input (its K table rows summed), as both engines do.

Per row r (before the stop):
- codebook c > r is forced to BOC (the delay head), as both engines force it;
- on a codebook that carries a real code, BOC is never sampled, nor EOC except on codebook 0
  (vLLM-Omni masks the same; SGLang-Omni leaves it to the model and maps specials to code 0);
- codebook 0's first EOC at row T ends the speech: T frames. (SGLang-Omni ignores EOC during
  rows 0-7, so it never returns fewer than 8 frames; we accept it from row `min_frames` on,
  so a short target gives exactly T frames, like vLLM-Omni.)

Stop rule (SGLang-Omni `sampler.step`): after codebook 0's first EOC, 6 more rows are
generated and then it stops: T + 7 rows in all, which `undelay_rows` turns into exactly T
frames (codebook c of frame j is row j + c <= T + 6; no frame dropped). During those 6 rows
the codebooks whose codes are complete (c <= r - T) are forced to EOC — the EOC fill the
training layout has there (vLLM-Omni forces it too; SGLang-Omni samples it, which only
changes what is fed back, never the T frames returned).

Sampling: greedy (temperature 0) or temperature / top_k / top_p per codebook (serving
defaults 0.8 / 30 / 0.8), after the masks above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from higgs_tune.families.v3.layout import AUDIO_SLOT, BOC, EOC, V3Sample, V3Tokens, build_v3_sample, undelay_rows

STOP_ROWS_AFTER_EOC = 6  # = K - 2 for K = 8: rows generated after codebook 0's first EOC


@dataclass(frozen=True)
class V3Sampling:
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.8
    top_k: int = 30
    max_frames: int = 1500  # 60 s at 25 frames/s
    min_frames: int = 1  # codebook 0 may not end the speech before this frame
    seed: int | None = None


@dataclass
class V3Generation:
    codes: torch.Tensor  # (K, T) long, 0..1023
    rows: torch.Tensor  # (R, K) the delayed rows generated (R = T + 7 when stopped)
    stopped: bool  # codebook 0 emitted EOC (False: max_frames reached)

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])


def sample_row(logits: torch.Tensor, sampling: V3Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, V) logits (masks already applied as -inf) -> (K,) codes."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > sampling.top_p
        drop[:, 1:] = drop[:, :-1].clone()  # keep the token that crosses top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def constrain_logits(logits: torch.Tensor, row: int, eoc_row: int | None, min_frames: int = 1) -> torch.Tensor:
    """Apply the layout masks for row `row` to (K, V) logits; `eoc_row` = T once codebook 0 ended."""
    k_books = logits.shape[0]
    out = logits.clone()
    neg = float("-inf")
    for c in range(k_books):
        if c > row:  # delay head
            out[c] = neg
            out[c, BOC] = 0.0
        elif eoc_row is not None and row >= eoc_row + c:  # this codebook's codes are complete: EOC fill
            out[c] = neg
            out[c, EOC] = 0.0
        else:  # a real code (or, on codebook 0 before the stop, the end of speech)
            out[c, BOC] = neg
            if c > 0 or eoc_row is not None or row < min_frames:
                out[c, EOC] = neg
    return out


def next_row_logits_fn(model):
    """A stepper over `model` with a KV cache: call(input_ids (1, L), audio_codes (1, L, K)) -> (K, V) logits."""
    from transformers import DynamicCache

    cache = DynamicCache()

    @torch.no_grad()
    def step(input_ids: torch.Tensor, audio_codes: torch.Tensor) -> torch.Tensor:
        out = model.hidden_states(input_ids, audio_codes, cache=cache, use_cache=True)
        return model.audio_logits(out.last_hidden_state[0, -1]).float()

    return step


@torch.no_grad()
def generate_rows(first_logits_and_step, num_codebooks: int, sampling: V3Sampling, *, agree=None) -> V3Generation:
    """The sampling loop over a stepper: `first_logits_and_step` = (logits of row 0 (K, V), step(row (K,)) -> (K, V)).

    `agree(row) -> row` (optional) replaces each sampled row before it is used: `rank0_row` makes every
    rank of a sharded model continue with rank 0's row, so all ranks stop at the same row.
    Kept separate from the model so tests can drive it with constructed logits.
    """
    logits, step = first_logits_and_step
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    rows: list[torch.Tensor] = []
    eoc_row: int | None = None
    max_rows = sampling.max_frames + num_codebooks - 1
    while len(rows) < max_rows:
        r = len(rows)
        row = sample_row(constrain_logits(logits, r, eoc_row, sampling.min_frames), sampling, generator)
        if agree is not None:
            row = agree(row)
        rows.append(row)
        if eoc_row is None and int(row[0]) == EOC:
            eoc_row = r
        if eoc_row is not None and r == eoc_row + STOP_ROWS_AFTER_EOC:
            break
        logits = step(row)
    rows_t = torch.stack(rows) if rows else torch.zeros((0, num_codebooks), dtype=torch.long)
    stopped = eoc_row is not None
    frames = eoc_row if stopped else max(0, len(rows) - num_codebooks + 1)
    return V3Generation(codes=undelay_rows(rows_t, frames), rows=rows_t, stopped=stopped)


def rank0_row(row: torch.Tensor) -> torch.Tensor:
    """Rank 0's row on every rank (a collective; the row itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return row
    row = row.contiguous()
    dist.broadcast(row, src=0)
    return row


def generation_prompt(
    tokenizer, tokens: V3Tokens, text: str, *, ref_codes: torch.Tensor | None = None, ref_text: str | None = None
) -> V3Sample:
    """The prompt `generate_v3` feeds the model: the training layout cut after `<|audio|>` (no target codes).

    `inspect --show` renders it beside the training sample and checks the two agree.
    """
    return build_v3_sample(tokenizer, tokens, text, ref_codes=ref_codes, ref_text=ref_text)


@torch.no_grad()
def generate_v3(
    model,
    tokenizer,
    tokens: V3Tokens,
    text: str,
    *,
    ref_codes: torch.Tensor | None = None,
    ref_text: str | None = None,
    sampling: V3Sampling = V3Sampling(),
    synced: bool = False,
) -> V3Generation:
    """Speech codes (K, T) for `text` (TTS) or in the voice of `ref_codes` (+ its transcript `ref_text`).

    `synced`: every rank of a sharded model runs this call and continues with rank 0's rows, so every
    rank makes the same forward passes and stops together."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        prompt = generation_prompt(tokenizer, tokens, text, ref_codes=ref_codes, ref_text=ref_text)
        stepper = next_row_logits_fn(model)
        first = stepper(prompt["input_ids"][None].to(device), prompt["audio_codes"][None].to(device))
        slot = torch.tensor([[AUDIO_SLOT]], device=device)

        def step(row: torch.Tensor) -> torch.Tensor:
            return stepper(slot, row.view(1, 1, -1).to(device))

        return generate_rows((first, step), tokens.num_codebooks, sampling, agree=rank0_row if synced else None)
    finally:
        model.train(was_training)

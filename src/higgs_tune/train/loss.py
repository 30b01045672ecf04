"""The training loss: one backbone pass, the heads applied only where a label is predicted.

The label contract (docs/CONTRACTS.md "Batch"; B rows, L text positions, N audio columns,
K codebooks, C = model `codebook_size` = 1026, V = text vocabulary):

    input_ids            (B, L)    long  text tokens; every audio column has one placeholder
                                         token here: <|AUDIO_OUT|> or the delay token
                                         <|reserved_special_token_6|> (the last K-1 columns)
    attention_mask       (B, L)    long  1 = real token; right padding
    labels               (B, L)    long  text label AT THE SAME POSITION as its token, else -100
    audio_input_ids      (B, N, K) long  the row's audio columns in order (delay pattern on);
                                         pad = stream EOS
    audio_input_ids_mask (B, N)    bool  True = real column; row b has exactly as many True
                                         columns as placeholders in input_ids[b]
    audio_labels         (B, N, K) long  label AT THE SAME COLUMN as the input code, else -100
    audio_roles          (B, N)    long  0 pad, 1 reference, 2 target (not read by the loss)
    sample_ids           list[str]       (not read by the loss; errors and health checks name them)

Where the labels sit. Labels are stored at the position of the token they ARE, never of the
token that predicts them: audio_labels[b, n] == audio_input_ids[b, n] wherever it is set. The
j-th True column of row b belongs to the j-th placeholder of input_ids[b], so the labels are
first expanded to text positions exactly as the HF forward does:

    expanded = full((B, L, K), -100); expanded[placeholder_mask] = audio_labels[audio_input_ids_mask]

How the shift works. The hidden state at position t has seen tokens 0..t, so it is scored
against the labels at t+1: text_lm_head(h[b, t]) vs labels[b, t+1] and audio_lm_head(h[b, t])
vs expanded[b, t+1, :]. The shift is a slice on the L axis of (B, L, ...) tensors, never on a
flattened B*L axis, so the last position of row b is never paired with the first position of
row b+1 (earlier trainers' failure 2). Inside a row it never crosses a segment either: every
audio segment's first column is all stream BOS and its label column is all -100 (BOS is never
a label), so the token before a segment (<|audio_out_bos|>) is never asked for audio codes,
and a segment's last label (each codebook's single EOS) is predicted from inside the segment.
The text target right after a segment (<|audio_eos|>) is predicted by the segment's last
column, the <|audio_out_bos|> target by the assistant header before it: within the turn, as
intended.

What is computed. Only the rows (b, t) whose next label is set are gathered, (P, H) for text
and (M, H) for audio, and only they go through text_lm_head (-> (P, V)) and audio_lm_head
(-> (M, K*C)): B x L x V (or B x L x K*C) logits are never built (see
benchmarks/loss_memory.py). Cross-entropy runs in float32 on those rows.

    per-codebook CE  L_k = sum of CE over codebook k's scored tokens / n_k
    audio_loss       = sum_k w_k L_k / sum_k w_k   (k with n_k > 0; w = loss.codebook_weights or 1)
    audio_loss_sum   = sum_k L_k                   (the HF forward's audio loss, for comparison)
    text_loss        = mean CE over scored text tokens
    loss             = text_weight * text_loss + audio_weight * audio_loss

A part with no scored token contributes 0 and its count (n_text_tokens / n_audio_tokens) is 0;
the heads still run on the empty selection, so every trainable weight gets a (zero) gradient
and DDP without `find_unused_parameters` does not hang.

Distributed / accumulation. `out.loss` is the mean over THIS micro-batch. To weight every token
of an optimizer step equally across micro-batches and ranks, count the step's tokens first
(no forward needed) and backpropagate `loss_for_step` instead:

    counts = sum((loss_module.count_tokens(b) for b in window), TokenCounts.zeros(K)).reduced(accelerator)
    for b in window:
        out = wrapped(**b)                                     # the DDP/FSDP wrapper's forward
        backward(out.loss_for_step(counts, scale=accelerator.num_processes))

`scale=num_processes` undoes DDP's gradient averaging over ranks; summed over the window's
micro-batches and the ranks, the losses equal the loss of the whole step computed at once.
(If `Accelerator(gradient_accumulation_steps=n)` is used, `accelerator.backward` divides by n:
multiply `scale` by n as well.) For logging, `out.stats()` gives additive sums/counts that
`StepMetrics` accumulates and `higgs_tune.train.logging.reduce_metrics` sums over ranks before
`finalize_metrics` turns them into token-weighted means.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from higgs_tune.config import ConfigError, LossConfig
from higgs_tune.errors import DataError

IGNORE = -100

# Additive statistics of a micro-batch: summed over micro-batches and ranks, then turned into
# means by `finalize_metrics`. Per-codebook entries are (K,) tensors.
STAT_KEYS = (
    "text_ce_sum",
    "text_correct",
    "n_text_tokens",
    "audio_ce_sum_per_codebook",
    "audio_correct_per_codebook",
    "n_audio_tokens_per_codebook",
    "n_tokens",
    "n_samples",
)
# The key under which `stats()` carries the weights needed to finalise them.
WEIGHTS_KEY = "loss_weights"


@dataclass(frozen=True)
class LossWeights:
    """text_weight, audio_weight and the per-codebook weights (length K) of the total loss."""

    text: float
    audio: float
    codebooks: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: LossConfig, num_codebooks: int) -> LossWeights:
        problems = []
        if cfg.text_weight < 0 or cfg.audio_weight < 0:
            problems.append(
                f"loss.text_weight ({cfg.text_weight}) and loss.audio_weight ({cfg.audio_weight}) must be >= 0."
            )
        cb = cfg.codebook_weights
        if cb is None:
            cb = [1.0] * num_codebooks
        elif len(cb) != num_codebooks:
            problems.append(
                f"loss.codebook_weights has {len(cb)} values but the model has {num_codebooks} codebooks: give one "
                "weight per codebook."
            )
        elif any(w < 0 for w in cb) or sum(cb) <= 0:
            problems.append(f"loss.codebook_weights {list(cb)} must be >= 0 with a positive sum.")
        if problems:
            raise ConfigError(problems)
        return cls(float(cfg.text_weight), float(cfg.audio_weight), tuple(float(w) for w in cb))


@dataclass
class LossTerms:
    """The parts of the total loss (tensors on one device, one dtype); see `combine_loss`."""

    loss: torch.Tensor  # () weighted total
    text_loss: torch.Tensor  # () mean CE over scored text tokens, 0 when none
    audio_loss: torch.Tensor  # () codebook-weighted mean of per_codebook_loss
    per_codebook_loss: torch.Tensor  # (K,) mean CE per codebook, 0 for a codebook with no token


def combine_loss(
    weights: LossWeights,
    text_ce_sum: torch.Tensor,
    n_text: torch.Tensor,
    audio_ce_sum: torch.Tensor,
    n_audio: torch.Tensor,
) -> LossTerms:
    """THE loss formula, used by the forward, `loss_for_step` and `finalize_metrics`.

    text_ce_sum () and audio_ce_sum (K,) are sums of CE; n_text () and n_audio (K,) the token
    counts they are divided by (this micro-batch's, or the whole step's). A part with no token
    is 0 and a codebook with no token is left out of the weighted audio mean. Adding a loss
    term: add its sum and count to `STAT_KEYS`/`stats()` and its weighted mean here.
    """
    n_text = n_text.to(text_ce_sum.device)
    n_audio = n_audio.to(audio_ce_sum.device)
    text_loss = text_ce_sum / n_text.clamp(min=1)
    per_codebook_loss = audio_ce_sum / n_audio.clamp(min=1)  # (K,)
    cbw = torch.tensor(weights.codebooks, dtype=per_codebook_loss.dtype, device=per_codebook_loss.device) * (
        n_audio > 0
    )
    audio_loss = (cbw * per_codebook_loss).sum() / cbw.sum().clamp(min=torch.finfo(cbw.dtype).tiny)
    loss = weights.text * text_loss + weights.audio * audio_loss
    return LossTerms(loss, text_loss, audio_loss, per_codebook_loss)


@dataclass(frozen=True)
class TokenCounts:
    """Scored tokens: text () long, audio (K,) long. Add them over micro-batches, reduce over ranks."""

    text: torch.Tensor
    audio: torch.Tensor

    @classmethod
    def zeros(cls, num_codebooks: int, device: torch.device | str | None = None) -> TokenCounts:
        return cls(
            torch.zeros((), dtype=torch.long, device=device),
            torch.zeros(num_codebooks, dtype=torch.long, device=device),
        )

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.text + other.text.to(self.text.device), self.audio + other.audio.to(self.audio.device))

    def reduced(self, accelerator) -> TokenCounts:
        """Summed over all ranks with `accelerator.reduce` (identity with one process or None)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        packed = torch.cat([self.text.reshape(1), self.audio]).to(accelerator.device)
        packed = accelerator.reduce(packed, reduction="sum")
        return TokenCounts(packed[0], packed[1:])


@dataclass
class Predictions:
    """Argmax predictions at the scored positions (for the preview and the health checks).

    text_*: P scored text tokens; audio_*: M scored audio positions (a position is kept when at
    least one codebook is scored there). `*_positions` is the position of the LABEL (t+1 for the
    hidden state at t). `audio_context` is the audio input at the position that made the
    prediction (-1 where that position is a text token): with the correct shift it is the
    previous column; a loss that compared logits at t with the label at t would make it equal
    to the target everywhere (the copy task the health check looks for).
    """

    text_rows: torch.Tensor  # (P,) long, batch row
    text_positions: torch.Tensor  # (P,) long
    text_target: torch.Tensor  # (P,) long
    text_pred: torch.Tensor  # (P,) long
    audio_rows: torch.Tensor  # (M,) long
    audio_positions: torch.Tensor  # (M,) long
    audio_target: torch.Tensor  # (M, K) long, -100 where that codebook is not scored
    audio_pred: torch.Tensor  # (M, K) long
    audio_context: torch.Tensor  # (M, K) long

    def cpu(self) -> Predictions:
        return Predictions(**{f.name: getattr(self, f.name).detach().cpu() for f in fields(self)})


@dataclass
class LossOutput:
    """What `HiggsLossModule.forward` returns (a dataclass: DDP finds its tensors).

    Differentiable: loss, text_loss, audio_loss, audio_loss_sum, per_codebook_loss, text_ce_sum,
    audio_ce_sum_per_codebook. Detached: accuracies, counts, predictions.
    """

    loss: torch.Tensor  # () weighted total of this micro-batch
    text_loss: torch.Tensor  # () mean CE over scored text tokens, 0 when none
    audio_loss: torch.Tensor  # () weighted mean over codebooks of per_codebook_loss
    audio_loss_sum: torch.Tensor  # () sum over codebooks of per_codebook_loss (unweighted)
    per_codebook_loss: torch.Tensor  # (K,) mean CE per codebook, 0 for a codebook with no token
    per_codebook_acc: torch.Tensor  # (K,) top-1 accuracy per codebook
    text_acc: torch.Tensor  # ()
    n_text_tokens: torch.Tensor  # () long
    n_audio_tokens: torch.Tensor  # (K,) long, per codebook
    text_ce_sum: torch.Tensor  # () sum of text CE (for token-count normalisation)
    audio_ce_sum_per_codebook: torch.Tensor  # (K,) sum of CE per codebook
    text_correct: torch.Tensor  # () long
    audio_correct_per_codebook: torch.Tensor  # (K,) long
    n_tokens: torch.Tensor  # () long, real (attention_mask) tokens in the batch
    n_samples: int
    weights: LossWeights
    predictions: Predictions
    shift: int  # 1: position t predicts t+1 (always, except the debug switch: 0)

    def loss_for_step(self, counts: TokenCounts, scale: float = 1.0) -> torch.Tensor:
        """This micro-batch's share of the step loss, normalised by the step's token counts.

        `counts` = scored tokens of the whole optimizer step (all micro-batches, all ranks).
        Summing this over the step's micro-batches (and ranks, with scale = number of ranks)
        gives exactly `finalize_metrics(...)["loss"]` of the whole step.
        """
        return (
            scale
            * combine_loss(
                self.weights, self.text_ce_sum, counts.text, self.audio_ce_sum_per_codebook, counts.audio
            ).loss
        )

    def stats(self) -> dict:
        """Additive, detached statistics (`STAT_KEYS`, tensors on the loss's device) + the weights."""
        out = {
            "text_ce_sum": self.text_ce_sum.detach().double(),
            "text_correct": self.text_correct.double(),
            "n_text_tokens": self.n_text_tokens.double(),
            "audio_ce_sum_per_codebook": self.audio_ce_sum_per_codebook.detach().double(),
            "audio_correct_per_codebook": self.audio_correct_per_codebook.double(),
            "n_audio_tokens_per_codebook": self.n_audio_tokens.double(),
            "n_tokens": self.n_tokens.double(),
            "n_samples": torch.tensor(float(self.n_samples), dtype=torch.float64, device=self.n_tokens.device),
        }
        out[WEIGHTS_KEY] = self.weights
        return out

    def metrics(self) -> dict:
        """Token-weighted metrics of this micro-batch as plain floats/lists (see finalize_metrics)."""
        return finalize_metrics(self.stats())


def finalize_metrics(stats: Mapping) -> dict:
    """Means from additive statistics (summed over micro-batches/ranks), as plain Python values.

    Keys: loss, text_loss, audio_loss, audio_loss_sum, text_acc, audio_acc (token-weighted over
    codebooks), per_codebook_loss [K], per_codebook_acc [K], n_text_tokens, n_audio_tokens,
    n_audio_tokens_per_codebook [K], n_tokens, n_samples. A part with no token has loss and
    accuracy 0.0 and count 0.
    """
    w: LossWeights = stats[WEIGHTS_KEY]

    def tensor(key):
        return torch.as_tensor(stats[key]).detach().double().cpu()

    n_text = float(tensor("n_text_tokens"))
    n_cb = tensor("n_audio_tokens_per_codebook").reshape(-1)  # (K,)
    terms = combine_loss(
        w, tensor("text_ce_sum"), tensor("n_text_tokens"), tensor("audio_ce_sum_per_codebook").reshape(-1), n_cb
    )
    text_acc = float(tensor("text_correct")) / n_text if n_text else 0.0
    correct = tensor("audio_correct_per_codebook").reshape(-1).tolist()
    n_cb = n_cb.tolist()
    per_cb_acc = [c / n if n else 0.0 for c, n in zip(correct, n_cb, strict=True)]
    per_cb_loss = terms.per_codebook_loss.tolist()
    n_audio = sum(n_cb)
    return {
        "loss": float(terms.loss),
        "text_loss": float(terms.text_loss),
        "audio_loss": float(terms.audio_loss),
        "audio_loss_sum": sum(per_cb_loss),
        "text_acc": text_acc,
        "audio_acc": sum(correct) / n_audio if n_audio else 0.0,
        "per_codebook_loss": per_cb_loss,
        "per_codebook_acc": per_cb_acc,
        "n_text_tokens": int(n_text),
        "n_audio_tokens": int(n_audio),
        "n_audio_tokens_per_codebook": [int(n) for n in n_cb],
        "n_tokens": int(tensor("n_tokens")),
        "n_samples": int(tensor("n_samples")),
    }


class StepMetrics:
    """Accumulates `LossOutput.stats()` over the micro-batches of a step, on device (no sync)."""

    def __init__(self) -> None:
        self._stats: dict | None = None

    def add(self, out: LossOutput) -> None:
        stats = out.stats()
        if self._stats is None:
            self._stats = stats
            return
        for key in STAT_KEYS:
            self._stats[key] = self._stats[key] + stats[key]

    def pop(self) -> dict:
        """The accumulated stats (for `reduce_metrics`), and start over."""
        if self._stats is None:
            raise ValueError("StepMetrics.pop() before any add(): no micro-batch was recorded this step.")
        stats, self._stats = self._stats, None
        return stats


def placeholder_mask(input_ids: torch.Tensor, config) -> torch.Tensor:
    """(B, L) bool: positions holding an audio column (<|AUDIO_OUT|> or the delay token)."""
    return (input_ids == config.audio_token_id) | (input_ids == config.audio_delay_token_id)


def expand_to_text_positions(
    values: torch.Tensor, column_mask: torch.Tensor, placeholders: torch.Tensor, fill: int
) -> torch.Tensor:
    """(B, N, K) per-column values -> (B, L, K) at their placeholder positions, `fill` elsewhere.

    Row-major boolean indexing pairs the j-th True column of row b with the j-th placeholder of
    row b (the HF forward does the same); `_check_batch` has verified the per-row counts match.
    """
    B, L = placeholders.shape
    out = values.new_full((B, L, values.shape[-1]), fill)
    out[placeholders] = values[column_mask]
    return out


@dataclass
class HeadLosses:
    """Sums, counts and argmax of the heads at the scored positions (see `scored_head_losses`)."""

    text_ce_sum: torch.Tensor  # () float32, differentiable
    text_correct: torch.Tensor  # () long
    n_text: torch.Tensor  # () long
    text_rows: torch.Tensor  # (P,) long
    text_positions: torch.Tensor  # (P,) long, position of the label
    text_target: torch.Tensor  # (P,) long
    text_pred: torch.Tensor  # (P,) long
    audio_ce_sum: torch.Tensor  # (K,) float32, differentiable
    audio_correct: torch.Tensor  # (K,) long
    n_audio: torch.Tensor  # (K,) long
    audio_rows: torch.Tensor  # (M,) long
    audio_positions: torch.Tensor  # (M,) long, position of the label
    audio_target: torch.Tensor  # (M, K) long, -100 where that codebook is not scored
    audio_pred: torch.Tensor  # (M, K) long


def scored_head_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    expanded_audio_labels: torch.Tensor,
    text_head: nn.Module | None,
    audio_head: nn.Module,
    num_codebooks: int,
    codebook_size: int,
    shift: int = 1,
) -> HeadLosses:
    """CE of the heads at the positions whose next label is set, and nowhere else.

    hidden (B, L, H) last hidden states; labels (B, L) text labels; expanded_audio_labels
    (B, L, K) audio labels at text positions (`expand_to_text_positions`). With shift=1 the
    state at t is scored against the labels at t+1 (shift=0: the wrong, unshifted pairing).
    Only the P text rows and M audio rows are gathered, (P, H) and (M, H), and only they go
    through the heads: (P, V) and (M, K*C) logits, in float32 for the CE.
    """
    K, C = num_codebooks, codebook_size
    L = hidden.shape[1]
    s = shift
    # Predictor side: positions 0..L-1-s; label side: positions s..L-1. Per row (axis 1 only).
    h = hidden[:, : L - s]  # (B, L-s, H)
    next_text = labels[:, s:]  # (B, L-s)
    next_audio = expanded_audio_labels[:, s:]  # (B, L-s, K)

    # ---- text: only the P positions whose next token is a text label
    if text_head is not None:
        t_rows, t_pos = (next_text != IGNORE).nonzero(as_tuple=True)
    else:
        t_rows = t_pos = labels.new_zeros(0)
    text_target = next_text[t_rows, t_pos]  # (P,)
    if text_head is not None:
        text_logits = text_head(h[t_rows, t_pos]).float()  # (P, V)
        text_ce_sum = F.cross_entropy(text_logits, text_target, reduction="sum")
        text_pred = text_logits.detach().argmax(-1)  # (P,)
    else:
        text_ce_sum = hidden.new_zeros((), dtype=torch.float32)
        text_pred = text_target.clone()

    # ---- audio: only the M positions where at least one codebook of the next column is scored
    a_rows, a_pos = (next_audio != IGNORE).any(-1).nonzero(as_tuple=True)
    audio_target = next_audio[a_rows, a_pos]  # (M, K)
    audio_logits = audio_head(h[a_rows, a_pos]).float().view(-1, K, C)  # (M, K, C)
    # (M, K) per-token CE, 0 where ignored
    ce = F.cross_entropy(
        audio_logits.reshape(-1, C), audio_target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(-1, K)
    scored = audio_target != IGNORE  # (M, K)
    audio_pred = audio_logits.detach().argmax(-1)  # (M, K)
    return HeadLosses(
        text_ce_sum=text_ce_sum,
        text_correct=(text_pred == text_target).sum(),
        n_text=torch.as_tensor(t_rows.numel(), device=hidden.device),
        text_rows=t_rows,
        text_positions=t_pos + s,
        text_target=text_target,
        text_pred=text_pred,
        audio_ce_sum=ce.sum(0),
        audio_correct=((audio_pred == audio_target) & scored).sum(0),
        n_audio=scored.sum(0),
        audio_rows=a_rows,
        audio_positions=a_pos + s,
        audio_target=audio_target,
        audio_pred=audio_pred,
    )


class HiggsLossModule(nn.Module):
    """The module a DDP/FSDP wrapper wraps: `forward(**batch) -> LossOutput`.

    model: `HiggsAudioV2ForConditionalGeneration` (with `use_text_head=True` when the text loss
    is weighted) or a `peft.PeftModel` around one. It is the only registered child (`.model`):
    save/checkpoint `loss_module.model`, never a second copy of its parts.

    `_debug_unshifted=True` computes the deliberately WRONG loss (logits at t vs the label at t:
    the copy task). It exists only so tests can prove the health checks catch it.
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, *, _debug_unshifted: bool = False):
        super().__init__()
        self.model = model
        config = self._base().config
        self.num_codebooks = int(config.num_codebooks)
        self.codebook_size = int(config.codebook_size)
        self.text_vocab_size = int(config.vocab_size)
        self.weights = LossWeights.from_config(loss_cfg, self.num_codebooks)
        if self.weights.text > 0 and self._base().text_lm_head is None:
            raise ConfigError(
                [
                    f"loss.text_weight is {self.weights.text} but the model has no text_lm_head: load it with "
                    "use_text_head=True (model.use_text_head: true) or set loss.text_weight: 0."
                ]
            )
        self.shift = 0 if _debug_unshifted else 1
        if _debug_unshifted:
            warnings.warn(
                "HiggsLossModule(_debug_unshifted=True): computing the WRONG unshifted loss (copy task). Tests only.",
                stacklevel=2,
            )

    def _base(self) -> nn.Module:
        """The HiggsAudioV2ForConditionalGeneration inside (LoRA layers already injected by peft)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # ------------------------------------------------------------------ checks
    def _check_batch(
        self, input_ids, labels, audio_input_ids, audio_input_ids_mask, audio_labels, placeholders, sample_ids
    ) -> None:
        """One host sync: per-row placeholder/column counts and label ranges. Raises DataError."""
        per_row_placeholders = placeholders.sum(1)  # (B,)
        per_row_columns = audio_input_ids_mask.sum(1)  # (B,)
        bad_text = (labels != IGNORE) & ((labels < 0) | (labels >= self.text_vocab_size))
        bad_audio = (audio_labels != IGNORE) & ((audio_labels < 0) | (audio_labels >= self.codebook_size))
        bad_input = audio_input_ids_mask[..., None] & ((audio_input_ids < 0) | (audio_input_ids >= self.codebook_size))
        flags = torch.stack(
            [(per_row_placeholders != per_row_columns).any(), bad_text.any(), bad_audio.any(), bad_input.any()]
        ).tolist()
        if not any(flags):
            return

        def who(row: int) -> str:
            return f"row {row}" + (
                f" (sample {sample_ids[row]!r})" if sample_ids is not None and row < len(sample_ids) else ""
            )

        problems = []
        if flags[0]:
            for row in (per_row_placeholders != per_row_columns).nonzero().flatten().tolist():
                problems.append(
                    f"{who(row)} has {int(per_row_placeholders[row])} audio placeholders in input_ids but "
                    f"{int(per_row_columns[row])} audio columns in audio_input_ids_mask; each column needs exactly "
                    "one <|AUDIO_OUT|>/delay token (check the collator)."
                )
        if flags[1]:
            row = int(bad_text.nonzero()[0, 0])
            problems.append(f"{who(row)}: text labels outside [0, {self.text_vocab_size}) and not -100.")
        if flags[2]:
            row = int(bad_audio.nonzero()[0, 0])
            problems.append(
                f"{who(row)}: audio labels outside [0, {self.codebook_size}) and not -100 (the model's "
                "codebook_size includes stream BOS/EOS)."
            )
        if flags[3]:
            row = int(bad_input.nonzero()[0, 0])
            problems.append(f"{who(row)}: audio_input_ids outside [0, {self.codebook_size}).")
        raise DataError("bad training batch: " + " ".join(problems))

    # ------------------------------------------------------------------ counting
    def count_tokens(self, batch: Mapping) -> TokenCounts:
        """The tokens `forward(**batch)` will score, from the labels alone (no forward)."""
        config = self._base().config
        placeholders = placeholder_mask(batch["input_ids"], config)
        expanded = expand_to_text_positions(
            batch["audio_labels"], batch["audio_input_ids_mask"].bool(), placeholders, IGNORE
        )
        # Same slices as forward: the labels at positions s..L-1 are the ones a position predicts
        # (with the shift, a label at position 0 has no predictor and is never scored).
        s = self.shift
        labels = batch["labels"]
        text = (labels[:, s:] != IGNORE).sum() if self._base().text_lm_head is not None else labels.new_zeros(())
        audio = (expanded[:, s:] != IGNORE).sum((0, 1))  # (K,)
        return TokenCounts(text, audio)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        audio_input_ids: torch.Tensor,
        audio_input_ids_mask: torch.Tensor,
        audio_labels: torch.Tensor,
        audio_roles: torch.Tensor | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> LossOutput:
        base = self._base()
        config = base.config
        K, C = self.num_codebooks, self.codebook_size
        audio_input_ids_mask = audio_input_ids_mask.bool()
        placeholders = placeholder_mask(input_ids, config)  # (B, L) bool
        self._check_batch(
            input_ids, labels, audio_input_ids, audio_input_ids_mask, audio_labels, placeholders, sample_ids
        )

        # The backbone runs once, inside this forward (so the wrapper's hooks see it).
        hidden = base.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            audio_input_ids=audio_input_ids,
            audio_input_ids_mask=audio_input_ids_mask,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)

        expanded_labels = expand_to_text_positions(
            audio_labels, audio_input_ids_mask, placeholders, IGNORE
        )  # (B, L, K)
        expanded_inputs = expand_to_text_positions(audio_input_ids, audio_input_ids_mask, placeholders, -1)  # (B, L, K)
        heads = scored_head_losses(
            hidden, labels, expanded_labels, base.text_lm_head, base.audio_lm_head, K, C, self.shift
        )
        s = self.shift
        # the audio input at each predicting position (b, t - s) of a scored target at (b, t)
        context = expanded_inputs[heads.audio_rows, heads.audio_positions - s]  # (M, K)

        # ---- means and the weighted total (a part without tokens contributes 0)
        n_text, n_audio = heads.n_text, heads.n_audio
        terms = combine_loss(self.weights, heads.text_ce_sum, n_text, heads.audio_ce_sum, n_audio)

        return LossOutput(
            loss=terms.loss,
            text_loss=terms.text_loss,
            audio_loss=terms.audio_loss,
            audio_loss_sum=terms.per_codebook_loss.sum(),
            per_codebook_loss=terms.per_codebook_loss,
            per_codebook_acc=(heads.audio_correct / n_audio.clamp(min=1)).detach(),
            text_acc=(heads.text_correct / n_text.clamp(min=1)).detach(),
            n_text_tokens=n_text,
            n_audio_tokens=n_audio,
            text_ce_sum=heads.text_ce_sum,
            audio_ce_sum_per_codebook=heads.audio_ce_sum,
            text_correct=heads.text_correct,
            audio_correct_per_codebook=heads.audio_correct,
            n_tokens=attention_mask.sum(),
            n_samples=int(input_ids.shape[0]),
            weights=self.weights,
            predictions=Predictions(
                text_rows=heads.text_rows,
                text_positions=heads.text_positions,
                text_target=heads.text_target,
                text_pred=heads.text_pred,
                audio_rows=heads.audio_rows,
                audio_positions=heads.audio_positions,
                audio_target=heads.audio_target,
                audio_pred=heads.audio_pred,
                audio_context=context,
            ),
            shift=s,
        )

"""Training health checks: each failure mode of earlier Higgs trainers gets a named warning.

Codes (a warning is emitted once per code, later hits only raise its `count`):

    chance_level      from health.chance_after_steps on, a weighted loss still at (or above)
                      chance: within health.chance_tolerance (relative) of ln(V), text
                      V = vocab size (ln 128256 = 11.76), audio V = codebook_size (ln 1026 = 6.93),
                      per codebook too. The model is not learning.
    copy_task         the loss compares logits at t with the label at t: audio accuracy > 0.98 or
                      audio loss < 0.05 before health.copy_check_steps, or (first batch) every
                      scored audio target equals the input the model saw at the predicting position.
    label_misaligned  (first batch) labels are not at the same column/position as their inputs,
                      as the contract requires (the collator shifted them already, or scrambled them).
    no_signal         a pathway with weight > 0 has no scored token (every step), or (first batch)
                      the text labels are only chat markup (headers, role names, "\\n\\n",
                      <|begin_of_text|>, pad, placeholders).
    no_eos            (first batch) no stream EOS among the scored audio labels: generation never stops.
    non_finite        NaN/Inf loss or gradient norm. With health.stop_on_nonfinite (default) this
                      raises TrainingHealthError naming the step, the batch's sample ids and the last
                      good checkpoint; otherwise it is a warning.

How the recipe calls it (`check_step` reads metrics reduced over ranks, so every rank takes the
same decision and a raise never leaves another rank waiting in a collective):

    monitor = HealthMonitor.for_model(cfg.health, cfg.loss, model.config, tokenizer,
                                      on_warning=metrics_logger.log_warning)
    first micro-batch:     out = wrapped(**batch); monitor.check_batch(step, batch, out)   # local, never raises
    after backward + clip: metrics = reduce_metrics(...); monitor.check_step(step, metrics, grad_norm=gn,
                                        sample_ids=ids, last_checkpoint=last_ckpt)  # BEFORE optimizer.step()

Why the first-batch copy check looks at the loss's pairing, not at the labels. In the contract a
label sits at the SAME column as its input: audio_labels == audio_input_ids wherever a label is
set, by design, because the loss does the shift. So "labels equal inputs" is the correct state
and cannot be what flags a copy task. The copy task is a property of the LOSS: which input the
model had seen at the position whose logits are scored against a target. `LossOutput.predictions`
records, for every scored audio target, `audio_context` = the audio input at the predicting
position. With the correct shift (position t predicts the label at t+1) the context is the
previous column, and in every contract segment some pairs must differ: each codebook's first
code is predicted from a stream BOS input (BOS is never a label) and its EOS label from a code
input, so at least 2 pairs per codebook differ, whatever the audio (even a constant code). With
the unshifted loss (logits at t vs label at t) the context IS the target at every scored pair.
So "all scored targets == their context" is exact: it fires on the broken loss on the very
first batch, before any training, and never on the correct contract. The data half is checked
separately (`label_misaligned`): labels must equal the inputs at the same column, so a collator
that pre-shifted its labels (which, with this shifting loss, would train two frames ahead) is
caught too. During training, accuracy > 0.98 or loss < 0.05 early is the symptom check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from higgs_tune.config import HealthConfig, LossConfig
from higgs_tune.errors import TrainingHealthError
from higgs_tune.train.loss import IGNORE, LossOutput

CHANCE_LEVEL = "chance_level"
COPY_TASK = "copy_task"
LABEL_MISALIGNED = "label_misaligned"
NO_SIGNAL = "no_signal"
NO_EOS = "no_eos"
NON_FINITE = "non_finite"
CODES = (CHANCE_LEVEL, COPY_TASK, LABEL_MISALIGNED, NO_SIGNAL, NO_EOS, NON_FINITE)

# Copy-task symptom thresholds (before health.copy_check_steps).
COPY_ACCURACY = 0.98
COPY_LOSS = 0.05

# Chat markup that carries no signal as a text target. <|audio_out_bos|>, <|audio_eos|> and
# <|eot_id|> are the documented targets (start audio, stop audio, end turn): NOT in this list.
STRUCTURAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|AUDIO_OUT|>",
    "<|reserved_special_token_6|>",
    "<|finetune_right_pad_id|>",
)
ROLE_HEADERS = tuple(
    f"<|start_header_id|>{role}<|end_header_id|>\n\n" for role in ("system", "user", "assistant", "scene")
)

log = logging.getLogger(__name__)


@dataclass
class HealthWarning:
    """One named problem: first step seen, a message with likely causes and what to check."""

    code: str
    step: int
    message: str
    details: dict = field(default_factory=dict)
    count: int = 1  # times seen so far (1 when first emitted)
    last_step: int | None = None

    def record(self) -> dict:
        """The metrics.jsonl record."""
        return {
            "event": "warning",
            "code": self.code,
            "step": self.step,
            "count": self.count,
            "last_step": self.step if self.last_step is None else self.last_step,
            "message": self.message,
            "details": self.details,
        }

    def __str__(self) -> str:
        return f"[{self.code}] step {self.step}: {self.message}"


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


class HealthMonitor:
    """Per-step and first-batch health checks; see the module docstring for the codes."""

    def __init__(
        self,
        cfg: HealthConfig,
        *,
        text_vocab_size: int,
        codebook_size: int,
        num_codebooks: int,
        text_weight: float,
        audio_weight: float,
        stream_eos_id: int | None = None,
        structural_token_ids: Iterable[int] = (),
        on_warning: Callable[[HealthWarning], None] | None = None,
    ):
        self.cfg = cfg
        self.text_vocab_size = text_vocab_size
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.text_weight = text_weight
        self.audio_weight = audio_weight
        self.stream_eos_id = codebook_size - 1 if stream_eos_id is None else stream_eos_id
        self.structural_token_ids = frozenset(int(i) for i in structural_token_ids)
        self.on_warning = on_warning
        self._seen: dict[str, HealthWarning] = {}
        self._first_batch_done = False

    @classmethod
    def for_model(
        cls,
        cfg: HealthConfig,
        loss_cfg: LossConfig,
        model_config,
        tokenizer=None,
        on_warning: Callable[[HealthWarning], None] | None = None,
    ) -> HealthMonitor:
        """Sizes and special ids from the model config; chat-markup ids from the tokenizer."""
        structural = {model_config.audio_token_id, model_config.audio_delay_token_id}
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(model_config, name, None) is not None:
                structural.add(getattr(model_config, name))
        if tokenizer is not None:
            unk = tokenizer.unk_token_id
            structural.update(
                i for i in tokenizer.convert_tokens_to_ids(list(STRUCTURAL_TOKENS)) if i is not None and i != unk
            )
            if tokenizer.pad_token_id is not None:
                structural.add(tokenizer.pad_token_id)
            # role names and "\n\n" as the tokenizer splits them inside a header
            for header in ROLE_HEADERS:
                structural.update(tokenizer(header, add_special_tokens=False)["input_ids"])
        return cls(
            cfg,
            text_vocab_size=model_config.vocab_size,
            codebook_size=model_config.codebook_size,
            num_codebooks=model_config.num_codebooks,
            text_weight=loss_cfg.text_weight,
            audio_weight=loss_cfg.audio_weight,
            stream_eos_id=model_config.audio_stream_eos_id,
            structural_token_ids=structural,
            on_warning=on_warning,
        )

    # ------------------------------------------------------------------ emission
    @property
    def warnings(self) -> list[HealthWarning]:
        """Every code seen so far, first occurrence, with its repeat count."""
        return list(self._seen.values())

    def _emit(self, code: str, step: int, message: str, **details) -> HealthWarning | None:
        seen = self._seen.get(code)
        if seen is not None:
            seen.count += 1
            seen.last_step = step
            return None
        w = HealthWarning(code, step, message, details)
        self._seen[code] = w
        if self.on_warning is not None:
            self.on_warning(w)
        else:
            log.warning("%s", w)
        return w

    # ------------------------------------------------------------------ per micro-batch
    def check_batch(self, step: int, batch: Mapping, out: LossOutput) -> list[HealthWarning]:
        """Data and loss-pairing checks on one micro-batch (local; warns, never raises).

        Every call: no_signal, no_eos. First call only: label_misaligned and the copy-task
        pairing check (see the module docstring).

        The recipe calls it on the run's first micro-batch only. Its cost is O(batch), but each
        check reads a device tensor on the host (`int(...)`, `.any()`, `.tolist()`): several GPU
        syncs per call, which on every micro-batch would stall the forward/backward queue. Later
        batches are covered without a sync: no_signal from the step's reduced counts
        (`check_step`), and before the model loads the recipe's first batches must pass
        `check_trainable` (a trained audio token and an EOS label per codebook, or the run stops).
        Every batch has that structure: all come from the same `build_sample`.
        """
        new: list[HealthWarning | None] = []
        p = out.predictions
        n_text = int(out.n_text_tokens)
        n_audio = int(out.n_audio_tokens.sum())
        ids = list(batch.get("sample_ids") or [])
        if not self._first_batch_done:
            self._first_batch_done = True
            new += self._check_alignment(step, batch, ids)
            new.append(self._check_pairing(step, out))
        if self.audio_weight > 0 and n_audio == 0:
            new.append(
                self._emit(
                    NO_SIGNAL,
                    step,
                    (
                        f"no audio token is scored in this batch while loss.audio_weight = {self.audio_weight}: "
                        "the audio pathway learns nothing from it. Check that target segments have audio labels "
                        "(reference segments are all -100 by design) and that audio_labels line up with the "
                        "collator's placeholders. Samples: " + ", ".join(ids[:8]) + "."
                    ),
                    sample_ids=ids[:8],
                )
            )
        if self.text_weight > 0 and n_text == 0:
            new.append(
                self._emit(
                    NO_SIGNAL,
                    step,
                    (
                        f"no text token is scored in this batch while loss.text_weight = {self.text_weight}. The "
                        "contract labels <|audio_out_bos|>, <|audio_eos|> and <|eot_id|> of the target turn; "
                        "check the collator's text labels, or set loss.text_weight: 0."
                    ),
                    sample_ids=ids[:8],
                )
            )
        elif self.text_weight > 0 and self.structural_token_ids:
            targets = set(p.text_target.tolist())
            if targets <= self.structural_token_ids:
                new.append(
                    self._emit(
                        NO_SIGNAL,
                        step,
                        (
                            f"all {n_text} text labels of this batch are chat markup (token ids "
                            f"{sorted(targets)[:10]}: headers, role names, '\\n\\n', <|begin_of_text|>, pad or "
                            f"audio placeholders) while loss.text_weight = {self.text_weight}: the text loss "
                            "trains nothing useful and can look 'learned'. Label the target turn's "
                            "<|audio_out_bos|>, <|audio_eos|>, <|eot_id|> (the contract), or set "
                            "loss.text_weight: 0."
                        ),
                        target_ids=sorted(targets)[:10],
                    )
                )
        if n_audio > 0 and not bool((p.audio_target == self.stream_eos_id).any()):
            new.append(
                self._emit(
                    NO_EOS,
                    step,
                    (
                        f"no stream EOS (id {self.stream_eos_id}) among the {n_audio} scored audio labels of this "
                        f"batch (samples {', '.join(ids[:8])}): a model trained like this never learns to stop and "
                        "generates minutes of silence. Each codebook's first EOS after the codes must be a label "
                        "(the transformers processor's output_labels masks it); check the collator's audio "
                        "labels."
                    ),
                    sample_ids=ids[:8],
                )
            )
        return [w for w in new if w is not None]

    def _check_alignment(self, step: int, batch: Mapping, ids: Sequence[str]) -> list[HealthWarning | None]:
        """label_misaligned: a label must equal its input at the same column/position (contract)."""
        out = []
        labels, audio_labels = batch["labels"], batch["audio_labels"]
        audio_inputs, mask = batch["audio_input_ids"], batch["audio_input_ids_mask"].bool()
        set_a = audio_labels != IGNORE  # (B, N, K)
        bad_a = set_a & ((audio_labels != audio_inputs) | ~mask[..., None])
        n_set, n_bad = int(set_a.sum()), int(bad_a.sum())
        if n_bad:
            # labels shifted one column left already: label[j] == input[j+1]
            nxt = set_a[:, :-1] & (audio_labels[:, :-1] == audio_inputs[:, 1:])
            frac_next = int(nxt.sum()) / max(n_set, 1)
            b, n, k = bad_a.nonzero()[0].tolist()
            who = ids[b] if b < len(ids) else f"row {b}"
            hint = (
                f" {frac_next:.0%} of them equal the NEXT column's input: the labels were shifted already, and this "
                "loss shifts again, so the model would learn to predict two frames ahead."
                if frac_next > 0.5
                else ""
            )
            out.append(
                self._emit(
                    LABEL_MISALIGNED,
                    step,
                    (
                        f"{n_bad} of {n_set} audio labels differ from the audio input at the same column (first: "
                        f"sample {who}, column {n}, codebook {k}).{hint} The contract keeps each label at its own "
                        "column (the loss does the shift); fix the collator."
                    ),
                    audio_mismatches=n_bad,
                    audio_labels=n_set,
                    fraction_next_column=frac_next,
                )
            )
        set_t = labels != IGNORE
        bad_t = set_t & (labels != batch["input_ids"])
        if int(bad_t.sum()):
            b, t = bad_t.nonzero()[0].tolist()
            who = ids[b] if b < len(ids) else f"row {b}"
            out.append(
                self._emit(
                    LABEL_MISALIGNED,
                    step,
                    (
                        f"{int(bad_t.sum())} of {int(set_t.sum())} text labels differ from the token at the same "
                        f"position (first: sample {who}, position {t}). Text labels sit at their own token's "
                        "position; the loss shifts. Fix the collator."
                    ),
                    text_mismatches=int(bad_t.sum()),
                    text_labels=int(set_t.sum()),
                )
            )
        return out

    def _check_pairing(self, step: int, out: LossOutput) -> HealthWarning | None:
        """copy_task on the first batch: every scored target == the input at its predicting position."""
        p = out.predictions
        scored = p.audio_target != IGNORE  # (M, K)
        n = int(scored.sum())
        if n < self.num_codebooks:
            return None  # too few pairs to tell; the per-step symptom check still runs
        same = int(((p.audio_target == p.audio_context) & scored).sum())
        if same != n:
            return None
        return self._emit(
            COPY_TASK,
            step,
            (
                f"every one of the {n} scored audio targets equals the audio input at the position whose logits "
                "are scored against it: the loss compares the logits at position t with the label at t, a copy "
                "task. The loss will fall to ~0 and the model will generate silence. The loss must score position "
                "t against the label at t+1 (HiggsLossModule does; check that this module is the one the wrapper "
                "calls and that it was not built with _debug_unshifted=True)."
            ),
            scored=n,
            equal_to_input=same,
        )

    # ------------------------------------------------------------------ per optimizer step
    def check_step(
        self,
        step: int,
        metrics: Mapping,
        *,
        grad_norm=None,
        sample_ids: Sequence[str] = (),
        last_checkpoint: str | None = None,
    ) -> list[HealthWarning]:
        """Checks on the step's (rank-reduced) metrics; call after clipping, before optimizer.step().

        Raises TrainingHealthError on a non-finite loss or grad norm when health.stop_on_nonfinite.
        With fp16 loss scaling, pass grad_norm=None on a step the scaler skipped.
        """
        new: list[HealthWarning | None] = [self._check_finite(step, metrics, grad_norm, sample_ids, last_checkpoint)]
        # -1 = counts not given (a hand-made metrics dict): no_signal is skipped, the loss checks still run
        n_text, n_audio = int(metrics.get("n_text_tokens", -1)), int(metrics.get("n_audio_tokens", -1))
        if self.audio_weight > 0 and n_audio == 0:
            new.append(
                self._emit(
                    NO_SIGNAL,
                    step,
                    (
                        f"step {step} scored no audio token on any rank while loss.audio_weight = "
                        f"{self.audio_weight}: check the audio labels of the target segments (higgs-tune inspect)."
                    ),
                )
            )
        if self.text_weight > 0 and n_text == 0:
            new.append(
                self._emit(
                    NO_SIGNAL,
                    step,
                    (
                        f"step {step} scored no text token on any rank while loss.text_weight = "
                        f"{self.text_weight}: check the text labels, or set loss.text_weight: 0."
                    ),
                )
            )
        if step >= self.cfg.chance_after_steps:
            new.append(self._check_chance(step, metrics, n_text, n_audio))
        if step < self.cfg.copy_check_steps and n_audio != 0 and "audio_acc" in metrics and "audio_loss" in metrics:
            acc, loss = float(metrics["audio_acc"]), float(metrics["audio_loss"])
            if acc > COPY_ACCURACY or loss < COPY_LOSS:
                new.append(
                    self._emit(
                        COPY_TASK,
                        step,
                        (
                            f"audio accuracy {acc:.3f} / audio loss {loss:.3f} at step {step}, before "
                            f"{self.cfg.copy_check_steps} steps: too good to be true. Most likely the loss "
                            "compares the logits at t with the label at t (a copy task: the model learns to "
                            "repeat its input and generates silence), or labels leak the target into the input. "
                            "Check the shift (position t predicts t+1) and the collator's labels. On a tiny, "
                            "repeated dataset fast memorisation can do this too: then raise "
                            "health.copy_check_steps."
                        ),
                        audio_acc=acc,
                        audio_loss=loss,
                    )
                )
        return [w for w in new if w is not None]

    def _check_finite(self, step, metrics, grad_norm, sample_ids, last_checkpoint) -> HealthWarning | None:
        values = {key: metrics.get(key) for key in ("loss", "text_loss", "audio_loss")}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        bad = {k: float(v) for k, v in values.items() if v is not None and not _finite(v)}
        if not bad:
            return None
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        ids = ", ".join(map(str, sample_ids)) or "(not given)"
        ckpt = (
            f"last good checkpoint: {last_checkpoint} (resume from it"
            if last_checkpoint
            else "no checkpoint saved yet (restart"
        )
        message = (
            f"step {step}: non-finite {what}. Samples in this step: {ids}. {ckpt} with a lower learning rate "
            "or bf16 instead of fp16). Likely causes: learning rate too high, fp16 overflow, a corrupt sample "
            "(inspect the ids above with `higgs-tune inspect`), NaN/Inf in the loaded weights."
        )
        if self.cfg.stop_on_nonfinite:
            raise TrainingHealthError(
                message + " Stopped before the optimizer step so no NaN reaches the weights (health.stop_on_nonfinite)."
            )
        return self._emit(
            NON_FINITE,
            step,
            message + " health.stop_on_nonfinite is false: this step must not be applied.",
            values=bad,
            sample_ids=list(map(str, sample_ids)),
            last_checkpoint=last_checkpoint,
        )

    def _check_chance(self, step: int, metrics: Mapping, n_text: int, n_audio: int) -> HealthWarning | None:
        tol = self.cfg.chance_tolerance
        parts = []

        def at_chance(loss: float, vocab: int) -> bool:
            return loss >= (1 - tol) * math.log(vocab)

        ln_c, ln_v = math.log(self.codebook_size), math.log(self.text_vocab_size)
        if self.audio_weight > 0 and n_audio != 0:
            audio = float(metrics["audio_loss"])
            if at_chance(audio, self.codebook_size):
                rel = "≈" if audio <= (1 + tol) * ln_c else ">"
                parts.append(f"audio loss {audio:.2f} {rel} ln({self.codebook_size})={ln_c:.2f}")
            else:
                per_cb = [float(x) for x in metrics.get("per_codebook_loss", [])]
                counts = metrics.get("n_audio_tokens_per_codebook", [1] * len(per_cb))
                stuck = [
                    (k, x)
                    for k, (x, n) in enumerate(zip(per_cb, counts, strict=True))
                    if n and at_chance(x, self.codebook_size)
                ]
                if stuck:
                    parts.append(
                        "codebook(s) "
                        + ", ".join(f"{k} ({x:.2f})" for k, x in stuck)
                        + f" at ln({self.codebook_size})={ln_c:.2f}"
                    )
        if self.text_weight > 0 and n_text != 0:
            text = float(metrics["text_loss"])
            if at_chance(text, self.text_vocab_size):
                rel = "≈" if text <= (1 + tol) * ln_v else ">"
                parts.append(f"text loss {text:.2f} {rel} ln({self.text_vocab_size})={ln_v:.2f}")
        if not parts:
            return None
        return self._emit(
            CHANCE_LEVEL,
            step,
            (
                "; ".join(parts)
                + f" after {step} steps: the model is not learning (a loss at ln(V) is a uniform guess). Check the "
                "learning rate (too low: flat; too high: at or above chance), that the trainable parameters "
                "receive gradients (finetune.pathways / train_modules, and that the optimizer holds them), that "
                "labels are aligned (higgs-tune inspect), and that a frozen random head is not being trained "
                "through LoRA alone."
            ),
            metrics={k: metrics.get(k) for k in ("loss", "text_loss", "audio_loss", "per_codebook_loss")},
        )


# ----------------------------------------------------------------------------- before the model loads
def check_trainable(stats: dict) -> None:
    """Raise TrainingHealthError when a batch cannot train a TTS model that stops by itself.

    `stats`: `higgs_tune.data.inspect.batch_statistics` of the first batches (the recipe runs it
    before the model loads; `higgs-tune inspect --batches` too).

    Per batch: at least one trained target audio token; in every codebook at least one stream
    EOS label (without it the model never learns to stop), and exactly one per target segment;
    no trained reference audio (the prompt's voice is given, not predicted); stream BOS never a
    label.
    """
    if not stats["batches"]:
        raise TrainingHealthError(
            "no training batch was built: the training cache is empty or every sample was dropped. Run `higgs-tune "
            "inspect CACHE_DIR` to see what the cache holds."
        )
    fix = (
        "Build samples with higgs_tune.data.layout.build_sample (targets trained, references masked); run "
        "`higgs-tune inspect CACHE_DIR --config CONFIG --batches N` to see the labels."
    )
    for b in stats["batches"]:
        where = f"batch {b['index']} (samples {', '.join(b['sample_ids'])})"
        target = b["audio"]["target"]
        if sum(target["trained"]) == 0:
            raise TrainingHealthError(
                f"{where} has no trained audio token: every audio label is -100, so the audio loss has no signal. {fix}"
            )
        missing = [c for c, n in enumerate(b["stream"]["eos_labels"]) if n == 0]
        if missing:
            raise TrainingHealthError(
                f"{where} has no stream EOS label in codebook(s) {', '.join(map(str, missing))}: the model would "
                "never learn to stop (minutes of silence at generation). Each target segment needs its first EOS "
                f"per codebook as a label. {fix}"
            )
        wrong = [c for c, n in enumerate(target["eos_labels"]) if n != target["segments"]]
        if wrong:
            raise TrainingHealthError(
                f"{where} has {[target['eos_labels'][c] for c in wrong]} stream EOS labels in codebook(s) "
                f"{', '.join(map(str, wrong))} for {target['segments']} target segment(s): each target segment "
                f"must label exactly its first EOS per codebook. {fix}"
            )
        ref = b["audio"]["reference"]
        if sum(ref["trained"]):
            raise TrainingHealthError(
                f"{where} trains {sum(ref['trained'])} reference audio label(s): the voice prompt would be learned "
                f"as a target. Reference segments must be all -100. {fix}"
            )
        if sum(b["stream"]["bos_labels"]):
            raise TrainingHealthError(
                f"{where} has {sum(b['stream']['bos_labels'])} stream BOS label(s): BOS is an input, never a "
                f"label. {fix}"
            )

"""What a prepared cache holds and what training will see (`higgs-tune inspect`).

Three views, each a function returning plain data plus a text renderer:

- `summarize_cache(cache)`: clips, hours, speakers, languages, a duration histogram
  (`data.plot.write_histogram_png` draws it), text-rate outliers (characters per second far from the
  speaker's usual rate: likely transcript mismatches) and the rows `prepare` rejected.
- `batch_statistics(batches)`: per batch and in total, sequence lengths, padding waste,
  trained vs masked text and audio tokens per segment role and codebook, stream BOS/EOS
  counts in inputs and labels, the share of positions that carry a loss.
  `check_trainable(stats)` judges them: it raises when a batch could not teach the model
  anything useful (no trained audio token, a codebook without an EOS label).
- `render_sample(...)`: one sample token by token, labels under each position, beside the
  prompt generation would build for it (`layout.build_prompt`), checked to agree.
  (v2; v3's renderer, `families/v3/inspect.py`, shares `token_text`, `code_text`,
  `collapsed_text` and `training_index`.)

Nothing here imports `train/`: the batches come from the caller (`data.pipeline.build_train_data`
and `data.pipeline.first_batches`, what `train` itself uses).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from higgs_tune.data.bpe_bytes import piece_bytes
from higgs_tune.data.layout import IGNORE_INDEX as IGNORE
from higgs_tune.data.layout import ROLE_REFERENCE, ROLE_TARGET
from higgs_tune.errors import DataError, TrainingHealthError

ROLE_NAMES = {ROLE_REFERENCE: "reference", ROLE_TARGET: "target"}

# ----------------------------------------------------------------------------- cache summary


@dataclass(frozen=True)
class RateOutlier:
    """A clip whose characters per second are far from its speaker's (or language's) median."""

    id: str
    speaker: str
    language: str
    chars: int
    duration_s: float
    chars_per_s: float
    reference_cps: float  # the median it is compared with
    reference: str  # "speaker en_a (8 clips)" or "language ar (12 clips)"
    ratio: float  # chars_per_s / reference_cps
    robust_z: float | None  # 0.6745 (x - median) / MAD, None when MAD is 0 or too few clips
    reason: str


def _nice_width(span: float, target_bins: int) -> float:
    """A round bin width (1, 2, 2.5 or 5 x 10^k seconds) giving about `target_bins` bins."""
    if span <= 0:
        return 0.5
    raw = span / target_bins
    mag = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if step * mag >= raw:
            return step * mag
    return 10 * mag


def duration_histogram(
    durations: Sequence[float], bin_width: float | None = None, target_bins: int = 12
) -> list[tuple[float, float, int]]:
    """Counts of clips per duration bin: [(lo, hi, count)], bins aligned to multiples of the width.

    A clip of exactly `hi` seconds falls in the next bin ([lo, hi) intervals); the last bin
    always contains the longest clip.
    """
    if not durations:
        return []
    lo_d, hi_d = min(durations), max(durations)
    width = bin_width or _nice_width(hi_d - lo_d, target_bins)
    start = math.floor(lo_d / width + 1e-9) * width
    n = max(1, math.floor((hi_d - start) / width + 1e-9) + 1)
    counts = [0] * n
    for d in durations:
        counts[min(n - 1, int(math.floor((d - start) / width + 1e-9)))] += 1
    return [(round(start + i * width, 6), round(start + (i + 1) * width, 6), c) for i, c in enumerate(counts)]


def _text_chars(text: str) -> int:
    """Characters that take time to speak: whitespace is not counted."""
    return sum(1 for ch in text if not ch.isspace())


def text_rate_outliers(
    entries: Iterable, low: float = 0.5, high: float = 2.0, z_limit: float = 3.5, min_group: int = 3
) -> list[RateOutlier]:
    """Clips whose characters per second fall outside [low, high] x their reference median,
    or whose robust z-score (median/MAD, Iglewicz-Hoaglin) exceeds `z_limit`.

    The reference is the speaker's clips when the speaker has at least `min_group` of them,
    else all clips of the same language (rates depend on the script: Arabic is written with
    fewer characters per second of speech than English). The z-score rule needs 5 clips in the
    group and also a ratio outside [0.8, 1.25], so a very regular speaker does not make every
    small deviation an outlier.
    """
    rows = [(e, _text_chars(e.text) / e.duration_s) for e in entries if e.duration_s > 0]
    by_speaker: dict[str, list[float]] = defaultdict(list)
    by_language: dict[str, list[float]] = defaultdict(list)
    for e, cps in rows:
        by_speaker[e.speaker].append(cps)
        by_language[e.language or "?"].append(cps)
    out = []
    for e, cps in rows:
        if len(by_speaker[e.speaker]) >= min_group:
            group, ref_name = by_speaker[e.speaker], f"speaker {e.speaker}"
        else:
            group, ref_name = by_language[e.language or "?"], f"language {e.language or '?'}"
        ref_name += f" ({len(group)} clips)"
        med = statistics.median(group)
        ratio = cps / med if med > 0 else float("inf")
        mad = statistics.median(abs(x - med) for x in group)
        z = 0.6745 * (cps - med) / mad if mad > 0 and len(group) >= 5 else None
        reason = ""
        if ratio < low:
            reason = f"{ratio:.2f}x the median rate (< {low}x): transcript too short for the audio, or long silence"
        elif ratio > high:
            reason = f"{ratio:.2f}x the median rate (> {high}x): transcript too long for the audio, or audio cut"
        elif z is not None and abs(z) > z_limit and not 0.8 <= ratio <= 1.25:
            reason = f"robust z-score {z:+.1f} (|z| > {z_limit}) at {ratio:.2f}x the median rate"
        if reason:
            out.append(
                RateOutlier(
                    e.id, e.speaker, e.language, _text_chars(e.text), e.duration_s, cps, med, ref_name, ratio, z, reason
                )
            )
    return out


def summarize_cache(cache) -> dict:
    """Plain-data summary of an opened `CodeCache` (JSON-serialisable)."""
    entries = list(cache.entries)
    asr_rows = [{"id": e.id, "text": e.text, "source": e.text_source} for e in entries if e.text_source]
    durations = [e.duration_s for e in entries]
    speakers: dict[str, dict] = {}
    for e in entries:
        s = speakers.setdefault(e.speaker, {"clips": 0, "seconds": 0.0, "languages": Counter()})
        s["clips"] += 1
        s["seconds"] += e.duration_s
        s["languages"][e.language or "?"] += 1
    languages = Counter(e.language or "?" for e in entries)
    language_seconds: Counter = Counter()
    for e in entries:
        language_seconds[e.language or "?"] += e.duration_s
    rejects = list(cache.rejects)
    return {
        "cache_dir": str(cache.cache_dir),
        "prepared_with": cache.header.get("command") or "",
        "asr_transcribed": asr_rows,
        "clips": len(entries),
        "seconds": sum(durations),
        "hours": sum(durations) / 3600.0,
        "frames": sum(e.num_frames for e in entries),
        "num_codebooks": cache.num_codebooks,
        "frame_rate": cache.frame_rate,
        "duration_s": {
            "min": min(durations) if durations else 0.0,
            "median": statistics.median(durations) if durations else 0.0,
            "max": max(durations) if durations else 0.0,
        },
        "speakers": {
            k: {"clips": v["clips"], "seconds": v["seconds"], "languages": dict(v["languages"])}
            for k, v in sorted(speakers.items())
        },
        "languages": {k: {"clips": languages[k], "seconds": language_seconds[k]} for k in sorted(languages)},
        "with_reference": sum(1 for e in entries if e.ref_key),
        "with_scene": sum(1 for e in entries if e.scene),
        "histogram": duration_histogram(durations),
        "outliers": [asdict(o) for o in text_rate_outliers(entries)],
        "rejects": rejects,
        "reject_reasons": dict(Counter(k for r in rejects for k in reason_kinds(r.get("reason", "")))),
    }


def reason_kinds(reason: str) -> list[str]:
    """The kinds of problem in a rejects.jsonl reason, to count rejects by kind.

    A reason lists "field: message" parts joined by "; " (`manifest.validate_manifest`); the
    quoted value, the details after a colon, parenthesised notes and counts are dropped:
    "audio: 'a.wav' is too short: 0.100 s < 0.3 s; text: is empty" -> ["audio is too short", "text is empty"].
    """
    kinds = []
    for part in filter(None, (p.strip() for p in reason.split("; "))):
        field, _, message = part.partition(": ")
        if not message:
            field, message = "", field
        message = re.sub(r"'[^']*'", "", message).replace("(s)", "s")
        message = re.sub(r"\b\d+\b", "", re.sub(r"\([^)]*\)", "", message)).split(":", 1)[
            0
        ]  # counts do not split a kind
        kinds.append(" ".join(f"{field} {message}".split()) or "unknown")
    return kinds or ["unknown"]


def _bar(count: int, top: int, width: int = 40) -> str:
    return "#" * (round(width * count / top) if top else 0)


def render_summary(s: dict) -> str:
    """The summary as terminal text."""
    lines = [
        f"cache        {s['cache_dir']}",
        f"clips        {s['clips']}  ({s['hours']:.3f} h = {s['seconds']:.1f} s, {s['frames']} frames at "
        f"{s['frame_rate']} fps, {s['num_codebooks']} codebooks)",
        f"durations    min {s['duration_s']['min']:.2f} s, median {s['duration_s']['median']:.2f} s, max "
        f"{s['duration_s']['max']:.2f} s",
        f"prompts      {s['with_reference']} clip(s) with an explicit reference, {s['with_scene']} with a scene "
        "description",
        "",
        f"speakers ({len(s['speakers'])})",
    ]
    for name, v in s["speakers"].items():
        langs = ", ".join(f"{k} {n}" for k, n in sorted(v["languages"].items()))
        lines.append(f"  {name:<20} {v['clips']:>6} clips {v['seconds'] / 60:>9.2f} min   [{langs}]")
    lines.append(f"languages ({len(s['languages'])})")
    for name, v in s["languages"].items():
        lines.append(f"  {name:<20} {v['clips']:>6} clips {v['seconds'] / 60:>9.2f} min")
    lines.append("")
    lines.append("duration histogram (seconds)")
    top = max((c for _, _, c in s["histogram"]), default=0)
    for lo, hi, c in s["histogram"]:
        lines.append(f"  {lo:>7.2f} - {hi:<7.2f} {c:>6}  {_bar(c, top)}")
    lines.append("")
    if s["outliers"]:
        lines.append(f"text/audio length outliers ({len(s['outliers'])}): check these transcripts")
        for o in s["outliers"]:
            lines.append(
                f"  {o['id']}: {o['chars']} chars in {o['duration_s']:.2f} s = {o['chars_per_s']:.1f} chars/s vs "
                f"median {o['reference_cps']:.1f} of {o['reference']}: {o['reason']}"
            )
    else:
        lines.append(
            "text/audio length outliers: none (every clip within 0.5x-2x of its speaker's median characters/s, no "
            "robust z-score beyond 3.5)"
        )
    lines.append("")
    if s["rejects"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["reject_reasons"].items()))
        lines.append(f"rejected at prepare ({len(s['rejects'])} rows; rejects.jsonl): {kinds}")
        for r in s["rejects"]:
            where = f"row {r['row']}" if r.get("row") is not None else ""
            ident = r.get("id") or "?"
            lines.append(
                f"  {ident} ({where}): {r.get('reason', '')}" if where else f"  {ident}: {r.get('reason', '')}"
            )
    else:
        lines.append("rejected at prepare: none")
    if s.get("asr_transcribed"):
        lines.append(f"transcribed by ASR ({len(s['asr_transcribed'])} clips; check these transcripts)")
        for r in s["asr_transcribed"]:
            lines.append(f"  {r['id']} ({r['source']}): {r['text']!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batch statistics


def _segment_starts(audio_input_ids, mask, stream_bos_id: int):
    """(B, N) bool: the first column of each audio segment (all K codebooks hold stream BOS there).

    With the delay pattern, codebook k opens a segment with k+1 BOS, so only the first column
    is BOS in every codebook; padding columns (mask False) are never a start.
    """
    return (audio_input_ids == stream_bos_id).all(-1) & mask


def _one_batch(batch, index: int, stream_bos_id: int, stream_eos_id: int) -> dict:
    ids, att = batch["input_ids"], batch["attention_mask"].bool()
    labels = batch["labels"]
    a_in, a_mask = batch["audio_input_ids"], batch["audio_input_ids_mask"].bool()
    a_lab, roles = batch["audio_labels"], batch["audio_roles"]
    bsz, length = ids.shape
    k = a_in.shape[-1]
    if ((roles != 0) != a_mask).any():
        bad = int(((roles != 0) != a_mask).nonzero()[0, 0])
        raise DataError(
            f"batch {index}, sample {batch['sample_ids'][bad]}: audio_roles and audio_input_ids_mask disagree "
            "(a real audio column without a role, or a role on padding). The collator built an inconsistent batch."
        )
    row_tokens = att.sum(1)  # (B,)
    row_audio = a_mask.sum(1)  # (B,)
    text_total = int((row_tokens - row_audio).sum())
    text_trained = int((labels != IGNORE).sum())
    starts = _segment_starts(a_in, a_mask, stream_bos_id)
    audio = {}
    for role, name in ROLE_NAMES.items():
        sel = (roles == role) & a_mask  # (B, N)
        cols = int(sel.sum())
        trained = [int(((a_lab[..., c] != IGNORE) & sel).sum()) for c in range(k)]
        audio[name] = {
            "segments": int((starts & sel).sum()),
            "columns": cols,
            "trained": trained,
            "masked": [cols - t for t in trained],
            "eos_labels": [int(((a_lab[..., c] == stream_eos_id) & sel).sum()) for c in range(k)],
        }
    real = a_mask.unsqueeze(-1)  # (B, N, 1)
    stream = {
        "bos_inputs": [int(v) for v in ((a_in == stream_bos_id) & real).sum((0, 1))],
        "eos_inputs": [int(v) for v in ((a_in == stream_eos_id) & real).sum((0, 1))],
        "bos_labels": [int(v) for v in (a_lab == stream_bos_id).sum((0, 1))],
        "eos_labels": [int(v) for v in (a_lab == stream_eos_id).sum((0, 1))],
    }
    audio_loss_cols = int(((a_lab != IGNORE).any(-1) & a_mask).sum())
    tokens = int(row_tokens.sum())
    loss_positions = text_trained + audio_loss_cols
    return {
        "index": index,
        "sample_ids": list(batch["sample_ids"]),
        "batch_size": bsz,
        "padded_length": length,
        "lengths": [int(v) for v in row_tokens],
        "tokens": tokens,
        "padded_tokens": bsz * length,
        "padding_waste": 1.0 - tokens / (bsz * length) if bsz * length else 0.0,
        "text": {"total": text_total, "trained": text_trained, "masked": text_total - text_trained},
        "audio": audio,
        "stream": stream,
        "loss_positions": loss_positions,
        "loss_share": loss_positions / tokens if tokens else 0.0,
        "num_codebooks": k,
    }


def batch_statistics(batches: Iterable[dict], stream_bos_id: int = 1024, stream_eos_id: int = 1025) -> dict:
    """Token accounting of collated batches (the `collate` contract), per batch and in total.

    Returns {"batches": [per-batch dict], "total": dict with the same counting keys}. Counts:
    - text: real positions that are not audio placeholders; trained = text label != -100.
    - audio[role] (reference/target): real audio columns of that role; per codebook, trained =
      audio label != -100, masked = columns - trained; segments = columns where all codebooks
      hold stream BOS; eos_labels = labels equal to stream EOS.
    - stream: BOS/EOS counts per codebook in the audio inputs (real columns) and labels.
    - loss_positions: text positions with a label + audio columns with a label in any
      codebook; loss_share = loss_positions / real tokens.
    """
    per = [_one_batch(b, i, stream_bos_id, stream_eos_id) for i, b in enumerate(batches)]
    if not per:
        return {"batches": [], "total": None}
    k = per[0]["num_codebooks"]
    if any(p["num_codebooks"] != k for p in per):
        raise DataError(f"batches disagree on the number of codebooks: {sorted({p['num_codebooks'] for p in per})}.")

    def add(lists):
        return [sum(v) for v in zip(*lists, strict=True)]

    lengths = [n for p in per for n in p["lengths"]]
    tokens = sum(p["tokens"] for p in per)
    padded = sum(p["padded_tokens"] for p in per)
    loss_positions = sum(p["loss_positions"] for p in per)
    text = {key: sum(p["text"][key] for p in per) for key in ("total", "trained", "masked")}
    audio = {}
    for name in ROLE_NAMES.values():
        audio[name] = {
            "segments": sum(p["audio"][name]["segments"] for p in per),
            "columns": sum(p["audio"][name]["columns"] for p in per),
            **{key: add([p["audio"][name][key] for p in per]) for key in ("trained", "masked", "eos_labels")},
        }
    stream = {key: add([p["stream"][key] for p in per]) for key in per[0]["stream"]}
    total = {
        "batches": len(per),
        "samples": sum(p["batch_size"] for p in per),
        "length_min": min(lengths),
        "length_mean": sum(lengths) / len(lengths),
        "length_max": max(lengths),
        "tokens": tokens,
        "padded_tokens": padded,
        "padding_waste": 1.0 - tokens / padded if padded else 0.0,
        "text": text,
        "audio": audio,
        "stream": stream,
        "loss_positions": loss_positions,
        "loss_share": loss_positions / tokens if tokens else 0.0,
        "num_codebooks": k,
    }
    return {"batches": per, "total": total}


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:5.1f}%" if d else "    -"


def _render_counts(s: dict, indent: str) -> list[str]:
    k = s["num_codebooks"]
    t = s["text"]
    lines = [
        f"{indent}text tokens   {t['total']:>7}  trained {t['trained']:>6} ({_pct(t['trained'], t['total'])})  "
        f"masked {t['masked']:>7}"
    ]
    for name in ROLE_NAMES.values():
        a = s["audio"][name]
        if not a["columns"]:
            lines.append(f"{indent}{name:<9} audio: none")
            continue
        tr, ms = a["trained"], a["masked"]
        lines.append(
            f"{indent}{name:<9} audio: {a['segments']} segment(s), {a['columns']} columns x {k} codebooks = "
            f"{a['columns'] * k} tokens; trained {sum(tr)} ({_pct(sum(tr), a['columns'] * k)}), masked {sum(ms)}"
        )
        lines.append(f"{indent}  trained per codebook {tr}")
        lines.append(f"{indent}  EOS labels per codebook {a['eos_labels']}")
    st = s["stream"]
    lines.append(f"{indent}stream BOS  inputs {st['bos_inputs']}  labels {st['bos_labels']}")
    lines.append(f"{indent}stream EOS  inputs {st['eos_inputs']}  labels {st['eos_labels']}")
    lines.append(
        f"{indent}positions with a loss {s['loss_positions']} of {s['tokens']} real tokens "
        f"({_pct(s['loss_positions'], s['tokens']).strip()})"
    )
    return lines


def render_batch_statistics(stats: dict) -> str:
    lines = []
    for b in stats["batches"]:
        lens = b["lengths"]
        lines.append(
            f"batch {b['index']}: {b['batch_size']} sample(s) [{', '.join(b['sample_ids'])}], padded length "
            f"{b['padded_length']}, lengths {min(lens)}-{max(lens)}, padding waste {100 * b['padding_waste']:.1f}%"
        )
        lines += _render_counts(b, "  ")
    t = stats["total"]
    if t is None:
        return "no batches"
    lines.append("")
    lines.append(
        f"total: {t['batches']} batch(es), {t['samples']} sample(s), lengths {t['length_min']}-{t['length_max']} "
        f"(mean {t['length_mean']:.1f}), {t['tokens']} real of {t['padded_tokens']} padded tokens, padding waste "
        f"{100 * t['padding_waste']:.1f}%"
    )
    lines += _render_counts(t, "  ")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one sample, token by token

MASK = "·"


def check_prompt_matches(sample: dict, prompt: dict, tokens) -> int:
    """Assert that the generation prompt equals the training sample up to the target audio.

    The prompt (`layout.build_prompt`) must be the sample's first P tokens, where P is the
    target segment's first placeholder (right after the target `<|audio_out_bos|>`), and its
    audio columns must be the sample's reference columns. Returns P; raises DataError naming
    the first differing position otherwise (training and inference layouts would differ:
    failure mode 8 of the known trainer bugs).
    """
    sid = sample.get("sample_id", "")
    targets = [s for s in sample["segments"] if s.role == ROLE_TARGET]
    if len(targets) != 1:
        raise DataError(f"sample {sid!r} has {len(targets)} target audio segments; a training sample has exactly one.")
    cut = targets[0].token_start
    p_ids = prompt["input_ids"][0]
    s_ids = sample["input_ids"]
    if p_ids.shape[0] != cut or not bool((p_ids == s_ids[:cut]).all()):
        n = min(p_ids.shape[0], cut)
        diff = next((i for i in range(n) if int(p_ids[i]) != int(s_ids[i])), n)
        raise DataError(
            f"sample {sid!r}: the generation prompt ({p_ids.shape[0]} tokens) differs from the training sample "
            f"before its target audio ({cut} tokens) at position {diff}. Training and inference would see "
            "different layouts; both must come from higgs_tune.data.layout."
        )
    ref_cols = targets[0].audio_start
    p_audio = prompt.get("audio_input_ids")
    p_audio = p_audio[0] if p_audio is not None else sample["audio_input_ids"][:0]
    if p_audio.shape != sample["audio_input_ids"][:ref_cols].shape or not bool(
        (p_audio == sample["audio_input_ids"][:ref_cols]).all()
    ):
        raise DataError(
            f"sample {sid!r}: the generation prompt's audio columns {tuple(p_audio.shape)} differ from the "
            f"training sample's reference columns {tuple(sample['audio_input_ids'][:ref_cols].shape)}."
        )
    if int(tokens.audio_out_bos) != int(s_ids[cut - 1]):
        raise DataError(f"sample {sid!r}: the prompt does not end with <|audio_out_bos|>; the layout is broken.")
    return cut


def _escape(text: str) -> str:
    """Quote a token's text; bytes that are not whole UTF-8 characters (surrogate-escaped) as \\xNN."""
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"'}.get(ch, ch))
    return '"' + "".join(out) + '"'


def _token_text(tokenizer, tok: int, tokens, special_ids: set[int]) -> str:
    if tok == tokens.audio_out:
        return "AO"
    if tok == tokens.audio_delay:
        return "D"
    return token_text(tokenizer, tok, special_ids)


def token_text(tokenizer, tok: int, special_ids: set[int]) -> str:
    """One token as `--show` prints it: markup (`special_ids`) by name, text decoded and quoted."""
    if tok in special_ids:
        return tokenizer.convert_ids_to_tokens(tok)
    text = tokenizer.decode([tok])
    if "\ufffd" in text:
        # A byte-level BPE token can hold part of a multi-byte character (Arabic diacritics,
        # CJK, emoji): decoding it alone gives U+FFFD. Show its bytes instead (e.g. "\\xd9").
        raw = piece_bytes(tokenizer.convert_ids_to_tokens(tok))
        if raw is not None:
            text = raw.decode("utf-8", errors="surrogateescape")
    return _escape(text)


def code_text(v: int, tokens) -> str:
    """An audio code or label: -100 as the mask mark, `tokens.stream_bos` as B, `tokens.stream_eos` as E."""
    if v == IGNORE:
        return MASK
    if v == tokens.stream_bos:
        return "B"
    if v == tokens.stream_eos:
        return "E"
    return str(v)


def render_sample(sample: dict, prompt: dict, tokenizer, tokens) -> str:
    """One sample token by token, labels beside each position, the generation prompt alongside.

    Columns: position, token (text in quotes, chat markup by name, AO/D for audio placeholders),
    its text label, for audio positions the column's K input codes and K labels, and the token
    the generation prompt (`build_prompt`) holds at that position. Raises DataError (via
    `check_prompt_matches`) when prompt and sample disagree before the target audio.
    """
    cut = check_prompt_matches(sample, prompt, tokens)
    k = tokens.num_codebooks
    special_ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    ids = [int(t) for t in sample["input_ids"]]
    labels = [int(t) for t in sample["labels"]]
    p_ids = [int(t) for t in prompt["input_ids"][0]]
    a_in, a_lab = sample["audio_input_ids"], sample["audio_labels"]
    segs = sample["segments"]
    by_start = {s.token_start: s for s in segs}
    seg_of = {}
    for s in segs:
        for pos in range(s.token_start, s.token_end):
            seg_of[pos] = s

    def role(s):
        return "reference" if s.role == ROLE_REFERENCE else "target"

    describe = ", ".join(f"{role(s)} {s.num_frames} frames" for s in segs)
    task = sample.get("task", "")
    ref = sample.get("reference")
    head = [
        f"sample {sample.get('sample_id', '')}: {task}"
        + (f", reference {ref}" if ref else "")
        + f"; {len(ids)} tokens, {len(segs)} audio segment(s) ({describe}), {k} codebooks",
        "text: " + _collapsed_text(tokenizer, ids, tokens),
        f"legend: AO = <|AUDIO_OUT|>, D = <|reserved_special_token_6|> (delay), B = stream BOS {tokens.stream_bos}, "
        f"E = stream EOS {tokens.stream_eos}, {MASK} = -100 (no loss)",
        "",
    ]
    tok_w = max(12, *(len(_token_text(tokenizer, t, tokens, special_ids)) for t in ids))
    lab_w = (
        max(10, *(len(_token_text(tokenizer, t, tokens, special_ids)) for t in labels if t != IGNORE))
        if any(t != IGNORE for t in labels)
        else 10
    )
    code_w = max(len(str(tokens.stream_eos)), 4)
    codes_w = k * (code_w + 1) - 1
    lines = head + [
        f"{'pos':>5}  {'token':<{tok_w}}  {'label':<{lab_w}} | {'col':>4}  "
        f"{'audio input k0..k' + str(k - 1):<{codes_w}}  {'audio label k0..k' + str(k - 1):<{codes_w}} | prompt"
    ]
    for pos, tok in enumerate(ids):
        if pos == cut:
            lines.append(f"----- prompt ends here ({cut} tokens): generation continues with the target audio")
        if pos in by_start:
            s = by_start[pos]
            what = "all labels masked" if s.role == ROLE_REFERENCE else "trained: codes + one EOS per codebook"
            lines.append(
                f"----- {role(s)} audio: {s.num_frames} frames -> {s.token_end - s.token_start} columns, tokens "
                f"{s.token_start}-{s.token_end - 1}, audio columns {s.audio_start}-{s.audio_end - 1} ({what})"
            )
        tok_s = _token_text(tokenizer, tok, tokens, special_ids)
        lab_s = MASK if labels[pos] == IGNORE else _token_text(tokenizer, labels[pos], tokens, special_ids)
        if pos in seg_of:
            c = seg_of[pos].audio_start + (pos - seg_of[pos].token_start)
            ins = " ".join(f"{code_text(int(v), tokens):>{code_w}}" for v in a_in[c])
            labs = " ".join(f"{code_text(int(v), tokens):>{code_w}}" for v in a_lab[c])
            audio = f"{c:>4}  {ins}  {labs}"
        else:
            audio = f"{'':>4}  {'':<{codes_w}}  {'':<{codes_w}}"
        p_s = _token_text(tokenizer, p_ids[pos], tokens, special_ids) if pos < len(p_ids) else ""
        lines.append(f"{pos:>5}  {tok_s:<{tok_w}}  {lab_s:<{lab_w}} | {audio} | {p_s}".rstrip())
    lines.append("")
    lines.append("prompt matches training sample up to target audio: yes")
    return "\n".join(lines)


def _collapsed_text(tokenizer, ids: list[int], tokens) -> str:
    """The decoded sample with each run of audio placeholders shown as [audio: N columns]."""
    return collapsed_text(tokenizer, ids, {tokens.audio_out, tokens.audio_delay}, "columns")


def collapsed_text(tokenizer, ids: list[int], audio_ids: set[int], unit: str) -> str:
    """`ids` decoded, each run of `audio_ids` shown as [audio: N `unit`], newlines as \\n."""
    parts, run, chunk = [], 0, []
    for t in ids + [None]:
        if t is not None and t in audio_ids:
            if chunk:
                parts.append(tokenizer.decode(chunk))
                chunk = []
            run += 1
            continue
        if run:
            parts.append(f"[audio: {run} {unit}]")
            run = 0
        if t is not None:
            chunk.append(t)
    if chunk:
        parts.append(tokenizer.decode(chunk))
    return "".join(parts).replace("\n", "\\n")


# ----------------------------------------------------------------------------- what training builds


def check_cache_fits_model(cache, tokens, model_name: str) -> None:
    """A cache prepared with another model's audio tokenizer cannot feed this model."""
    if cache.num_codebooks != tokens.num_codebooks:
        made_with = cache.header.get("codec_source") or "another audio tokenizer"
        raise DataError(
            f"{cache.cache_dir} holds codes with {cache.num_codebooks} codebooks (prepared with {made_with}), but "
            f"the model {model_name} has {tokens.num_codebooks}. The cache belongs to another model: prepare the "
            f"data with this model: higgs-tune prepare MANIFEST --model {model_name} --out NEW_CACHE_DIR."
        )
    if cache.codebook_size != tokens.stream_bos:
        raise DataError(
            f"{cache.cache_dir} holds codes of a {cache.codebook_size}-code codebook, but the model {model_name} "
            f"expects {tokens.stream_bos} codes (stream BOS id {tokens.stream_bos}). Prepare the data with this "
            "model's audio tokenizer."
        )


def training_index(dataset, sample_id: str) -> int:
    """The dataset index of clip `sample_id`; DataError when it is held out or unknown (listing some ids)."""
    index = next((i for i, e in enumerate(dataset.entries) if e.id == sample_id), None)
    if index is None:
        in_cache = any(e.id == sample_id for e in dataset.cache.entries)
        if in_cache:
            raise DataError(
                f"clip {sample_id!r} is in {dataset.cache.cache_dir} but held out of training (data.eval_fraction "
                "split). Show a training clip, or set data.eval_fraction: 0 to inspect every clip."
            )
        known = [e.id for e in dataset.entries]
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise DataError(
            f"no clip with id {sample_id!r} in {dataset.cache.cache_dir} ({len(known)} training clips: {shown}). "
            "Check the id (ids are the manifest's `id` values)."
        )
    return index


def sample_and_prompt(dataset, sample_id: str) -> tuple[dict, dict]:
    """The training sample `sample_id` of the dataset's current epoch and its generation prompt."""
    from higgs_tune.data.layout import Conversation, build_prompt

    index = training_index(dataset, sample_id)
    sample = dataset[index]
    plan, entry = dataset.plan(index), dataset.entries[index]
    conv = Conversation(
        text=entry.text,
        system_prompt=dataset.system_prompt,
        scene=entry.scene if dataset.use_scene else None,
        ref_text=plan.ref_text,
    )
    ref_codes = dataset.cache.codes(plan.ref_key) if plan.ref_key is not None else None
    prompt = build_prompt(conv, dataset.tokenizer, dataset.tokens, ref_codes=ref_codes, sample_id=sample_id)
    return sample, prompt


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

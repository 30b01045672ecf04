"""v3 training data: the dataset's sample layout, the collator and the first-batch check.

`V3SampleLayout` plugs `layout.build_v3_sample` into `data.dataset.TTSDataset` (the same
dataset, reference choice, held-out split and token-budget sampler as v2): a TTS sample is
`<|tts|> <|text|> text <|audio|>` + T+7 slots; a voice-cloning sample adds
`[<|ref_text|> transcript] <|ref_audio|>` + T_ref+7 slots, so its length is the TTS length plus
the reference part's, as the dataset's planner needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from higgs_tune.errors import DataError, TrainingHealthError
from higgs_tune.families.v3.layout import (
    AUDIO_SLOT,
    BOC,
    EOC,
    IGNORE_INDEX,
    ROLE_REFERENCE,
    ROLE_TARGET,
    EocLabels,
    V3Tokens,
    build_v3_sample,
    collate_v3,
)


def _text_ids(tokenizer, tokens: V3Tokens, texts: Sequence[str], what: str, sample_ids: Sequence[str]):
    """Token ids of each text; one DataError naming every row with empty text or v3 markup in it."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    bad = []
    for sid, text, ids in zip(sample_ids, texts, encoded, strict=True):
        if text is None or not str(text).strip():
            bad.append(f"{sid} ({what} is empty)")
            continue
        found = sorted({i for i in ids if i in tokens.special_ids})
        if found:
            bad.append(f"{sid} ({what} contains {', '.join(tokenizer.convert_ids_to_tokens(found))})")
    if bad:
        raise DataError(
            f"{len(bad)} sample(s) have text the v3 prompt cannot carry: {'; '.join(bad[:20])}"
            f"{' ...' if len(bad) > 20 else ''}. Control tags and prompt markers (<|tts|>, <|audio|>, ...) "
            "are v3 tokenizer markup, not speech: remove them from these manifest rows and re-run `higgs-tune prepare`."
        )
    return encoded


class V3SampleLayout:
    """`data.dataset.SampleLayout` for v3 (`eoc_labels`: "all" or "first", see layout.target_labels)."""

    def __init__(self, eoc_labels: EocLabels = "all"):
        self.eoc_labels = eoc_labels

    def tts_lengths(self, entries: Sequence, tokenizer, tokens: V3Tokens) -> list[int]:
        ids = _text_ids(tokenizer, tokens, [e.text for e in entries], "text", [e.id for e in entries])
        # <|tts|> <|text|> text <|audio|> + T+K-1 slots
        return [3 + len(i) + tokens.num_rows(e.num_frames) for i, e in zip(ids, entries, strict=True)]

    def reference_lengths(self, ref_texts, ref_frames, tokenizer, tokens: V3Tokens, sample_ids) -> list[int]:
        ids = _text_ids(tokenizer, tokens, list(ref_texts), "reference transcript", list(sample_ids))
        if tokens.ref_text is None:  # build_v3_sample refuses a transcript then; measured as it would be sent
            return [1 + tokens.num_rows(f) for f in ref_frames]
        # <|ref_text|> transcript <|ref_audio|> + T_ref+K-1 slots
        return [2 + len(i) + tokens.num_rows(f) for i, f in zip(ids, ref_frames, strict=True)]

    def build(self, entry, tokenizer, tokens, *, target_codes, ref_codes, ref_text, reference):
        sample = build_v3_sample(
            tokenizer,
            tokens,
            entry.text,
            target_codes=target_codes,
            ref_codes=ref_codes,
            ref_text=ref_text,
            eoc_labels=self.eoc_labels,
            sample_id=entry.id,
        )
        sample["reference"] = reference
        return sample


class V3Collator:
    """`collate_v3` + `audio_roles` (B, L) and `sample_ids`, the keys the recipe and health checks read."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch = collate_v3(list(samples), self.pad_id)
        roles = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
        for i, s in enumerate(samples):
            roles[i, : s["audio_roles"].shape[0]] = s["audio_roles"]
        batch["audio_roles"] = roles
        batch["sample_ids"] = [s["sample_id"] for s in samples]
        return batch


def v3_batch_statistics(batches: Sequence[dict], num_codebooks: int) -> dict:
    """Per batch: trained target labels and EOC labels per codebook, trained reference labels, BOC labels."""
    out = []
    for index, b in enumerate(batches):
        labels, roles = b["audio_labels"], b["audio_roles"]
        set_ = labels != IGNORE_INDEX
        target, ref = (roles == ROLE_TARGET)[..., None], (roles == ROLE_REFERENCE)[..., None]
        out.append(
            {
                "index": index,
                "sample_ids": list(b["sample_ids"]),
                "batch_size": int(b["input_ids"].shape[0]),
                "padded_length": int(b["input_ids"].shape[1]),
                "tokens": int(b["attention_mask"].sum()),
                "slots": int((b["input_ids"] == AUDIO_SLOT).sum()),
                "target_trained": (set_ & target).sum((0, 1)).tolist(),
                "target_eoc_labels": ((labels == EOC) & target).sum((0, 1)).tolist(),
                "reference_trained": int((set_ & ref).sum()),
                "boc_labels": int((labels == BOC).sum()),
                "targets": int(((roles == ROLE_TARGET).diff(dim=1, prepend=torch.zeros_like(roles[:, :1])) == 1).sum()),
            }
        )
    return {"batches": out, "num_codebooks": num_codebooks}


def render_v3_batch_statistics(stats: dict) -> str:
    lines = []
    for b in stats["batches"]:
        lines.append(
            f"batch {b['index']}: {b['batch_size']} sample(s) [{', '.join(b['sample_ids'])}], padded length "
            f"{b['padded_length']}, {b['tokens']} tokens, {b['slots']} audio slots"
        )
        lines.append(f"  target labels per codebook {b['target_trained']}, EOC labels {b['target_eoc_labels']}")
        lines.append(
            f"  reference labels {b['reference_trained']} (must be 0), BOC labels {b['boc_labels']} (must be 0)"
        )
    total_trained = [sum(x) for x in zip(*(b["target_trained"] for b in stats["batches"]), strict=True)]
    total_eoc = [sum(x) for x in zip(*(b["target_eoc_labels"] for b in stats["batches"]), strict=True)]
    lines.append("")
    lines.append(f"total: target labels per codebook {total_trained}, EOC labels per codebook {total_eoc}")
    return "\n".join(lines)


def check_v3_trainable(stats: dict) -> None:
    """Raise TrainingHealthError when a batch cannot teach a v3 model to speak and to stop."""
    if not stats["batches"]:
        raise TrainingHealthError(
            "no training batch was built: the training cache is empty or every sample was dropped. "
            "Run `higgs-tune inspect CACHE_DIR` to see what the cache holds."
        )
    fix = "v3 samples come from families.v3.layout.build_v3_sample (targets labelled, references not)."
    for b in stats["batches"]:
        where = f"batch {b['index']} (samples {', '.join(b['sample_ids'])})"
        if sum(b["target_trained"]) == 0:
            raise TrainingHealthError(f"{where} has no trained audio label: the audio loss has no signal. {fix}")
        if b["target_eoc_labels"][0] < b["targets"]:
            raise TrainingHealthError(
                f"{where} has {b['target_eoc_labels'][0]} EOC label(s) in codebook 0 for {b['targets']} target(s): "
                f"the model would never learn to stop (generation ends at codebook 0's EOC). {fix}"
            )
        if b["reference_trained"]:
            raise TrainingHealthError(
                f"{where} trains {b['reference_trained']} reference audio label(s): the voice prompt would be "
                f"learned as a target. {fix}"
            )
        if b["boc_labels"]:
            raise TrainingHealthError(f"{where} has {b['boc_labels']} BOC label(s): BOC is never a label. {fix}")

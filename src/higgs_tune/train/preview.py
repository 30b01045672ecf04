"""A readable preview of what the model predicts at the scored positions (step 0 and every log step).

Pure: `prediction_preview(out.predictions, batch["sample_ids"], tokenizer, step=...)` returns a
`Preview` with the console text and a JSON-able record for metrics.jsonl; nothing is printed.

Text: the scored positions of a sample are grouped into runs of consecutive positions and each
run is decoded as a whole with `tokenizer.decode`. A byte-level BPE splits one Arabic letter
over several tokens; decoding token by token (or printing `convert_ids_to_tokens`) gives
byte-level garbage such as "Ø§Ù", decoding the run gives the text.
Audio: per codebook, the first `num_frames` scored targets of the sample (the start of its target
segment) next to the argmax predictions, and the accuracy over all its scored frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from higgs_tune.train.loss import IGNORE, Predictions


@dataclass
class Preview:
    text: str  # for the console
    record: dict  # {"event": "preview", "step", "split", "samples": [...]} for metrics.jsonl


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Index ranges [i, j) of consecutive positions: [3, 4, 9, 10, 11] -> [(0, 2), (2, 5)]."""
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def _show(s: str) -> str:
    return "«" + s.replace("\n", "\\n") + "»"


def _code(v: int, stream_eos_id: int | None) -> str:
    if stream_eos_id is not None and v == stream_eos_id:
        return "EOS"
    if stream_eos_id is not None and v == stream_eos_id - 1:
        return "BOS"
    return str(v)


def _frames(codes: list[int], n: int, stream_eos_id: int | None) -> str:
    return " ".join(f"{_code(x, stream_eos_id):>4}" for x in codes[:n])


def prediction_preview(
    predictions: Predictions,
    sample_ids: Sequence[str],
    tokenizer,
    *,
    step: int,
    split: str = "train",
    num_samples: int = 1,
    num_frames: int = 8,
    stream_eos_id: int | None = None,
) -> Preview:
    """Decoded text targets vs predictions and the first audio frames per codebook, per sample.

    predictions: `LossOutput.predictions` of one micro-batch; sample_ids: its `batch["sample_ids"]`.
    stream_eos_id (e.g. model.config.audio_stream_eos_id) shows EOS/BOS by name.
    """
    p = predictions.cpu()
    lines = [f"preview · step {step} ({split})"]
    samples = []
    for b in range(min(num_samples, len(sample_ids))):
        sid = str(sample_ids[b])
        lines.append(f"  sample {sid}")
        # ---- text: runs of consecutive scored positions, each decoded as a whole
        sel = p.text_rows == b
        order = torch.argsort(p.text_positions[sel])
        pos = p.text_positions[sel][order].tolist()
        tgt = p.text_target[sel][order].tolist()
        prd = p.text_pred[sel][order].tolist()
        text_items = []
        for i, j in _runs(pos):
            t = tokenizer.decode(tgt[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            q = tokenizer.decode(prd[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text_items.append({"position": pos[i], "target": t, "pred": q})
            lines.append(f"    text @{pos[i]:<5d} target {_show(t)}  pred {_show(q)}")
        text_correct = sum(a == c for a, c in zip(tgt, prd, strict=True))
        if pos:
            lines.append(f"    text accuracy {text_correct}/{len(pos)}")
        else:
            lines.append("    text: no scored token")
        # ---- audio: per codebook, first frames of the target vs argmax
        sel = p.audio_rows == b
        order = torch.argsort(p.audio_positions[sel])
        a_tgt = p.audio_target[sel][order]  # (m, K)
        a_prd = p.audio_pred[sel][order]  # (m, K)
        audio_items = []
        if a_tgt.numel():
            lines.append(f"    audio: first {num_frames} scored frames per codebook (target / pred), accuracy over all")
        else:
            lines.append("    audio: no scored token")
        for k in range(a_tgt.shape[1] if a_tgt.numel() else 0):
            valid = a_tgt[:, k] != IGNORE
            t_k, p_k = a_tgt[valid, k].tolist(), a_prd[valid, k].tolist()
            correct = sum(x == y for x, y in zip(t_k, p_k, strict=True))
            acc = correct / len(t_k) if t_k else 0.0
            audio_items.append(
                {
                    "codebook": k,
                    "target": t_k[:num_frames],
                    "pred": p_k[:num_frames],
                    "correct": correct,
                    "n": len(t_k),
                    "acc": acc,
                }
            )
            lines.append(f"      cb{k}  target [{_frames(t_k, num_frames, stream_eos_id)}]")
            lines.append(
                f"           pred   [{_frames(p_k, num_frames, stream_eos_id)}]  acc {acc:.3f} ({correct}/{len(t_k)})"
            )
        samples.append(
            {
                "sample_id": sid,
                "text": text_items,
                "text_correct": text_correct,
                "n_text_tokens": len(pos),
                "audio": audio_items,
            }
        )
    return Preview("\n".join(lines), {"event": "preview", "step": step, "split": split, "samples": samples})

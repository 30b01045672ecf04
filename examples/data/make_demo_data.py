#!/usr/bin/env python3
"""Generate the small bundled demo dataset (synthetic speech from espeak-ng).

Usage (from the repository root)::

    python examples/data/make_demo_data.py

Requirements: the ``espeak-ng`` binary on PATH, plus the Python packages
``numpy`` and ``soundfile``.

Output (next to this script):

    demo/audio/<id>.flac   mono, 16-bit FLAC at 22050 Hz (espeak-ng's native rate)
    demo/manifest.jsonl    training rows
    demo/heldout.jsonl     last two clips of each speaker

The sentence list and voice parameters are fixed, so the output is
deterministic (same espeak-ng version -> identical audio).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import soundfile as sf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "demo")
AUDIO_DIR = os.path.join(OUT_DIR, "audio")

SAMPLE_RATE = 22050  # espeak-ng's native output rate
MARGIN_S = 0.05  # silence kept before/after speech after trimming
TRIM_REL_THRESHOLD = 0.02  # |x| above this fraction of the peak counts as speech
PEAK_DBFS = -3.0
MIN_DUR_S, MAX_DUR_S = 1.0, 3.5
HELDOUT_PER_SPEAKER = 2

# speaker -> espeak-ng parameters and the sentences it speaks (in order).
SPEAKERS = [
    {
        "speaker": "en_a",
        "language": "en",
        "voice": "en-us",
        "pitch": 40,
        "speed": 160,
        "sentences": [
            "The morning train was right on time.",
            "Please close the window before you leave.",
            "My sister likes green tea with honey.",
            "We walked along the river after lunch.",
            "The meeting starts at nine tomorrow.",
            "Can you hear the birds outside?",
            "He fixed the old bicycle last weekend.",
            "This soup needs a little more salt.",
            "The library opens early on Mondays.",
            "Thank you for calling so quickly.",
        ],
    },
    {
        "speaker": "en_b",
        "language": "en",
        "voice": "en-gb+f3",
        "pitch": 70,
        "speed": 150,
        "sentences": [
            "The garden looks lovely in the spring.",
            "I left my umbrella on the bus.",
            "Our neighbours painted their door bright blue.",
            "Turn left at the end of the street.",
            "She reads a new book every week.",
            "The kettle is boiling in the kitchen.",
            "Would you like some toast with jam?",
            "The children played football in the park.",
            "It might rain later this afternoon.",
            "Let me know when you arrive.",
        ],
    },
    {
        "speaker": "ar_a",
        "language": "ar",
        "voice": "ar",
        "pitch": 50,
        "speed": 150,
        "sentences": [
            "صباح الخير يا أصدقائي.",
            "الجو جميل جدا اليوم.",
            "أحب قراءة الكتب في المساء.",
            "ذهبنا إلى السوق مع أبي.",
            "القهوة ساخنة جدا.",
            "هل تعرف أين المحطة؟",
            "يدرس أخي في الجامعة.",
            "الشمس تشرق من الشرق.",
            "نلتقي غدا بعد الظهر.",
            "هذه المدينة كبيرة وجميلة.",
            "شكرا لك على المساعدة.",
            "أين وضعت مفاتيح السيارة؟",
        ],
    },
]

# (row id, id of the same speaker's train clip used as its explicit voice prompt)
VOICE_PROMPTS = {
    "en_a_001": "en_a_000",
    "ar_a_001": "ar_a_000",
}


def synthesize(text: str, voice: str, pitch: int, speed: int, tmp_dir: str) -> np.ndarray:
    """Run espeak-ng and return float32 mono samples at SAMPLE_RATE."""
    wav_path = os.path.join(tmp_dir, "clip.wav")
    cmd = [
        "espeak-ng",
        "-v", voice,
        "-p", str(pitch),
        "-s", str(speed),
        "-b", "1",  # input text is UTF-8
        "-w", wav_path,
        text,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    audio, sr = sf.read(wav_path, dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng produced {sr} Hz, expected {SAMPLE_RATE} Hz")
    return audio.mean(axis=1)


def trim_and_normalize(audio: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= 0.0:
        raise RuntimeError("espeak-ng produced silence")
    voiced = np.flatnonzero(np.abs(audio) > TRIM_REL_THRESHOLD * peak)
    margin = int(round(MARGIN_S * SAMPLE_RATE))
    start = max(0, int(voiced[0]) - margin)
    end = min(audio.size, int(voiced[-1]) + 1 + margin)
    audio = audio[start:end].astype(np.float64)
    target = 10.0 ** (PEAK_DBFS / 20.0)
    audio *= target / np.max(np.abs(audio))
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    if shutil.which("espeak-ng") is None:
        print("error: espeak-ng not found on PATH (apt-get install espeak-ng)", file=sys.stderr)
        return 1
    os.makedirs(AUDIO_DIR, exist_ok=True)

    train_rows: list[dict] = []
    heldout_rows: list[dict] = []
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        for spk in SPEAKERS:
            sentences = spk["sentences"]
            for idx, text in enumerate(sentences):
                clip_id = f"{spk['speaker']}_{idx:03d}"
                raw = synthesize(text, spk["voice"], spk["pitch"], spk["speed"], tmp_dir)
                pcm = trim_and_normalize(raw)
                dur = pcm.size / SAMPLE_RATE
                if not (MIN_DUR_S <= dur <= MAX_DUR_S):
                    raise RuntimeError(f"{clip_id}: duration {dur:.2f}s outside [{MIN_DUR_S}, {MAX_DUR_S}]")
                rel_audio = f"audio/{clip_id}.flac"
                sf.write(os.path.join(OUT_DIR, rel_audio), pcm, SAMPLE_RATE,
                         format="FLAC", subtype="PCM_16")
                texts[clip_id] = text
                row = {
                    "id": clip_id,
                    "audio": rel_audio,
                    "text": text,
                    "speaker": spk["speaker"],
                    "language": spk["language"],
                }
                if idx >= len(sentences) - HELDOUT_PER_SPEAKER:
                    heldout_rows.append(row)
                else:
                    train_rows.append(row)
                print(f"{clip_id}  {dur:5.2f}s  {text}")

    train_ids = {row["id"] for row in train_rows}
    for row in train_rows:
        ref_id = VOICE_PROMPTS.get(row["id"])
        if ref_id is None:
            continue
        assert ref_id in train_ids and ref_id.rsplit("_", 1)[0] == row["speaker"], ref_id
        row["ref_audio"] = f"audio/{ref_id}.flac"
        row["ref_text"] = texts[ref_id]

    write_jsonl(os.path.join(OUT_DIR, "manifest.jsonl"), train_rows)
    write_jsonl(os.path.join(OUT_DIR, "heldout.jsonl"), heldout_rows)
    print(f"wrote {len(train_rows)} train + {len(heldout_rows)} held-out clips to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

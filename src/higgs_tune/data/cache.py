"""The code cache written by `higgs-tune prepare` and read by training.

Layout of a cache folder (nothing else may live there):

    index.json                   header + code map + entries (see below); rewritten atomically
    codes-00000.safetensors ...  shards: one int16 tensor (K, T) per content key
    rejects.jsonl                rows dropped by --skip-invalid (row, id, audio, reason); may be empty

index.json:

    {"format": "higgs-tune-code-cache", "format_version": 1, "complete": true,
     "header": {codec_fingerprint, num_codebooks, codebook_size, frame_rate, sample_rate,
                codec_source, preprocessing, manifest, command, created, updated},
     "shards":  {"codes-00000.safetensors": {"keys": [...], "sha256": ..., "bytes": n}},
     "codes":   {key: {"shard": name, "num_frames": T}},
     "entries": [{id, key, speaker, text, language, scene, ref_key, ref_text, duration_s,
                  num_frames, audio, sha256, ref_audio, row}, ...],   # manifest order
     "num_rejects": n}

A key is the content key of a clip's codes: sha256 over the decoded audio plus the
preprocessing (mono mix, resampler, rate, loudness), so the same recording is encoded once
however many rows use it, and a re-run re-encodes only clips whose content changed.

Every file is written to a temporary name, fsynced, then renamed (`runfs.atomic_write_bytes`):
a crash leaves either the old or the new file, never half of one. `prepare` rewrites the
index after each shard with `complete: false`, so an interrupted run resumes from its
finished shards; `CodeCache.open` refuses an incomplete cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from higgs_tune.errors import DataError
from higgs_tune.runfs import atomic_write_bytes, sha256_bytes

FORMAT = "higgs-tune-code-cache"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_RE = re.compile(r"^codes-(\d{5})\.safetensors$")
# a write in progress (runfs.temp_path), or one by an older higgs-tune (.<name>.tmp-<pid>)
TMP_RE = re.compile(r"^(?:\.tmp-.+-\d+|\..+\.tmp-\d+)$")
HEADER_KEYS = ("codec_fingerprint", "num_codebooks", "codebook_size", "frame_rate", "sample_rate")
# Types of an index entry's fields (CacheEntry); a damaged index is refused at open, not mid-training.
ENTRY_TYPES = {
    "id": str,
    "key": str,
    "speaker": str,
    "text": str,
    "language": str,
    "scene": (str, type(None)),
    "ref_key": (str, type(None)),
    "ref_text": (str, type(None)),
    "duration_s": (int, float),
    "num_frames": int,
    "audio": str,
}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def own_file(name: str) -> bool:
    """A file name that prepare writes into a cache folder."""
    return name in (INDEX_NAME, REJECTS_NAME) or bool(SHARD_RE.match(name) or TMP_RE.match(name))


@dataclass(frozen=True)
class CacheEntry:
    """One training clip (docs/CONTRACTS.md, "Code cache")."""

    id: str
    key: str
    speaker: str
    text: str
    language: str
    scene: str | None
    ref_key: str | None
    ref_text: str | None
    duration_s: float
    num_frames: int
    audio: str  # path as written in the manifest
    text_source: str | None = None  # "asr:<model>": transcribed by prepare --transcribe (optional in the index)


def _fix(cache_dir: Path, header: dict | None = None) -> str:
    command = (header or {}).get("command")
    return f"run `{command}`" if command else f"run `higgs-tune prepare MANIFEST --model MODEL --out {cache_dir}`"


def read_index(cache_dir: Path) -> dict | None:
    """The parsed index.json of `cache_dir`, None if there is none; DataError if it is unreadable."""
    path = Path(cache_dir) / INDEX_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path} is damaged (not valid JSON: {e}). Fix: rebuild the cache: {_fix(cache_dir)} with --overwrite."
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(
            f"{path} is not a higgs-tune code cache index (format "
            f"{index.get('format') if isinstance(index, dict) else None!r}). Fix: point at a folder written by "
            f"`higgs-tune prepare`, or {_fix(cache_dir)}."
        )
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        what = (
            "a newer higgs-tune: upgrade higgs-tune"
            if newer
            else f"an older higgs-tune: rebuild it ({_fix(cache_dir, index.get('header'))} with --overwrite)"
        )
        raise DataError(
            f"{path} has cache format version {version!r}; this higgs-tune reads version {FORMAT_VERSION}. Fix: it "
            f"was written by {what}."
        )
    for key, kind in (("header", dict), ("shards", dict), ("codes", dict), ("entries", list)):
        if not isinstance(index.get(key), kind):
            raise DataError(
                f"{path} is damaged (no valid {key!r}). Fix: rebuild the cache: "
                f"{_fix(cache_dir, index.get('header'))} with --overwrite."
            )
    return index


def check_cache_codec(cache: CodeCache, fingerprints: tuple[str, ...] | None, model_name: str = "this model") -> None:
    """Refuse a cache whose codes another codec made: the header records the codec's fingerprint
    (config + weights, `prepare.codec_fingerprint`); its codes would mean other sounds to the model
    (the loss falls, nothing useful is learned). `fingerprints`: what `prepare.codec_fingerprints`
    gives for the model's codec (today's first, then the legacy one); None: not checked."""
    if fingerprints is None or cache.codec_fingerprint in fingerprints:
        return
    fingerprint = fingerprints[0]
    source = cache.header.get("codec_source")
    raise DataError(
        f"{cache.cache_dir} was encoded by another audio tokenizer (fingerprint {cache.codec_fingerprint[:12]}, "
        f"from {source!r}) than the one {model_name} loads (fingerprint {fingerprint[:12]}): its codes mean other "
        "sounds to this model. Fix: prepare the cache again with the model you train "
        f"(higgs-tune prepare MANIFEST --model MODEL --out {cache.cache_dir} --overwrite), or set "
        "model.name_or_path / model.audio_tokenizer to the codec that made it."
    )


class CodeCache:
    """Audio codes of a prepared dataset, all in memory as int16 (a 100 h dataset is ~150 MB).

    Opened once per run; `codes(key)` hands out (K, T) LongTensors. Picklable (plain tensors),
    so DataLoader workers can share it.
    """

    def __init__(
        self,
        cache_dir: Path,
        header: dict,
        entries: list[CacheEntry],
        codes: dict[str, torch.Tensor],
        rejects: list[dict],
    ):
        self.cache_dir = cache_dir
        self.header = header
        self.entries = entries
        self.rejects = rejects
        self._codes = codes
        self.num_codebooks: int = header["num_codebooks"]
        self.codebook_size: int = header["codebook_size"]
        self.frame_rate: int = header["frame_rate"]
        self.sample_rate: int = header["sample_rate"]
        self.codec_fingerprint: str = header["codec_fingerprint"]
        # what the cache holds (recorded by prepare; computed for caches written before it was)
        self.content_fingerprint: str = header.get("content_fingerprint") or content_fingerprint(
            [dataclasses.asdict(e) for e in entries], header
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"CodeCache({str(self.cache_dir)!r}, entries={len(self.entries)}, num_codebooks={self.num_codebooks})"

    def codes(self, key: str) -> torch.Tensor:
        """(K, T) int64 codes in 0..codebook_size-1 for an entry's `key` or `ref_key`."""
        try:
            return self._codes[key].long()
        except KeyError:
            raise KeyError(f"no codes for key {key!r} in {self.cache_dir}: use an entry's key or ref_key") from None

    @staticmethod
    def _load_parts(cache_dir: Path, index: dict, index_path: Path, damaged: str, K: int, V: int):
        """Shards (checksummed), the code map and the entries of a parsed index -> (codes, entries)."""
        codes: dict[str, torch.Tensor] = {}
        for name, meta in index["shards"].items():
            if not SHARD_RE.match(name):
                raise DataError(
                    f"{index_path} is damaged (shard name {name!r} is not codes-NNNNN.safetensors). {damaged}"
                )
            path = cache_dir / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{path} is missing (listed in {index_path}). {damaged}") from None
            if sha256_bytes(data) != meta.get("sha256"):
                raise DataError(f"{path} is damaged (checksum differs from {index_path}). {damaged}")
            tensors = safetensors.torch.load(data)
            for key in meta.get("keys", []):
                if key not in tensors:
                    raise DataError(f"{path} is damaged (no tensor {key!r}). {damaged}")
                codes[key] = tensors[key]
        for key, meta in index["codes"].items():
            t = codes.get(key)
            if t is None:
                raise DataError(f"{index_path} is damaged (codes {key!r} are in no shard). {damaged}")
            if t.dtype != torch.int16 or t.shape != (K, meta["num_frames"]):
                raise DataError(
                    f"{cache_dir / meta['shard']}: codes {key!r} have {t.dtype} {tuple(t.shape)}, expected int16 "
                    f"({K}, {meta['num_frames']}). {damaged}"
                )
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
                raise DataError(f"{cache_dir / meta['shard']}: codes {key!r} lie outside 0..{V - 1}. {damaged}")

        names = [f.name for f in fields(CacheEntry) if f.name != "text_source"]
        entries = []
        for i, e in enumerate(index["entries"]):
            if not isinstance(e, dict) or any(n not in e for n in names):
                raise DataError(
                    f"{index_path} is damaged (entry {i + 1} lacks "
                    f"{[n for n in names if n not in e] if isinstance(e, dict) else names}). {damaged}"
                )
            for key in (e["key"], e["ref_key"]):
                if key is not None and key not in index["codes"]:
                    raise DataError(
                        f"{index_path} is damaged (entry {e['id']!r} refers to codes {key!r} that are not in the "
                        f"cache). {damaged}"
                    )
            entry = CacheEntry(**{n: e[n] for n in names}, text_source=e.get("text_source"))
            wrong = [
                n
                for n, kind in ENTRY_TYPES.items()
                if not isinstance(getattr(entry, n), kind) or isinstance(getattr(entry, n), bool)
            ]
            if wrong:
                raise DataError(
                    f"{index_path} is damaged (entry {i + 1} has wrong types for {', '.join(wrong)}). {damaged}"
                )
            if entry.num_frames != index["codes"][entry.key]["num_frames"]:
                raise DataError(
                    f"{index_path} is damaged (entry {entry.id!r} lists {entry.num_frames} frames, its codes have "
                    f"{index['codes'][entry.key]['num_frames']}). {damaged}"
                )
            entries.append(entry)
        # Only the codes the entries use stay in memory.
        used = {e.key for e in entries} | {e.ref_key for e in entries if e.ref_key}
        codes = {k: v for k, v in codes.items() if k in used}
        return codes, entries

    @classmethod
    def open(cls, cache_dir: str | Path) -> CodeCache:
        """Load and check a cache folder; DataError naming the file and the fix if it is not usable."""
        cache_dir = Path(os.path.abspath(cache_dir))
        if not cache_dir.is_dir():
            raise DataError(f"no code cache at {cache_dir} (folder not found). Fix: {_fix(cache_dir)}.")
        index = read_index(cache_dir)
        if index is None:
            has_shards = any(SHARD_RE.match(p.name) for p in cache_dir.iterdir())
            why = "prepare stopped before finishing its first shard" if has_shards else "it is not a prepared cache"
            raise DataError(f"{cache_dir / INDEX_NAME} not found ({why}). Fix: {_fix(cache_dir)}.")
        header = index["header"]
        index_path = cache_dir / INDEX_NAME
        damaged = f"Fix: rebuild the cache: {_fix(cache_dir, header)} with --overwrite."
        missing = [k for k in HEADER_KEYS if k not in header]
        if missing:
            raise DataError(f"{index_path} is damaged (header lacks {', '.join(missing)}). {damaged}")
        if index.get("complete") is not True:
            raise DataError(
                f"{index_path}: prepare did not finish (interrupted?); the cache is incomplete. Fix: "
                f"{_fix(cache_dir, header)} again; it resumes from the finished shards."
            )

        K, V = header["num_codebooks"], header["codebook_size"]

        def positive(v, kinds) -> bool:
            return isinstance(v, kinds) and not isinstance(v, bool) and v > 0

        if not (
            all(positive(header[k], int) for k in ("num_codebooks", "codebook_size"))
            and all(positive(header[k], (int, float)) for k in ("frame_rate", "sample_rate"))
        ):
            shown = ", ".join(f"{k}={header[k]!r}" for k in HEADER_KEYS[1:])
            raise DataError(f"{index_path} is damaged (header {shown}: expected positive numbers). {damaged}")
        try:
            codes, entries = cls._load_parts(cache_dir, index, index_path, damaged, K, V)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            # hand-edited or partly overwritten: the JSON parses but its parts have the wrong shape
            raise DataError(
                f"{index_path} is damaged (malformed shards/codes/entries: {type(e).__name__}: {e}). {damaged}"
            ) from None

        rejects_path = cache_dir / REJECTS_NAME
        try:
            lines = rejects_path.read_text(encoding="utf-8").splitlines()
            rejects = [json.loads(line) for line in lines if line.strip()]
        except FileNotFoundError:
            raise DataError(f"{rejects_path} is missing. {damaged}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{rejects_path} is damaged ({e}). {damaged}") from None
        if len(rejects) != index.get("num_rejects"):
            raise DataError(
                f"{rejects_path} lists {len(rejects)} rows, {index_path} says {index.get('num_rejects')}. {damaged}"
            )
        return cls(cache_dir, header, entries, codes, rejects)


# the fields of an entry that make up what is trained on (not where the audio file was)
_CONTENT_FIELDS = ("id", "key", "ref_key", "text", "ref_text", "speaker", "language", "scene", "num_frames")


def content_fingerprint(entries: list[dict], header: dict) -> str:
    """sha256 of what a cache holds: every entry's content key (decoded audio + preprocessing),
    texts, speaker, language, reference, frames, and the codec that encoded it. Cheap: the keys
    already hash the audio, so no code is read. A cache re-prepared from other data at the same
    path gets another fingerprint; one rebuilt from the same data, the same one."""
    rows = [[e.get(k) for k in _CONTENT_FIELDS] for e in entries]
    data = {"codec": header.get("codec_fingerprint"), "preprocessing": header.get("preprocessing"), "entries": rows}
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class CacheWriter:
    """Adds shards to a cache folder and finally writes the entries; resumes what a run left.

    `previous` is the folder's index (complete or not) when its codec matches. Its shards are
    re-checked (checksum); damaged or missing ones are dropped and listed in `dropped_shards`,
    so their clips are encoded again. Files of ours that no index lists (a shard finished in
    the instant before a crash, temporary files) are removed.
    """

    def __init__(self, cache_dir: Path, header: dict, previous: dict | None):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.header = dict(header)
        self.shards: dict[str, dict] = {}
        self.codes: dict[str, dict] = {}
        self.dropped_shards: list[str] = []
        if previous is not None:
            self.header["created"] = previous["header"].get("created", header["created"])
            for name, meta in previous["shards"].items():
                path = self.dir / name
                if path.is_file() and sha256_bytes(path.read_bytes()) == meta.get("sha256"):
                    self.shards[name] = meta
                else:
                    self.dropped_shards.append(name)
            self.codes = {k: v for k, v in previous["codes"].items() if v.get("shard") in self.shards}
        for p in self.dir.iterdir():
            if (SHARD_RE.match(p.name) and p.name not in self.shards) or TMP_RE.match(p.name):
                p.unlink()

    @property
    def known_keys(self) -> set[str]:
        return set(self.codes)

    def num_frames(self, key: str) -> int:
        return self.codes[key]["num_frames"]

    def _next_shard_name(self) -> str:
        numbers = [int(SHARD_RE.match(n).group(1)) for n in self.shards]
        return f"codes-{max(numbers, default=-1) + 1:05d}.safetensors"

    def _write_index(self, complete: bool, entries: list[dict], num_rejects: int) -> None:
        self.header["updated"] = now_iso()
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "header": self.header,
            "shards": self.shards,
            "codes": self.codes,
            "entries": entries,
            "num_rejects": num_rejects,
        }
        atomic_write_bytes(self.dir / INDEX_NAME, json.dumps(index, ensure_ascii=False, indent=1).encode("utf-8"))

    def add_shard(self, codes: dict[str, np.ndarray]) -> str:
        """Write one shard of {key: int16 (K, T)} then the index that lists it; returns its name."""
        name = self._next_shard_name()
        data = safetensors.torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in codes.items()}, metadata={"format": "pt"}
        )
        atomic_write_bytes(self.dir / name, data)
        self.shards[name] = {"keys": sorted(codes), "sha256": sha256_bytes(data), "bytes": len(data)}
        for key, value in codes.items():
            self.codes[key] = {"shard": name, "num_frames": int(value.shape[1])}
        self._write_index(complete=False, entries=[], num_rejects=0)
        return name

    def finish(self, entries: list[dict], rejects: list[dict]) -> list[str]:
        """Write rejects.jsonl and the complete index; delete shards no entry uses. Returns those."""
        used = {e["key"] for e in entries} | {e["ref_key"] for e in entries if e["ref_key"]}
        unused = [n for n, meta in self.shards.items() if not used.intersection(meta["keys"])]
        for name in unused:
            for key in self.shards.pop(name)["keys"]:
                self.codes.pop(key, None)
        atomic_write_bytes(
            self.dir / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode("utf-8")
        )
        self.header["content_fingerprint"] = content_fingerprint(entries, self.header)
        self._write_index(complete=True, entries=entries, num_rejects=len(rejects))
        for name in unused:
            (self.dir / name).unlink()
        return unused

"""higgs-tune benchmarks: `python -m benchmarks [--quick] [--only NAME]`.

Every benchmark module exposes `run(quick: bool) -> list[dict]` and measures what it
compares side by side in the same process (same machine state, same data), taking the
median of several repeats. What gets reported is a **ratio** (candidate / baseline), not a
lone absolute time: absolute times on a shared 2-core CI machine move by tens of percent
from one run to the next, ratios measured back to back move far less.

One row = one comparison. Keys (build rows with `row(...)`):

    benchmark   module name, e.g. "padding"
    metric      what is measured, with its unit: "clips/s", "padding waste %", "step s"
    baseline    label of the reference setting, e.g. "per-clip encode"
    candidate   label of the setting under test, e.g. "batched prepare"
    base_value  the baseline's measurement (median of repeats)
    cand_value  the candidate's measurement (median of repeats)
    ratio       cand_value / base_value
    target      human-readable goal, e.g. ">= 20x" or "< 10%" ("" when none)
    met         True / False / None (no target)
    note        free text: sizes, repeats, anything needed to read the row

`__main__` prints all rows of all benchmarks as one table; rows missing some keys are
shown with blanks, and unknown keys go to the note column.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

ROW_KEYS = (
    "benchmark",
    "metric",
    "baseline",
    "candidate",
    "base_value",
    "cand_value",
    "ratio",
    "target",
    "met",
    "note",
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, the calls interleaved (a, b, a, b, ...).

    Interleaving spreads slow phases of a noisy machine over all settings alike, so the
    ratio of two medians is fairer than timing all of `a` and then all of `b`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(
    benchmark: str,
    metric: str,
    baseline: str,
    candidate: str,
    base_value: float,
    cand_value: float,
    target: str = "",
    met: bool | None = None,
    note: str = "",
) -> dict:
    """One comparison row (see the module docstring); ratio = cand_value / base_value."""
    ratio = cand_value / base_value if base_value else float("inf") if cand_value else 1.0
    return {
        "benchmark": benchmark,
        "metric": metric,
        "baseline": baseline,
        "candidate": candidate,
        "base_value": float(base_value),
        "cand_value": float(cand_value),
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
    }


# ----------------------------------------------------------------------------- shared set-up

_TEXT_STACK = None


def tiny_text_stack():
    """(tokenizer, SpecialTokens) of the tiny offline stack, built in memory once per process.

    The tokenizer is the one `higgs-tune make-tiny` saves (byte-level BPE + Llama-3 specials),
    so token counts of the synthetic benchmarks follow the real layout code.
    """
    global _TEXT_STACK
    if _TEXT_STACK is None:
        import torch

        from higgs_tune.data.layout import SpecialTokens
        from higgs_tune.tiny import TinySpec, build_model, build_text_tokenizer

        spec = TinySpec(seed=0)
        tokenizer = build_text_tokenizer(spec)
        torch.manual_seed(0)
        config = build_model(spec, tokenizer).config
        _TEXT_STACK = (tokenizer, SpecialTokens.from_tokenizer(tokenizer, config))
    return _TEXT_STACK


_WORDS = (
    "the morning train was right on time please close window before you leave my sister likes green tea "
    "with honey we walked along river after lunch meeting starts at nine tomorrow can hear birds outside"
).split()


def synthetic_text(seconds: float, rng, chars_per_second: float = 14.0) -> str:
    """English-like words totalling about `chars_per_second * seconds` characters."""
    words, n = [], 0
    while n < chars_per_second * seconds:
        w = _WORDS[rng.randrange(len(_WORDS))]
        words.append(w)
        n += len(w) + 1
    return " ".join(words).capitalize() + "."


_WORKDIR = None
_STACK_DIR = None
_DEMO_CACHE = None
_DEMO_DATASETS: dict = {}
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DEMO_MANIFEST = REPO / "examples" / "data" / "demo" / "manifest.jsonl"


def workdir():
    """A temporary folder for this process's benchmark files, removed at exit."""
    global _WORKDIR
    if _WORKDIR is None:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        _WORKDIR = Path(tempfile.mkdtemp(prefix="higgs-tune-bench-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    return _WORKDIR


def tiny_stack_dir():
    """The tiny stack saved by `make_tiny` (seed 0), once per process."""
    global _STACK_DIR
    if _STACK_DIR is None:
        from higgs_tune.tiny import make_tiny

        _STACK_DIR = make_tiny(workdir() / "tiny", seed=0)
    return _STACK_DIR


def demo_cache_dir():
    """The bundled demo manifest prepared with the tiny stack (default settings), once per process."""
    global _DEMO_CACHE
    if _DEMO_CACHE is None:
        from higgs_tune.data.prepare import prepare_manifest

        _DEMO_CACHE = prepare_manifest(
            DEMO_MANIFEST, tiny_stack_dir(), workdir() / "demo-cache", progress=False
        ).cache_dir
    return _DEMO_CACHE


def demo_dataset(data=None):
    """`TTSDataset` over the demo cache with `data` (a DataConfig; default: the defaults), seed 42."""
    from higgs_tune.config import DataConfig, TrainConfig

    d = data or DataConfig()
    key = (d.task, d.clone_probability, d.system_prompt, d.use_scene, d.max_sequence_length)
    if key not in _DEMO_DATASETS:
        from higgs_tune.data.cache import CodeCache
        from higgs_tune.data.dataset import TTSDataset

        tokenizer, tokens = tiny_text_stack()
        _DEMO_DATASETS[key] = TTSDataset(
            CodeCache.open(demo_cache_dir()),
            tokens,
            tokenizer,
            task=d.task,
            clone_probability=d.clone_probability,
            system_prompt=d.system_prompt,
            use_scene=d.use_scene,
            seed=TrainConfig().seed,
            max_sequence_length=d.max_sequence_length,
        )
    return _DEMO_DATASETS[key]

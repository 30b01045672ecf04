"""The issue-17 benchmark scripts run: the memory table (fast) and the GPU check at CPU smoke size (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def test_memory_table_prints_every_setting(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory_table.py"), "--markdown", "--json", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 9 * 2 * 3  # settings x checkpointing x (1024, 2048, 4096)
    lora = next(r for r in rows if r["setting"] == "v2 LoRA r16, bf16" and r["grad_ckpt"] and r["seq"] == 2048)
    assert lora["peak"] < 24 * 0.9 and lora["trainable"] == 39_452_672
    assert "| v2 full, fp32 master + bf16 autocast | on | 2048 |" in proc.stdout


def test_memory_plan_reads_a_local_checkpoint(tiny_dir):
    from higgs_tune.model.memory import HIGGS_V2, architecture_of

    arch = architecture_of(str(tiny_dir))
    assert (arch.hidden_size, arch.num_hidden_layers, arch.vocab_size, arch.codebook_size) == (64, 2, 2048, 1026)
    assert architecture_of("bosonai/higgs-audio-v2-generation-3B-base") == HIGGS_V2


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(tmp_path),
            "--seq",
            "96",
            "--steps",
            "1",
            "--skip-train",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["steps"]) == 5 and not any(r["oom"] for r in report["steps"])
    assert all(r["tokens_per_s"] > 0 and r["predicted_peak_gib"] > 0 for r in report["steps"])
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (CPU")

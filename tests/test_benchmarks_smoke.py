"""`python -m benchmarks --quick --only padding` runs end to end and prints one table of ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_padding(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "padding", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["command"] == "python -m benchmarks --quick --only padding"
    assert report["failed"] == [] and list(report["seconds"]) == ["padding"]
    rows = {r["metric"]: r for r in report["rows"]}
    assert list(rows) == [
        "padding waste, bundled demo",
        "padding waste, bundled demo, default data.*",
        "padding waste, synthetic 2-20 s",
    ]
    for r in rows.values():
        assert r["benchmark"] == "padding" and r["baseline"] == "no bucketing" and r["candidate"] == "bucket_size 64"
        assert r["ratio"] == r["cand_value"] / r["base_value"]
        assert 0 <= r["cand_value"] < r["base_value"] < 100
    # uniform 2-20 s clips: sorting within windows leaves almost no padding
    assert (
        rows["padding waste, synthetic 2-20 s"]["cand_value"] < 10
        and rows["padding waste, synthetic 2-20 s"]["met"] is True
    )
    header = "benchmark | metric"
    table = proc.stdout[proc.stdout.index(header) :]
    assert table.count("\npadding   | padding waste") == 3
    assert "\n# device: " in proc.stdout and "\n# date: " in proc.stdout

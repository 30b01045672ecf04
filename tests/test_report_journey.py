"""The report's newer parts: responsive charts with values on hover, per-codebook accuracy,
tokens/s, eval WER/CER/SIM over steps, samples with their text beside reference and ground truth,
collapsible config and parameter report."""

from __future__ import annotations

import re

import numpy as np

from higgs_tune.app.report import build_report
from higgs_tune.infer.generate import write_wav
from higgs_tune.train.logging import MetricsLogger


def _run(tmp_path):
    run = tmp_path / "run"
    data = tmp_path / "data"
    tone = (0.3 * np.sin(np.arange(4800) / 10)).astype(np.float32)
    write_wav(data / "gt.wav", tone, 24000)
    write_wav(data / "ref.wav", tone[::-1].copy(), 24000)
    with MetricsLogger(run, ["none"]) as log:
        for step in (1, 10, 20):
            log.log(
                step, {"loss": 5.0 / step, "per_codebook_acc": [0.1 * step / 20, 0.2], "tokens_per_s": 1000.0 + step}
            )
        log.log(10, {"loss": 1.0, "wer": 0.9, "cer": 0.5, "speaker_similarity": 0.3}, split="eval")
        log.log(20, {"loss": 0.8, "wer": 0.6, "cer": 0.25, "speaker_similarity": 0.5}, split="eval")
        prompts = [
            {"text": "Hello <there> & bye.", "reference": str(data / "ref.wav"), "ground_truth": str(data / "gt.wav")}
        ]
        log.log_event("samples", 20, folder=str(run / "samples" / "step-20"), files=["s.wav"], stopped=[True],
                      frames=[5], prompts=prompts)  # fmt: skip
    write_wav(run / "samples" / "step-20" / "s.wav", tone, 24000)
    (run / "param_report.txt").write_text("parameters: 10 trainable\n", encoding="utf-8")
    (run / "config.yaml").write_text("model:\n  name_or_path: /m\n", encoding="utf-8")
    return run


def test_report_new_charts_hover_and_samples(tmp_path):
    page = build_report(_run(tmp_path)).read_text(encoding="utf-8")
    titles = re.findall(r'class="chart-title">([^<]+)<', page)
    assert titles == [
        "Total loss",
        "Per-codebook top-1 accuracy (train)",
        "Throughput",
        "Evaluation quality (WER, CER, speaker similarity)",
    ]
    # values on hover: one tooltip per point
    assert "<title>tokens/s · step 20: 1020</title>" in page
    assert "<title>WER · step 10: 0.9</title>" in page and "<title>speaker similarity · step 20: 0.5</title>" in page
    # responsive: the SVGs scale to their box (viewBox + CSS width 100%, one column under 900 px)
    assert ".charts svg.chart{flex:1 1 560px;width:100%" in page and "@media (max-width:900px)" in page
    # the sample: its text (escaped), then generated, reference and ground truth players
    sample = page[page.index('<div class="sample">') :]
    assert sample.startswith('<div class="sample"><p class="target"><bdi>Hello &lt;there&gt; &amp; bye.</bdi></p>')
    labels = re.findall(r'<div class="player"><div>([^<&]+)', sample)[:3]
    assert labels == ["s (generated) ", "reference (voice prompt)", "ground truth"]
    assert sample.count("<audio controls") >= 3
    # config and parameter report collapsible
    assert "<details><summary>parameter report</summary>" in page and "<details><summary>config.yaml</summary>" in page

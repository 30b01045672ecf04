"""metrics.jsonl, console line, trackers, cross-rank reduction, and the prediction preview."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_train_loss import EOS, K, build_sample, collate, two_row_batch
from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

from higgs_tune.config import ConfigError, HealthConfig, LossConfig
from higgs_tune.errors import OutputDirError
from higgs_tune.runfs import METRICS_FILE
from higgs_tune.train.health import HealthMonitor
from higgs_tune.train.logging import MetricsLogger, format_line, reduce_metrics
from higgs_tune.train.loss import HiggsLossModule, LossWeights, Predictions, StepMetrics, finalize_metrics
from higgs_tune.train.preview import prediction_preview

METRIC_KEYS = {
    "loss",
    "text_loss",
    "audio_loss",
    "audio_loss_sum",
    "text_acc",
    "audio_acc",
    "per_codebook_loss",
    "per_codebook_acc",
    "n_text_tokens",
    "n_audio_tokens",
    "n_audio_tokens_per_codebook",
    "n_tokens",
    "n_samples",
}
ARABIC = "مرحبا بكم في البيت، كيف حالك؟"


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()


@pytest.fixture(scope="module")
def batch(tok, model):
    return two_row_batch(tok, model.config)[0]


@pytest.fixture(scope="module")
def out(model, batch):
    with torch.no_grad():
        return HiggsLossModule(model, LossConfig())(**batch)


def quiet_console():
    return Console(file=io.StringIO(), width=200, highlight=False)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------- metrics.jsonl
def test_metrics_jsonl_records_have_exact_keys(tmp_path, out, model, tok, batch):
    console = quiet_console()
    with MetricsLogger(tmp_path, ["tensorboard"], True, console=console) as logger:
        metrics = reduce_metrics(out.stats(), None)
        metrics.update(lr=1e-4, grad_norm=torch.tensor(0.75), tokens_per_s=1234.0)
        logger.log(0, metrics)
        logger.log(0, out.metrics(), split="eval")
        mon = HealthMonitor.for_model(HealthConfig(), LossConfig(), model.config, tok, on_warning=logger.log_warning)
        lab = batch["audio_labels"].clone()
        lab[lab == EOS] = -100
        b = dict(batch, audio_labels=lab)
        with torch.no_grad():
            mon.check_batch(3, b, HiggsLossModule(model, LossConfig())(**b))
        logger.log_preview(prediction_preview(out.predictions, batch["sample_ids"], tok, step=0))
    rec = records(tmp_path)
    assert [r["event"] for r in rec] == ["metrics", "metrics", "warning", "preview"]
    assert set(rec[0]) == {"event", "step", "split", "time"} | METRIC_KEYS | {"lr", "grad_norm", "tokens_per_s"}
    assert rec[0]["split"] == "train" and rec[1]["split"] == "eval" and rec[0]["grad_norm"] == 0.75
    assert len(rec[0]["per_codebook_acc"]) == K and rec[0]["n_audio_tokens_per_codebook"] == [13] * K
    assert rec[0]["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert set(rec[2]) == {"event", "code", "step", "count", "last_step", "message", "details"}
    assert rec[2]["code"] == "no_eos" and rec[2]["step"] == 3
    assert set(rec[3]) == {"event", "step", "split", "samples"}
    assert set(rec[3]["samples"][0]) == {"sample_id", "text", "text_correct", "n_text_tokens", "audio"}
    # console: one compact line per log event, the warning and the preview
    text = console.file.getvalue()
    assert "train step      0 | loss " in text and "| lr 1.00e-04 | gnorm 0.750" in text
    assert "warning no_eos (step 3)" in text and "preview · step 0 (train)" in text
    # TensorBoard by default
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, ["none"], True, console=quiet_console()) as logger:
        logger.log(5, {"loss": float("nan"), "grad_norm": float("inf"), "per_codebook_loss": [1.0, float("nan")]})
    (rec,) = records(tmp_path)
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["per_codebook_loss"] == [1.0, None]
    assert not (tmp_path / "tensorboard").exists()


def test_resume_truncates_records_after_the_resume_step(tmp_path):
    with MetricsLogger(tmp_path, ["none"], True, console=quiet_console()) as logger:
        for step in range(0, 40, 10):
            logger.log(step, {"loss": 1.0 / (step + 1)})
        logger.log_event("checkpoint", 20, path="step-000020")
        logger.log(30, {"loss": 0.5}, split="eval")
    with open(tmp_path / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"event": "metrics", "step": 40, "lo')  # a line torn by a crash
    # a fresh run must not append to another run's file
    with pytest.raises(OutputDirError, match="already holds metrics"):
        MetricsLogger(tmp_path, ["none"], True, console=quiet_console())
    console = quiet_console()
    with MetricsLogger(tmp_path, ["none"], True, resume_step=20, console=console) as logger:
        assert [(r["event"], r["step"]) for r in records(tmp_path)] == [
            ("metrics", 0),
            ("metrics", 10),
            ("metrics", 20),
            ("checkpoint", 20),
        ]
        logger.log(30, {"loss": 0.25})
    assert "removed 3 record(s)" in console.file.getvalue()
    rec = records(tmp_path)
    assert [(r["event"], r["step"]) for r in rec] == [
        ("metrics", 0),
        ("metrics", 10),
        ("metrics", 20),
        ("checkpoint", 20),
        ("metrics", 30),
    ]
    assert rec[-1]["loss"] == 0.25


def test_only_the_main_process_writes(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, ["tensorboard"], False) as logger:
        logger.log(0, {"loss": 1.0})
        logger.log_event("checkpoint", 0)
    assert not run_dir.exists()


def test_asking_for_a_tracker_that_is_not_installed_is_a_clear_error(tmp_path):
    for name in ("wandb", "trackio"):
        if importlib.util.find_spec(name) is not None:
            continue
        with pytest.raises(
            ConfigError, match=rf"names {name} but the `{name}` package is not installed: `pip install {name}`"
        ):
            MetricsLogger(tmp_path, ["tensorboard", name], False)
    with pytest.raises(ConfigError, match="'mlflow' is not one of"):
        MetricsLogger(tmp_path, ["mlflow"], True)


def test_console_line_format():
    metrics = {
        "loss": 3.14159,
        "text_loss": 0.5,
        "audio_loss": 2.64159,
        "per_codebook_acc": [0.2, 0.4],
        "tokens_per_s": 8200.4,
        "lr": 3e-4,
        "grad_norm": 1.23456,
    }
    assert format_line(120, metrics) == (
        "train step    120 | loss 3.1416 | text 0.500 | audio 2.642 | cb acc 0.300 | tok/s 8,200 | lr 3.00e-04 | "
        "gnorm 1.235"
    )


# ---------------------------------------------------------------------- reduction
def _stats(text_sum, text_ok, n_text, cb_sum, cb_ok, n_cb, n_tokens, n_samples, weights):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {
        "text_ce_sum": t(text_sum),
        "text_correct": t(text_ok),
        "n_text_tokens": t(n_text),
        "audio_ce_sum_per_codebook": t(cb_sum),
        "audio_correct_per_codebook": t(cb_ok),
        "n_audio_tokens_per_codebook": t(n_cb),
        "n_tokens": t(n_tokens),
        "n_samples": t(n_samples),
        "loss_weights": weights,
    }


def test_reduce_metrics_single_process_equals_the_local_metrics(out):
    from accelerate import Accelerator

    assert reduce_metrics(out.stats(), None) == out.metrics()
    assert reduce_metrics(dict(out.stats(), step_time=0.5), Accelerator(cpu=True)) == dict(out.metrics(), step_time=0.5)
    acc = StepMetrics()
    acc.add(out)
    acc.add(out)
    twice = reduce_metrics(acc.pop(), None)
    assert twice["n_audio_tokens"] == 2 * out.metrics()["n_audio_tokens"]
    assert twice["loss"] == pytest.approx(out.metrics()["loss"])


def test_finalize_is_token_weighted():
    """Two micro-batches/ranks: 3 text tokens at CE 2 and 1 at CE 6 -> 3.0, not (2+6)/2."""
    w = LossWeights(0.5, 1.0, (1.0, 3.0))
    a = _stats(6.0, 3, 3, [4.0, 0.0], [1, 0], [2, 0], 50, 1, w)
    b = _stats(6.0, 0, 1, [2.0, 9.0], [1, 2], [2, 3], 30, 1, w)
    summed = {k: (a[k] + b[k] if k != "loss_weights" else w) for k in a}
    m = finalize_metrics(summed)
    assert m["text_loss"] == 3.0 and m["text_acc"] == 0.75
    assert m["per_codebook_loss"] == [1.5, 3.0] and m["per_codebook_acc"] == [0.5, 2 / 3]
    assert m["audio_loss"] == (1 * 1.5 + 3 * 3.0) / 4 and m["audio_loss_sum"] == 4.5
    assert m["loss"] == 0.5 * 3.0 + (1.5 + 9.0) / 4
    assert m["audio_acc"] == 4 / 7 and m["n_audio_tokens_per_codebook"] == [4, 3] and m["n_samples"] == 2
    # a codebook with no token is left out of the weighted mean (rank a alone)
    alone = finalize_metrics(a)
    assert alone["audio_loss"] == 2.0 and alone["per_codebook_loss"] == [2.0, 0.0]


DIST_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration
    from test_train_loss import two_row_batch
    from higgs_tune.config import LossConfig
    from higgs_tune.train.logging import reduce_metrics
    from higgs_tune.train.loss import HiggsLossModule, StepMetrics, TokenCounts

    acc = Accelerator(cpu=True)
    r = acc.process_index
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(sys.argv[1], use_text_head=True)
    module = HiggsLossModule(model, LossConfig(text_weight=0.3))
    full, _ = two_row_batch(tok, model.config)
    # rank r gets row r, cut to its own length (ranks see different token counts)
    n, c = int(full["attention_mask"][r].sum()), int(full["audio_input_ids_mask"][r].sum())
    def cut(k, v):
        if k == "sample_ids":
            return v[r:r + 1]
        return v[r:r + 1, :n] if k in ("input_ids", "attention_mask", "labels") else v[r:r + 1, :c]
    batch = {k: cut(k, v) for k, v in full.items()}
    counts = module.count_tokens(batch).reduced(acc)
    wrapped = acc.prepare(module)          # DDP wraps the loss module; its forward is the one called
    out = wrapped(**batch)
    acc.backward(out.loss_for_step(counts, scale=acc.num_processes))
    step = StepMetrics()
    step.add(out)
    metrics = reduce_metrics(dict(step.pop(), rank=float(r)), acc)
    if r == 0:
        grad = model.audio_lm_head.weight.grad
        json.dump({"metrics": metrics, "type": type(wrapped).__name__, "grad_sum": float(grad.double().sum()),
                   "grad_abs": float(grad.double().abs().sum())}, open(sys.argv[2], "w"))
    acc.wait_for_everyone()
    acc.end_training()
""")


@pytest.mark.slow  # torchrun, two processes importing torch + transformers: 25-30 s on 2 busy cores
@pytest.mark.multiproc
def test_two_ranks_ddp_gradients_and_reduced_metrics_equal_the_whole_batch(tmp_path, tiny_dir, tok):
    """torchrun, 2 CPU ranks (gloo), one row each: DDP-averaged gradients of loss_for_step and the
    token-weighted reduced metrics equal one process computing the whole two-row batch."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    result_file = tmp_path / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tiny_dir),
            str(result_file),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result_file.read_text())
    assert got["type"] == "DistributedDataParallel"

    torch.manual_seed(0)
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    module = HiggsLossModule(m, LossConfig(text_weight=0.3))
    whole, _ = two_row_batch(tok, m.config)
    out = module(**whole)
    out.loss.backward()
    grad = m.audio_lm_head.weight.grad.double()
    assert got["grad_sum"] == pytest.approx(float(grad.sum()), rel=1e-4, abs=1e-7)
    assert got["grad_abs"] == pytest.approx(float(grad.abs().sum()), rel=1e-4)
    expected = out.metrics()
    metrics = got["metrics"]
    assert metrics["rank"] == 0.5  # extras are averaged over ranks
    for key in (
        "loss",
        "text_loss",
        "audio_loss",
        "audio_loss_sum",
        "per_codebook_loss",
        "per_codebook_acc",
        "audio_acc",
    ):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    for key in ("n_text_tokens", "n_audio_tokens", "n_audio_tokens_per_codebook", "n_samples"):
        assert metrics[key] == expected[key], key


# ---------------------------------------------------------------------- preview
def test_preview_decodes_arabic_targets_as_text(model, tok):
    """Text labels on an Arabic user turn (not the contract's targets, but a real decode test)."""
    codes = torch.randint(0, 1024, (K, 3), generator=torch.Generator().manual_seed(1))
    sample = build_sample(
        tok,
        model.config,
        [("system", "Generate audio following instruction."), ("user", ARABIC), ("assistant", codes, True)],
    )
    b, _ = collate([sample], tok.pad_token_id, ["ar-1"])
    arabic_ids = tok(ARABIC, add_special_tokens=False)["input_ids"]
    ids = b["input_ids"][0].tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(arabic_ids)] == arabic_ids)
    b["labels"] = b["labels"].clone()
    b["labels"][0, start : start + len(arabic_ids)] = torch.tensor(arabic_ids)
    with torch.no_grad():
        out = HiggsLossModule(model, LossConfig())(**b)
    preview = prediction_preview(out.predictions, b["sample_ids"], tok, step=0, stream_eos_id=EOS)
    first = preview.record["samples"][0]["text"][0]
    assert first["target"] == ARABIC and first["position"] == start
    assert f"target «{ARABIC}»" in preview.text
    assert not any(ch in preview.text for ch in "ØÙÚÛ")  # byte-level BPE symbols of Arabic letters
    json.dumps(preview.record, ensure_ascii=False)


def test_preview_table_on_crafted_predictions(tok):
    ids = tok.convert_tokens_to_ids
    t = lambda *x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    pred = Predictions(
        text_rows=t(0, 0, 0, 1),
        text_positions=t(40, 12, 41, 5),  # unsorted on purpose
        text_target=t(ids("<|audio_eos|>"), ids("<|audio_out_bos|>"), ids("<|eot_id|>"), 7),
        text_pred=t(ids("<|audio_eos|>"), ids("<|audio_out_bos|>"), ids("<|audio_eos|>"), 7),
        audio_rows=t(0, 0, 0, 1),
        audio_positions=t(14, 13, 15, 3),
        # 2 codebooks; rows sorted by position: 13, 14, 15
        audio_target=torch.tensor([[5, -100], [6, 1], [EOS, 2], [9, 9]]),
        audio_pred=torch.tensor([[5, 0], [0, 1], [EOS, 2], [9, 9]]),
        audio_context=torch.zeros(4, 2, dtype=torch.long),
    )
    p = prediction_preview(pred, ["a", "b"], tok, step=20, num_frames=2, stream_eos_id=EOS)
    assert p.text == "\n".join(
        [
            "preview · step 20 (train)",
            "  sample a",
            "    text @12    target «<|audio_out_bos|>»  pred «<|audio_out_bos|>»",
            "    text @40    target «<|audio_eos|><|eot_id|>»  pred «<|audio_eos|><|audio_eos|>»",
            "    text accuracy 2/3",
            "    audio: first 2 scored frames per codebook (target / pred), accuracy over all",
            "      cb0  target [   6    5]",
            "           pred   [   0    5]  acc 0.667 (2/3)",
            "      cb1  target [   1    2]",
            "           pred   [   1    2]  acc 1.000 (2/2)",
        ]
    )
    s = p.record["samples"][0]
    assert s["audio"][0] == {"codebook": 0, "target": [6, 5], "pred": [0, 5], "correct": 2, "n": 3, "acc": 2 / 3}
    assert s["text_correct"] == 2 and s["n_text_tokens"] == 3
    assert len(p.record["samples"]) == 1  # num_samples=1 by default
    assert math.isclose(s["audio"][1]["acc"], 1.0)

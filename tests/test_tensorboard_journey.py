"""TensorBoard: per-codebook curves grouped in a custom layout, the hyper-parameters with the run's
last losses, and `evaluate`'s scores at the evaluated checkpoint's step."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from higgs_tune.train.logging import MetricsLogger, log_evaluation


def _events(folder):
    return b"".join(p.read_bytes() for p in folder.rglob("events.out.tfevents.*"))


def test_layout_hparams_and_evaluation(tmp_path):
    run = tmp_path / "run"
    config = {"finetune": {"mode": "lora", "lora_r": 16, "pathways": ["text_attn"]}, "train": {"learning_rate": 0.003}}
    with MetricsLogger(run, ["tensorboard"], config=config) as log:
        for step in (1, 2):
            log.log(step, {"loss": 3.0 / step, "per_codebook_loss": [2.0, 1.0], "per_codebook_acc": [0.1, 0.2]})
        log.log(2, {"loss": 2.5, "per_codebook_loss": [1.5, 1.0]}, split="eval")
    log_evaluation(run, {"wer": 0.5, "cer": 0.25, "speaker_similarity": 0.75, "num_clips": 6}, step=2)
    raw = _events(run / "tensorboard")
    assert b"custom_scalars" in raw and b"train/per_codebook_acc/.*" in raw and b"eval/per_codebook_loss/.*" in raw
    assert b"hparams" in raw and b"finetune.lora_r" in raw and b"hparam/eval/loss" in raw
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/per_codebook_acc/0", "eval/loss", "evaluation/wer", "evaluation/speaker_similarity"} <= set(scalars)
    assert "evaluation/num_clips" not in scalars
    assert [(e.step, e.value) for e in acc.Scalars("evaluation/cer")] == [(2, 0.25)]

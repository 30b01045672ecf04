"""FSDP (FSDP2, two processes on CPU, gloo): training runs sharded, every rank writes its own shards
of the weights and optimizer state with torch.distributed.checkpoint (no rank-0 gather), a resumed
run in two processes continues exactly, and one process (no FSDP) loads the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from recipe_support import preset_dict, run_folder_at_checkpoint, torchrun2, train_losses
from safetensors.torch import load_file

from higgs_tune.config import config_from_dict
from higgs_tune.errors import CheckpointError
from higgs_tune.families.select import family_for
from higgs_tune.runfs import owned_names
from higgs_tune.train.checkpoint import find_resume_checkpoint, load_training_state, verify_checkpoint
from higgs_tune.train.loss import make_loss_module
from higgs_tune.train.recipe import train

REPO = Path(__file__).resolve().parents[1]
# torchrun, two processes: 20-90 s on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}


def accelerate_env(config_file: Path) -> dict:
    """The environment `accelerate launch --config_file CONFIG_FILE` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", "2", "x.py"])
    args = _validate_launch_command(args)[0]
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def resume_in_two_processes(run: Path, preset, env: dict, tmp_path: Path) -> Path:
    """A copy of `run` as at checkpoint-2, resumed in two processes; its steps 3-4 equal `run`'s."""
    resumed = run_folder_at_checkpoint(run, 2, tmp_path / "resumed")
    config = tmp_path / "resumed.yaml"
    config.write_text(yaml.safe_dump(preset(resumed)))
    p = torchrun2("fsdp_train_script.py", str(config), "--resume", "auto", env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert train_losses(resumed) == train_losses(run)
    return resumed


def _dcp_full(folder, tmp_path) -> dict:
    """The whole content of a checkpoint's shards, read by torch's own converter (not our loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder / "dcp", out)
    return torch.load(out, weights_only=False)


def usual_name(k: str, mode: str) -> str:
    """The name a shard's tensor has in the usual weights (PEFT's adapter, or save_pretrained's model)."""
    k = k.removeprefix("model.")
    return k.replace(".modules_to_save.default", "").replace(".default", "") if mode == "lora" else k


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_sharded_checkpoints_resume_exactly_and_in_one_process(mode, tiny_dir, demo_cache, tmp_path):
    def preset(out) -> dict:  # the demo preset, LoRA or full, four steps, a checkpoint every two
        data = preset_dict(tiny_dir, demo_cache, None, out)
        if mode == "full":
            data["finetune"] = {"mode": "full"}
        data["train"].update(max_steps=4, log_steps=1, warmup_steps=1, sample_steps=None, eval_steps=None)
        data["checkpoint"].update(save_steps=2, keep_best=False)
        data["data"]["eval_cache"] = None
        return data

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(preset(run)))
    # full fine-tuning runs with the shipped accelerate config (one FSDP unit per decoder layer)
    env = FSDP_ENV if mode == "lora" else accelerate_env(REPO / "configs" / "accelerate" / "fsdp2.yaml")
    p = torchrun2("fsdp_train_script.py", str(config), env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "2 process(es)" in p.stdout and "trained parameter types: ['DTensor']" in p.stdout
    units = int(p.stdout.split("fsdp units:")[1].split()[0])
    assert units == 1 if mode == "lora" else units > 2, p.stdout[-1000:]
    assert all(norm > 0 for _, norm in train_losses(run).values())  # clipping sees the sharded gradients

    # checkpoint-2: each rank's shard file plus the metadata, every one listed with its sha256; no gathered state
    ckpt = run / "checkpoint-2"
    manifest = verify_checkpoint(ckpt)
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata"} <= set(manifest["files"])
    assert manifest["world_size"] == 2
    assert not (ckpt / "adapter_model.safetensors").exists()
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["optimizer_layout"] == "dcp" and state["optimizer"] is None and len(state["rng"]) == 2
    # the two ranks wrote different halves: each shard file is about half of the trained state
    sizes = [manifest["files"][f"dcp/__{r}_0.distcp"]["bytes"] for r in (0, 1)]
    assert min(sizes) > 0.3 * sum(sizes)

    # the shards hold every trained weight and its AdamW moments, whole once read back
    full = _dcp_full(ckpt, tmp_path)
    weights = {k: v for k, v in full["model"].items()}
    moments = full["optim"]["state"]
    assert len(weights) > 0 and set(moments) == set(weights)
    assert all(moments[k]["exp_avg"].shape == weights[k].shape for k in weights)

    # final/ holds the shards AND the usual weights (for generate / export), equal to the shards' weights
    weights_file = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    final_manifest = verify_checkpoint(run / "final")
    assert weights_file in final_manifest["files"] and "dcp/.metadata" in final_manifest["files"]
    final_full = _dcp_full(run / "final", tmp_path)
    usual = load_file(run / "final" / weights_file)

    shards = {usual_name(k, mode): v for k, v in final_full["model"].items()}
    assert len(usual) > 0
    assert set(shards) <= set(usual) if mode == "full" else set(usual) <= set(shards)
    for name in set(usual) & set(shards):
        assert torch.equal(shards[name], usual[name]), name

    # resume from checkpoint-2 in two processes: steps 3-4 and the final weights equal the uninterrupted run
    resumed = resume_in_two_processes(run, preset, env, tmp_path)
    a, b = (load_file(d / "final" / weights_file) for d in (run, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # one process, no FSDP: the shards of two ranks load whole into an unsharded model and optimizer
    cfg = config_from_dict(preset(tmp_path / "one"))
    family = family_for(cfg.model.name_or_path, cfg.model.family)
    model = family.apply_finetuning(family.load_model(cfg.model, device="cpu"), cfg.finetune)
    root = make_loss_module(family, model, cfg.loss)
    trainable = [p for p in root.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    restored = load_training_state(ckpt, optimizer=optimizer, scheduler=None, world_size=1, rank=0, model_root=root)
    assert restored.step == 2 and restored.sampler_state["num_replicas"] == 1
    assert restored.sampler_state["batches_consumed"] == 2 * state["sampler_state"]["batches_consumed"]
    names = {p: n for n, p in root.named_parameters()}
    for param in trainable:
        name = names[param]
        assert torch.equal(param.detach(), weights[name]), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key], moments[name][key]), (name, key)

    # and a one-process run resumes that checkpoint end to end (not bit-exact: the batches are regrouped)
    one = run_folder_at_checkpoint(run, 2, tmp_path / "one")
    result = train(config_from_dict(preset(one)), resume="auto")
    losses = train_losses(one)
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == train_losses(run)[1]
    assert all(torch.isfinite(torch.tensor(loss)) for loss, _ in losses.values())
    assert result.model is not None and (one / "final" / weights_file).is_file()
    assert json.loads((one / "final" / "manifest.json").read_text())["world_size"] == 1

    # a damaged shard of any rank is caught on resume, which falls back to the previous checkpoint
    shard = run / "final" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp does not match its sha256"):
        verify_checkpoint(run / "final")
    assert find_resume_checkpoint(run) == max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_fsdp_one_rank_failing_to_write_its_shards_publishes_nothing(tiny_dir, demo_cache, tmp_path):
    """Rank 1 cannot write its shards at step 2: no checkpoint-2 appears (not even a partial one), no
    temporary folder stays, both ranks carry on (on_save_error: continue) and later saves are whole."""
    run = tmp_path / "run"
    data = preset_dict(tiny_dir, demo_cache, None, run)
    data["train"].update(max_steps=4, log_steps=1, warmup_steps=1, sample_steps=None, eval_steps=None)
    data["checkpoint"].update(save_steps=2, keep_best=False, on_save_error="continue")
    data["data"]["eval_cache"] = None
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    p = torchrun2("fsdp_train_script.py", str(config), env={**FSDP_ENV, "HIGGS_TEST_FAIL_SHARDS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "No space left on device" in p.stdout + p.stderr
    assert not (run / "checkpoint-2").exists()
    assert not [x.name for x in run.iterdir() if x.name.startswith(".tmp-")]
    assert sorted(train_losses(run)) == [1, 2, 3, 4]
    files = verify_checkpoint(run / "final")["files"]  # the save after the failed one is whole
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata"} <= set(files)
    owned = owned_names(run)  # the ownership manifest lists what was published, nothing else
    assert "checkpoint-2" not in owned and "final" in owned


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_v3_under_fsdp_final_weights_equal_the_shards_and_resume_exactly(mode, tiny_v3_stack, v3_demo_cache, tmp_path):
    """Higgs Audio v3 under FSDP2: the sharded checkpoints, final/'s usual weights (LoRA adapter +
    the ONE audio table, or the whole model) gathered from the shards and equal to them, exact
    resume in two processes, and final/ loads for generation in one process. Full fine-tuning
    wraps one FSDP unit per Qwen3 decoder layer (the v3 body's layer class)."""
    from higgs_tune.infer.loading import load_inference_stack

    def preset(out) -> dict:
        data = preset_dict(tiny_v3_stack, v3_demo_cache, None, out)
        data["finetune"] = {"mode": "full", "pathways": []} if mode == "full" else {"train_modules": []}
        data["train"].update(max_steps=4, log_steps=1, warmup_steps=1, sample_steps=None, eval_steps=None)
        data["checkpoint"].update(save_steps=2, keep_best=False)
        data["data"]["eval_cache"] = None
        return data

    env = FSDP_ENV
    if mode == "full":
        env = {
            **FSDP_ENV,
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen3DecoderLayer",
        }
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(preset(run)))
    p = torchrun2("fsdp_train_script.py", str(config), env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "trained parameter types: ['DTensor']" in p.stdout
    units = int(p.stdout.split("fsdp units:")[1].split()[0])
    assert units == 1 if mode == "lora" else units > 2, p.stdout[-1000:]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(verify_checkpoint(run / "checkpoint-2")["files"])

    final = run / "final"
    files = verify_checkpoint(final)["files"]
    shards = _dcp_full(final, tmp_path)["model"]
    if mode == "lora":
        assert {"adapter_model.safetensors", "audio_table.safetensors"} <= set(files)
        table = load_file(final / "audio_table.safetensors")["audio_table.weight"]
        (shard_table,) = [v for k, v in shards.items() if k.endswith("audio_table.weight")]
        assert torch.equal(table, shard_table)
        adapter = load_file(final / "adapter_model.safetensors")
        lora_shards = {k: v for k, v in shards.items() if "lora_" in k}
        assert len(adapter) == len(lora_shards) > 0
        for (
            name,
            tensor,
        ) in adapter.items():  # peft drops the adapter name: ".lora_A.weight" <- ".lora_A.default.weight"
            (match,) = [v for k, v in lora_shards.items() if k.removeprefix("model.").replace(".default", "") == name]
            assert torch.equal(tensor, match), name
    else:
        saved = load_file(final / "v3_trained.safetensors")
        assert set(saved) == {k.removeprefix("model.") for k in shards}
        for k, v in shards.items():
            assert torch.equal(saved[k.removeprefix("model.")], v), k

    resumed = resume_in_two_processes(run, preset, env, tmp_path)
    weights_file = "audio_table.safetensors" if mode == "lora" else "v3_trained.safetensors"
    a, b = (load_file(d / "final" / weights_file) for d in (run, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stack = load_inference_stack(tiny_v3_stack, final, device="cpu")  # what generate / export load
    base = stack.model.get_base_model() if mode == "lora" else stack.model
    assert torch.equal(base.audio_table.weight, a["audio_table.weight"])


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_fsdp_generates_samples_and_quality_as_one_process_does(
    family, tiny_dir, demo_cache, demo_heldout_cache, tiny_v3_stack, v3_demo_cache, v3_heldout_cache, tmp_path
):
    """Under FSDP2 (full fine-tuning, one unit per decoder layer) every rank generates the training
    samples and the quality set in step with the main process, which writes and scores them: the files
    equal those of one process without FSDP on the same weights. The learning rate is 1e-30, so every
    update is below float32 resolution and both runs keep the base weights (a wrong premise fails the
    comparison, it cannot pass it)."""
    from higgs_tune.tiny.eval_models import make_tiny_eval_models

    asr, speaker = make_tiny_eval_models(tmp_path / "eval-models", seed=0)
    model, train_cache, heldout = (
        (tiny_dir, demo_cache, demo_heldout_cache)
        if family == "v2"
        else (tiny_v3_stack, v3_demo_cache, v3_heldout_cache)
    )

    def preset(out: Path) -> dict:
        data = preset_dict(model, train_cache, heldout, out)
        data["finetune"] = {"mode": "full"} if family == "v2" else {"mode": "full", "pathways": []}
        data["train"].update(
            max_steps=2,
            learning_rate=1e-30,
            warmup_steps=1,
            log_steps=1,
            eval_steps=None,
            sample_steps=1,
            num_samples=2,
            quality_eval_steps=2,
            quality_eval_clips=2,
            quality_asr_model=str(asr),
            quality_speaker_model=str(speaker),
            quality_cache_dir=str(out.parent / f"{out.name}-baselines"),  # each run scores its base model
        )
        data["checkpoint"].update(save_steps=2, keep_best=False)
        return data

    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(preset(sharded)))
    if family == "v2":
        env = accelerate_env(REPO / "configs" / "accelerate" / "fsdp2.yaml")
    else:
        env = accelerate_env(REPO / "configs" / "accelerate" / "fsdp2-v3.yaml")
    p = torchrun2("fsdp_train_script.py", str(config), env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "trained parameter types: ['DTensor']" in p.stdout
    assert int(p.stdout.split("fsdp units:")[1].split()[0]) > 2  # nested units: the layers gather per call
    train(config_from_dict(preset(one)))

    def files(run: Path) -> dict[str, bytes]:
        found = [*run.glob("samples/step-*/*.wav"), *run.glob("quality/step-*/wavs/*.wav")]
        return {str(f.relative_to(run)): f.read_bytes() for f in found}

    got, want = files(sharded), files(one)
    assert sorted(want) == sorted(got)
    # samples after steps 1 and 2, the quality set of the base model (step 0) and of step 2
    assert {Path(k).parts[:2] for k in want} == {
        ("samples", "step-1"),
        ("samples", "step-2"),
        ("quality", "step-0"),
        ("quality", "step-2"),
    }
    assert len(want) == 2 * 2 + 2 * 2
    for name in want:
        assert got[name] == want[name], name
    assert all(len(data) > 44 for data in want.values())  # more than a WAV header: audio was generated

    def scores(run: Path) -> dict:
        doc = json.loads((run / "quality" / "history.json").read_text(encoding="utf-8"))
        keep = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "cost_seconds", "cache_key", "train_loss")}  # noqa: E731
        return {"baseline": keep(doc["baseline"]), "evals": [keep(e) for e in doc["evals"]]}

    assert scores(sharded) == scores(one)
    assert [e["step"] for e in scores(sharded)["evals"]] == [2]


def test_fsdp_best_checkpoint_holds_the_usual_weights(tiny_dir, demo_cache, demo_heldout_cache, tmp_path):
    """A checkpoint of an FSDP run that becomes the new best (best/ links it) also gets the usual
    weights, equal to its shards, so best/ generates like final/; one that is not the best holds only
    shards, and generate says so instead of failing on a missing file."""
    from higgs_tune.errors import ModelLoadError
    from higgs_tune.families.base import has_usual_weights
    from higgs_tune.infer.loading import load_inference_stack

    run = tmp_path / "run"
    data = preset_dict(tiny_dir, demo_cache, demo_heldout_cache, run)
    # a save and an evaluation every step; a learning rate far too high makes the held-out loss rise
    data["train"].update(max_steps=4, log_steps=1, warmup_steps=1, sample_steps=None, eval_steps=1, learning_rate=1.0)
    data["checkpoint"].update(save_steps=1, save_total_limit=10, keep_best=True, best_metric="eval_loss")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    p = torchrun2("fsdp_train_script.py", str(config), env=FSDP_ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    # every checkpoint in save order: usual weights exactly where it was the best so far
    losses = {s: json.loads((run / f"checkpoint-{s}" / "manifest.json").read_text())["eval_loss"] for s in (1, 2, 3)}
    assert losses[1] < min(losses[2], losses[3])  # measured: 11.3, 93.7, 14.2 (checkpoint-1 stays the best)
    best_so_far = None
    for step in (1, 2, 3):
        became_best = losses[step] is not None and (best_so_far is None or losses[step] <= best_so_far)
        best_so_far = losses[step] if became_best else best_so_far
        assert has_usual_weights(run / f"checkpoint-{step}") == became_best, step
    assert has_usual_weights(run / "final")

    best = run / "best"
    manifest = verify_checkpoint(best)
    assert "adapter_model.safetensors" in manifest["files"] and "dcp/.metadata" in manifest["files"]
    usual = load_file(best / "adapter_model.safetensors")
    shards = {usual_name(k, "lora"): v for k, v in _dcp_full(best, tmp_path)["model"].items()}
    assert set(usual) <= set(shards)
    assert all(torch.equal(usual[k], shards[k]) for k in usual)
    stack = load_inference_stack(None, best, device="cpu")  # best/ loads for generation
    assert stack.adapter == str(best)

    with pytest.raises(ModelLoadError, match=r"checkpoint-2 is a checkpoint of an FSDP run: it holds the weights "):
        load_inference_stack(None, run / "checkpoint-2", device="cpu")

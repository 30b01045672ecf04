"""`higgs-tune ui` without a browser: path confinement, the HTTP API, config validation, the
per-folder job lock, the bind policy, and (slow) the whole flow on the tiny stack through the
API: prepare, train, stop with SIGINT, resume, generate, export. The page itself is driven in
Chromium by tests/test_ui_browser.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from higgs_tune.app.ui.jobs import JobConflict, JobRegistry, read_progress
from higgs_tune.app.ui.paths import PathNotAllowed, Roots
from higgs_tune.app.ui.server import demo_paths, serve_in_thread

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
class Client:
    def __init__(self, url: str):
        self.url = url

    def _open(self, req) -> tuple[int, dict | bytes]:
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, json.loads(body) if ctype.startswith("application/json") else body

    def get(self, path: str):
        return self._open(self.url + path)

    def post(self, path: str, body, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        return self._open(req)


@pytest.fixture
def ui(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    demo = demo_paths()
    server, app, url = serve_in_thread(Roots([ws], read_only=[demo["dir"]]))
    yield Client(url), app, ws
    server.shutdown()
    server.server_close()
    app.jobs.shutdown(timeout=30)


# ----------------------------------------------------------------------------- paths
def test_roots_confine_paths(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "data").mkdir(parents=True)
    other.mkdir()
    (root / "escape").symlink_to(other)
    ro = tmp_path / "demo"
    ro.mkdir()
    roots = Roots([root], read_only=[ro])

    assert roots.resolve("data/x.wav") == root.resolve() / "data" / "x.wav"
    assert roots.resolve(str(root / "data")) == root.resolve() / "data"
    assert roots.resolve(str(ro / "m.jsonl")) == ro.resolve() / "m.jsonl"
    with pytest.raises(PathNotAllowed, match=r"contains '\.\.'"):
        roots.resolve("data/../data/x.wav")  # climbs, even though it lands inside
    with pytest.raises(PathNotAllowed, match=r"contains '\.\.'"):
        roots.resolve("../other/x.wav")
    with pytest.raises(PathNotAllowed, match="outside the folders this UI may use"):
        roots.resolve(str(other / "x.wav"))
    with pytest.raises(PathNotAllowed, match="outside the folders this UI may use"):
        roots.resolve("/etc/passwd")
    with pytest.raises(PathNotAllowed, match="outside the folders this UI may use"):
        roots.resolve("escape/x.wav")  # a symlink out of the root
    with pytest.raises(PathNotAllowed, match="outside the folders this UI may write"):
        roots.resolve(str(ro / "cache"), write=True)  # read-only root
    with pytest.raises(PathNotAllowed, match="is empty"):
        roots.resolve("  ")


def test_api_refuses_paths_outside_the_roots(ui, tmp_path):
    client, _, ws = ui
    (tmp_path / "secret.wav").write_bytes(b"RIFF....WAVE")
    for bad in ("../secret.wav", str(tmp_path / "secret.wav"), "/etc/passwd"):
        status, body = client.get("/api/audio?path=" + urllib.request.quote(bad))
        assert status == 403 and "secret" not in json.dumps(body).replace(bad, "")
    status, body = client.get("/api/inspect?cache=" + urllib.request.quote(str(tmp_path)))
    assert status == 400 and "outside the folders this UI may use" in body["error"]
    status, body = client.post("/api/prepare", {"kind": "manifest", "source": "x.jsonl", "model": "m", "out": "../c"})
    assert status == 400 and "contains '..'" in body["error"]
    # an upload keeps only the file name: it lands in the UI's upload folder
    status, body = client.post("/api/upload?name=../../evil.wav", b"RIFFdata", {"Content-Type": "audio/wav"})
    assert status == 200 and Path(body["path"]) == ws.resolve() / ".higgs-tune-ui" / "uploads" / "evil.wav"
    assert not (tmp_path / "evil.wav").exists()


def test_api_refuses_cross_origin_posts_and_foreign_hosts(ui):
    client, _, _ = ui
    status, body = client.post("/api/make-tiny", {}, {"Origin": "http://evil.example"})
    assert status == 403 and body == {"error": "cross-origin request refused"}
    # DNS rebinding: a page of evil.example resolving to 127.0.0.1 is same-origin with itself
    req = urllib.request.Request(client.url + "/api/info", headers={"Host": "evil.example:7860"})
    status, body = client._open(req)
    assert status == 403 and "only requests addressed to 127.0.0.1" in body["error"]
    req = urllib.request.Request(client.url + "/api/info", headers={"Host": "localhost"})
    assert client._open(req)[0] == 200


def test_audio_is_served_as_wav(ui):
    client, _, _ = ui
    flac = Path(demo_paths()["dir"]) / "audio" / "en_a_000.flac"
    status, body = client.get("/api/audio?path=" + urllib.request.quote(str(flac)))
    assert status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WAVE"


# ----------------------------------------------------------------------------- config
def test_config_shows_every_problem_at_once(ui):
    client, _, _ = ui
    status, info = client.get("/api/info")
    assert status == 200
    names = [p["name"] for p in info["presets"]]
    assert {"demo-tiny-cpu.yaml", "lora-1gpu.yaml", "full-multigpu.yaml"} <= set(names)
    demo = next(p for p in info["presets"] if p["name"] == "demo-tiny-cpu.yaml")
    assert demo["placeholders"] == ["DEMO_CACHE", "DEMO_HELDOUT_CACHE", "OUTPUT_DIR", "TINY_MODEL"]
    assert set(info["source_kinds"]) == {"manifest", "folder", "hf"}
    assert "family" in info["config"]["fields"]  # model.family: v2 | v3, offered on the Train form

    status, r = client.post(
        "/api/config",
        {"preset": "demo-tiny-cpu.yaml", "output_dir": "run", "lora_r": 0, "extra": "train.bogus=1"},
    )
    assert status == 200 and r["ok"] is False
    assert r["problems"] == [
        "model.name_or_path is the preset's placeholder ${TINY_MODEL}: fill it in the form.",
        "data.train_cache is the preset's placeholder ${DEMO_CACHE}: fill it in the form.",
        "train.bogus: unknown key.",
        "finetune.lora_r must be > 0, got 0.",
        # the held-out placeholder left empty means no held-out split: the library says what that breaks
        "checkpoint.keep_best needs a held-out split: set data.eval_cache or data.eval_fraction.",
        "train.eval_steps is set but there is no held-out split: set data.eval_cache or data.eval_fraction.",
    ]

    status, r = client.post(
        "/api/config",
        {
            "preset": "demo-tiny-cpu.yaml",
            "model": "tiny",
            "train_cache": "cache/train",
            "eval_cache": "cache/heldout",
            "output_dir": "run",
            "max_steps": 17,
            "pathways": ["text_attn", "audio_mlp"],
        },
    )
    assert r["ok"] is True and r["problems"] == []
    assert "max_steps: 17" in r["yaml"] and "- audio_mlp" in r["yaml"] and "- text_mlp" not in r["yaml"]
    ws = Path(info["home"])
    assert f"output_dir: {ws / 'run'}" in r["yaml"]


def test_run_status_shows_curves_warnings_and_samples(ui):
    """What the Train tab polls: charts (loss, per-codebook accuracy), health warnings as
    logged in metrics.jsonl, sample WAVs, complete checkpoints only."""
    import numpy as np
    import soundfile as sf

    client, _, ws = ui
    run = ws / "run"
    (run / "samples" / "step-4").mkdir(parents=True)
    sf.write(run / "samples" / "step-4" / "a.wav", np.zeros(2400, dtype=np.float32), 24000)
    records = [
        {"event": "metrics", "step": s, "split": "train", "loss": 10.0 - s, "audio_loss": 6.0 - s / 2,
         "per_codebook_acc": [0.1 * s, 0.05 * s]}
        for s in (2, 4)
    ] + [
        {"event": "warning", "code": "loss_flat", "step": 4, "message": "the audio loss has not moved"},
        {"event": "samples", "step": 4, "files": ["a.wav"], "stopped": [False], "frames": [4]},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run / "checkpoint-4").mkdir()  # no manifest.json: being written, not offered

    status, r = client.get("/api/run?dir=run")
    assert status == 200 and r["job"] is None and r["checkpoints"] == []
    assert r["last"]["step"] == 4
    assert [(w["code"], w["step"], w["message"]) for w in r["warnings"]] == [
        ("loss_flat", 4, "the audio loss has not moved")
    ]
    assert r["samples"] == [
        {
            "step": 4,
            "files": [{"name": "a.wav", "path": str(run.resolve() / "samples/step-4/a.wav"), "status": [False, 4]}],
        }
    ]
    charts = "".join(r["charts"])
    assert "Total loss" in charts and "Per-codebook accuracy (train)" in charts and 'data-series="cb1"' in charts


# ----------------------------------------------------------------------------- jobs
def test_one_job_per_output_folder(tmp_path):
    """The second start for a folder is refused, also from another registry (another UI);
    stop sends SIGINT; a finished job frees the folder."""
    jobs, other_ui = JobRegistry(tmp_path / "state"), JobRegistry(tmp_path / "state")
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    # a long-lived higgs-tune command that handles SIGINT: the UI itself on a free port
    serve = ["ui", "--port", "0", "--root", str(tmp_path / "ws")]
    job = jobs.start("train", folder_a, serve)
    try:
        with pytest.raises(JobConflict, match=f"already running for {folder_a}"):
            jobs.start("train", folder_a, serve)
        with pytest.raises(JobConflict, match="already running"):
            other_ui.start("train", folder_a, serve)
        job_b = jobs.start("train", folder_b, serve)
        deadline = time.time() + 60
        while time.time() < deadline and not all("higgs-tune ui: http://127" in j.log_tail() for j in (job, job_b)):
            time.sleep(0.2)
        jobs.stop(job_b.id)
    finally:
        jobs.stop(job.id)
    assert job.process.wait(60) == 0 and job_b.process.wait(60) == 0
    assert job.state == "finished" and "stopping" in job.log_tail()
    again = other_ui.start("train", folder_a, serve)  # the lock went with the process
    other_ui.shutdown(timeout=60)
    assert again.state in ("stopped", "finished")  # SIGINT before or after its handler was installed


def test_read_progress_takes_the_newest_tqdm_state():
    log = "checking audio: 100%|##| 26/26\rencoding:  10%|#  | 2/20 [00:01<00:09]\rencoding:  40%|####| 8/20 [00:02]"
    assert read_progress(log) == (8, 20)
    assert read_progress("Loading weights: 100%|##| 309/309") is None
    plain = (
        "checking audio: 26/26 files (100%) elapsed 0:00:00 ETA 0:00:00\nencoding: 12/26 clips (46%) elapsed 0:00:03"
    )
    assert read_progress(plain) == (12, 26)


# ----------------------------------------------------------------------------- the command
def test_public_bind_needs_the_flag_and_warns(tmp_path):
    cmd = [sys.executable, "-m", "higgs_tune", "ui", "--root", str(tmp_path)]
    r = subprocess.run([*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Add --public to do that on purpose" in r.stderr

    p = subprocess.Popen([*cmd, "--host", "0.0.0.0", "--port", "0", "--public"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = p.stdout.readline()
        assert line.startswith("higgs-tune ui: http://0.0.0.0:")
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert "warning: the UI listens on 0.0.0.0" in err and "There is no login" in err
    assert p.returncode == 0


# ----------------------------------------------------------------------------- the whole flow
def _wait(client, path, done, timeout=600):
    deadline = time.time() + timeout
    while True:
        status, body = client.get(path)
        assert status == 200, body
        if done(body):
            return body
        assert time.time() < deadline, body
        time.sleep(0.5)


@pytest.mark.slow
def test_flow_through_the_api(tmp_path, tiny_dir):
    """prepare -> inspect -> train -> stop (SIGINT: checkpoint + resume command) -> resume ->
    generate (checkpoint and base side by side) -> export, all as the page calls them."""
    ws = tmp_path / "ws"
    ws.mkdir()
    demo = demo_paths()
    server, app, url = serve_in_thread(Roots([ws, tiny_dir.parent], read_only=[demo["dir"]]))
    client = Client(url)
    try:
        # a folder of clips + transcripts, one transcript empty: rejected with its reason
        voices = ws / "voices" / "spk1"
        voices.mkdir(parents=True)
        for i, name in enumerate(("en_a_000", "en_a_001", "en_a_002")):
            shutil.copy(Path(demo["dir"]) / "audio" / f"{name}.flac", voices / f"{name}.flac")
            (voices / f"{name}.txt").write_text("" if i == 2 else f"Sentence number {i}.", encoding="utf-8")
        status, job = client.post(
            "/api/prepare",
            {"kind": "folder", "source": "voices", "language": "en", "model": str(tiny_dir), "out": "cache-folder",
             "skip_invalid": True},
        )  # fmt: skip
        assert status == 200, job
        job = _wait(client, f"/api/job?id={job['id']}", lambda j: j["state"] != "running")
        assert job["state"] == "finished", job["log"]
        assert (ws / "voices.jsonl").is_file()
        status, ins = client.get("/api/inspect?cache=cache-folder")
        assert ins["summary"]["clips"] == 2 and len(ins["summary"]["rejects"]) == 1
        assert "text" in ins["summary"]["rejects"][0]["reason"]

        status, job = client.post(
            "/api/prepare", {"kind": "manifest", "source": demo["manifest"], "model": str(tiny_dir), "out": "cache"}
        )
        assert status == 200, job
        job = _wait(client, f"/api/job?id={job['id']}", lambda j: j["state"] != "running")
        assert job["state"] == "finished" and job["progress"] == [26, 26], job["log"]
        status, ins = client.get("/api/inspect?cache=cache")
        assert ins["summary"]["clips"] == 26 and set(ins["summary"]["speakers"]) == {"ar_a", "en_a", "en_b"}
        assert all(Path(c["audio"]).is_file() for c in ins["clips"])

        form = {
            "preset": "demo-tiny-cpu.yaml",
            "model": str(tiny_dir),
            "train_cache": "cache",
            "output_dir": "run",
            "max_steps": 40,
            "extra": "checkpoint.save_steps=4\ntrain.log_steps=2\ntrain.sample_steps=40\n"
            "train.eval_steps=4\ndata.eval_fraction=0.2",
        }
        status, r = client.post("/api/train", dict(form, action="start"))
        assert r["ok"], r
        status, again = client.post("/api/train", dict(form, action="start"))
        assert status == 400 and "already running" in again["error"]
        _wait(client, "/api/run?dir=run", lambda s: any(c["name"] == "checkpoint-4" for c in s["checkpoints"]))
        client.post("/api/job/stop", {"id": r["job"]["id"]})
        run = _wait(client, "/api/run?dir=run", lambda s: s["job"]["state"] != "stopping")
        assert run["job"]["state"] == "stopped" and run["job"]["returncode"] == 130
        assert "--resume auto" in run["job"]["log"] and "newest complete checkpoint" in run["job"]["log"]
        stopped_at = run["checkpoints"][0]["step"]
        assert 4 <= stopped_at < 40 and run["charts"]

        status, r = client.post("/api/train", dict(form, action="resume"))
        assert r["ok"] and r["job"]["command"].endswith("--resume auto")
        run = _wait(client, "/api/run?dir=run", lambda s: s["job"]["state"] != "running")
        assert run["job"]["state"] == "finished", run["job"]["log"]
        assert run["last"]["step"] == 40
        # continued, not restarted (a fresh start into the non-empty folder is refused): one
        # record per logged step, the steps before the stop kept
        from higgs_tune.app.report import read_metrics

        assert [r["step"] for r in read_metrics(ws / "run" / "metrics.jsonl").train] == [1, *range(2, 41, 2)]
        names = [c["name"] for c in run["checkpoints"]]
        assert names[0] == "final" and run["checkpoints"][0]["step"] == 40
        assert [s["step"] for s in run["samples"]] == [40]

        final = run["checkpoints"][0]["path"]
        ref = str(Path(demo["dir"]) / "audio" / "en_a_000.flac")
        status, g = client.post(
            "/api/generate",
            {
                "text": "Please close the window.",
                "checkpoints": [final],
                "with_base": True,
                "ref_audio": ref,
                "ref_text": "The morning train was right on time.",
                "max_new_tokens": 40,
                "temperature": 0,
            },
        )
        assert status == 200, g
        assert [x["label"] for x in g["results"]] == ["final", "base model"]
        assert g["base_model"] == str(tiny_dir) and g["scored"] is False
        assert all("cer" not in x and "sim" not in x for x in g["results"])
        for x in g["results"]:
            status, wav = client.get("/api/audio?path=" + urllib.request.quote(x["path"]))
            assert status == 200 and wav[:4] == b"RIFF"

        from higgs_tune.tiny.eval_models import make_tiny_eval_models

        asr, spk = make_tiny_eval_models(ws / "eval-models")
        status, g = client.post(
            "/api/generate",
            {
                "text": "Please close the window.",
                "checkpoints": [final],
                "ref_audio": ref,
                "ref_text": "The morning train was right on time.",
                "language": "en",
                "max_new_tokens": 40,
                "asr_model": str(asr),
                "speaker_model": str(spk),
            },
        )
        assert status == 200, g
        assert g["scored"] is True and [x["label"] for x in g["results"]] == ["final"]
        (x,) = g["results"]
        assert isinstance(x["transcript"], str) and x["cer"] >= 0.0
        assert "sim" in x and (x["sim"] is None or -1.0 <= x["sim"] <= 1.0)  # None: shorter than the model takes

        status, e = client.post("/api/export", {"checkpoint": final, "out": "export"})
        assert status == 200, e
        assert e["merged_lora"] is True and "model.safetensors" in e["files"]
        assert "model card (final/README.md)" in e["card"] and "higgs_tune_export.json" in e["card"]
        status, e2 = client.post("/api/export", {"checkpoint": final, "out": "export"})
        assert status == 400 and "is not empty" in e2["error"]
    finally:
        server.shutdown()
        server.server_close()
        app.jobs.shutdown(timeout=60)
    assert not os.path.exists(ws / "run" / ".tmp-final")


def test_a_hugging_face_dataset_source_runs_prepare_with_its_columns(tmp_path):
    from higgs_tune.app.ui.service import prepare_args

    (tmp_path / "ds").mkdir()
    (tmp_path / "model").mkdir()
    roots = Roots([tmp_path])
    form = {
        "kind": "hf",
        "source": "ds",
        "model": "model",
        "out": "cache",
        "split": "train",
        "text_column": "sentence",
        "speaker_column": "speaker",
    }
    out, args = prepare_args(roots, form)
    assert out == (tmp_path / "cache").resolve()
    assert args == [
        "prepare",
        "--hf-dataset",
        str((tmp_path / "ds").resolve()),
        "--manifest-out",
        str((tmp_path / "ds.jsonl").resolve()),
        "--split",
        "train",
        "--text-column",
        "sentence",
        "--speaker-column",
        "speaker",
        "--model",
        str((tmp_path / "model").resolve()),
        "--out",
        str((tmp_path / "cache").resolve()),
    ]
    with pytest.raises(PathNotAllowed):
        prepare_args(roots, {**form, "source": "../elsewhere"})

"""The UI's HTTP server: one page (static/) and a JSON API, standard library only.

    GET  /                      the page
    GET  /api/info              roots, presets, data source kinds, form fields, the bundled demo data
    POST /api/prepare           start `higgs-tune prepare` (a job)            -> the job
    GET  /api/job?id=           a job's state, log tail and progress
    POST /api/job/stop          SIGINT to a job (train: verified checkpoint + resume command)
    GET  /api/inspect?cache=    `inspect`'s summary of a code cache, with its clips
    POST /api/config            the Train form -> validated config (YAML) or every problem at once
    POST /api/train             validate, save the config, start `higgs-tune train` (a job)
    GET  /api/run?dir=          charts, warnings, samples, checkpoints of a run folder (+ its job)
    GET  /api/audio?path=       an audio file as WAV (paths confined to the roots)
    POST /api/upload?name=      a reference clip (raw body) -> its saved path
    POST /api/generate          speak a text with checkpoints and the base model
    POST /api/export            merge a checkpoint into its base model
    POST /api/make-tiny         build the tiny offline stack (the demo's model)

Paths in every request go through `paths.Roots`; errors come back as {"error": message}
with status 400 (the library's own messages, which say what to fix).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

from higgs_tune.app.ui import service
from higgs_tune.app.ui.jobs import JobRegistry
from higgs_tune.app.ui.paths import Roots
from higgs_tune.errors import HiggsTuneError

log = logging.getLogger("higgs_tune.ui")

MAX_UPLOAD = 200 * 1024 * 1024
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def demo_paths() -> dict | None:
    from higgs_tune.app.demo import demo_data_dir

    try:
        data = demo_data_dir()
    except HiggsTuneError:
        return None
    return {"dir": str(data), "manifest": str(data / "manifest.jsonl"), "heldout": str(data / "heldout.jsonl")}


class UiApp:
    """State shared by the request threads: roots, jobs, loaded models."""

    def __init__(self, roots: Roots):
        self.roots = roots
        self.state_dir = roots.home / service.UI_DIR
        self.jobs = JobRegistry(self.state_dir)
        self.generator = service.Generator()
        self.demo = demo_paths()

    # ------------------------------------------------------------------ handlers: (query, body) -> JSON
    def info(self, q, body):
        return {
            "roots": self.roots.describe(),
            "home": str(self.roots.home),
            "presets": service.list_presets(),
            "source_kinds": service.SOURCE_KINDS,
            "config": service.config_fields(),
            "demo": self.demo,
        }

    def prepare(self, q, body):
        out, args = service.prepare_args(self.roots, body)
        return self.jobs.start("prepare", out, args).to_dict()

    def job(self, q, body):
        return self.jobs.get(q.get("id", "")).to_dict()

    def job_stop(self, q, body):
        return self.jobs.stop(str(body.get("id", ""))).to_dict()

    def inspect(self, q, body):
        return service.inspect_cache(self.roots, q.get("cache", ""))

    def config(self, q, body):
        cfg, problems, overrides = service.build_config(self.roots, body)
        return {
            "ok": cfg is not None,
            "problems": problems,
            "overrides": overrides,
            "yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True) if cfg else "",
        }

    def train(self, q, body):
        cfg, problems, _ = service.build_config(self.roots, body)
        if cfg is None:
            return {"ok": False, "problems": problems}
        out = Path(cfg.checkpoint.output_dir)
        path = service.save_config(self.roots, cfg)
        job = self.jobs.start("train", out, service.train_args(path, body.get("action", "start")))
        return {"ok": True, "config_path": str(path), "job": job.to_dict()}

    def run(self, q, body):
        status = service.run_status(self.roots, q.get("dir", ""))
        job = self.jobs.for_folder(Path(status["run_dir"]))
        status["job"] = job.to_dict() if job else None
        return status

    def upload(self, q, body_bytes: bytes):
        name = Path(q.get("name") or "upload.wav").name
        if Path(name).suffix.lower() not in service.AUDIO_SUFFIXES:
            raise service.UiInputError(f"{name}: upload a {', '.join(service.AUDIO_SUFFIXES)} file.")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = self.state_dir / "uploads" / safe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body_bytes)
        return {"path": str(path)}

    def generate(self, q, body):
        return self.generator.generate(self.roots, body)

    def export(self, q, body):
        return service.export(self.roots, body)

    def make_tiny(self, q, body):
        from higgs_tune.tiny import make_tiny

        out = self.roots.resolve(body.get("out") or "tiny-model", write=True, what="tiny model folder")
        if (out / "config.json").is_file():
            return {"path": str(out), "built": False}
        return {"path": str(make_tiny(out, seed=0)), "built": True}


_GET = {"/api/info": "info", "/api/job": "job", "/api/inspect": "inspect", "/api/run": "run"}
_POST = {
    "/api/prepare": "prepare",
    "/api/job/stop": "job_stop",
    "/api/config": "config",
    "/api/train": "train",
    "/api/generate": "generate",
    "/api/export": "export",
    "/api/make-tiny": "make_tiny",
}


class Handler(BaseHTTPRequestHandler):
    app: UiApp  # set on the subclass made by make_server
    allowed_hosts: frozenset[str] | None = None  # None: any Host header (a --public bind)
    server_version = "higgs-tune-ui"

    def _host_allowed(self) -> bool:
        """On a loopback bind, only requests addressed to a loopback name: a web page whose own
        domain resolves to 127.0.0.1 (DNS rebinding) gets no answer."""
        if self.allowed_hosts is None:
            return True
        host = urlparse("//" + (self.headers.get("Host") or "")).hostname or ""
        return host in self.allowed_hosts

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False, default=str).encode("utf-8"), "application/json")

    def _call(self, fn, q, body) -> None:
        try:
            self._json(200, fn(q, body))
        except HiggsTuneError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:  # a bug, not bad input: keep the server up, show the message
            log.error("%s failed:\n%s", self.path, traceback.format_exc())
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not self._host_allowed():
            self._json(403, {"error": "this UI answers only requests addressed to 127.0.0.1 / localhost"})
        elif url.path in _STATIC:
            name, ctype = _STATIC[url.path]
            self._send(200, files("higgs_tune.app.ui").joinpath("static", name).read_bytes(), ctype)
        elif url.path == "/api/audio":
            try:
                path = self.app.roots.resolve(q.get("path", ""), what="audio file")
                if path.suffix.lower() not in service.AUDIO_SUFFIXES or not path.is_file():
                    raise service.UiInputError(f"{path} is not an audio file.")
                self._send(200, service.wav_bytes(path), "audio/wav")
            except HiggsTuneError as e:
                self._json(404 if "not an audio file" in str(e) else 403, {"error": str(e)})
        elif url.path in _GET:
            self._call(getattr(self.app, _GET[url.path]), q, {})
        else:
            self._json(404, {"error": f"no page {url.path}"})

    def do_POST(self):
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not self._host_allowed():
            self._json(403, {"error": "this UI answers only requests addressed to 127.0.0.1 / localhost"})
            return
        if not self._same_origin():
            self._json(403, {"error": "cross-origin request refused"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_UPLOAD:
            self._json(413, {"error": f"request larger than {MAX_UPLOAD // 2**20} MB"})
            return
        raw = self.rfile.read(length) if length else b""
        if url.path == "/api/upload":
            self._call(self.app.upload, q, raw)
            return
        if url.path not in _POST:
            self._json(404, {"error": f"no action {url.path}"})
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": "the request body is not JSON"})
            return
        self._call(getattr(self.app, _POST[url.path]), q, body if isinstance(body, dict) else {})

    def _same_origin(self) -> bool:
        """A page on another site must not drive this server (it can start jobs and write files)."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True  # not a browser cross-site request (curl, the tests)
        return urlparse(origin).netloc == self.headers.get("Host")


def make_server(roots: Roots, host: str = "127.0.0.1", port: int = 7860) -> tuple[ThreadingHTTPServer, UiApp]:
    app = UiApp(roots)
    hosts = frozenset({"127.0.0.1", "localhost", "::1", host}) if is_loopback(host) else None
    handler = type("BoundHandler", (Handler,), {"app": app, "allowed_hosts": hosts})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server, app


def serve_in_thread(roots: Roots, host: str = "127.0.0.1", port: int = 0):
    """Start the server on a background thread (tests); returns (server, app, base URL)."""
    server, app = make_server(roots, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, app, f"http://{host}:{server.server_address[1]}"

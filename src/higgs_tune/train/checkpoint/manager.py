"""CheckpointManager: saves that are never torn, rotation, and what a failed save does.

Layout of a run folder (`run_dir`, prepared by `train.outdir.prepare_output_dir`):

    checkpoint-<step>/            one complete, verified checkpoint per save (see format.py)
    final/                        the same layout, written by `save(final=True)`; never rotated
    best/                         with checkpoint.keep_best: the checkpoint with the best
                                  checkpoint.best_metric, as hard links to its files (no extra
                                  space; a copy where links fail); replaced when a better one comes
    checkpoints.json              index for people and tools: latest, best, final, and every
                                  checkpoint's metrics (the quality scores included) (derived data:
                                  resume never trusts it, it re-reads the manifests)
    .tmp-<name>-<pid>/            a save in progress (or one killed mid-way): never resumed from
    .old-<name>-<pid>/            a checkpoint being replaced or rotated away

Why a checkpoint is never torn: everything is written into `.tmp-<name>-<pid>/`, every file
and the folder are fsync'd, the manifest is re-read, `verify_weights` loads the weights back,
and only then one rename gives the folder its final name (`runfs.publish_dir`). A process
killed at any instant (SIGKILL included) leaves either the previous state or the new
complete checkpoint, plus at most a `.tmp-*` / `.old-*` folder that the next run removes.
Deleting goes the same way backwards: rename to `.old-*` first, then remove
(`runfs.discard_dir`).

Multi-process: every rank calls `save` (the RNG states are gathered from all ranks), only the
main process writes, and every rank leaves `save` at the same collective with the same outcome,
so a failed save makes all ranks continue or all ranks raise.

FSDP (`sharded_root` given): every rank writes its own shards of the trained weights and of the
optimizer state with `torch.distributed.checkpoint` into the temporary folder rank 0 made (the run
folder must be on a file system every rank sees) and hashes them; rank 0 writes the small files,
lists every rank's shards in the manifest, checks that every rank succeeded and publishes (see
sharded.py). No rank gathers the whole state, except that final/ and a checkpoint that becomes the
new best (`checkpoint.keep_best`: best/ links it) also get the consolidated trained weights on rank 0,
so that `generate` / `evaluate` / `export` can use them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from higgs_tune.config import EVAL_LOSS, QUALITY_METRICS
from higgs_tune.errors import CheckpointError
from higgs_tune.runfs import (
    BEST_NAME,
    FINAL_NAME,
    INDEX_FILE,
    LEFTOVER_RE,
    checkpoint_name,
    claim,
    discard_dir,
    disown,
    format_bytes,
    fsync_path,
    publish_dir,
    staged_dir,
    temp_path,
    write_json_atomic,
)
from higgs_tune.train import distributed as dist_utils
from higgs_tune.train.checkpoint.format import (
    check_written,
    checkpoint_folders,
    read_manifest,
    training_state,
    write_checkpoint_files,
)
from higgs_tune.train.checkpoint.sharded import (
    OPTIMIZER_DCP,
    check_shards,
    rank_tmp_ok,
    save_shards,
    trained_names,
)

log = logging.getLogger("higgs_tune.train.checkpoint")


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (an earlier failed attempt of this process): safe to remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclasses.dataclass
class _Record:
    name: str
    step: int
    eval_loss: float | None
    bytes: int
    metrics: dict = dataclasses.field(default_factory=dict)  # the manifest's metrics (quality_<key> included)

    def score(self, metric: str) -> float | None:
        """Its value of a checkpoint.best_metric: eval_loss, or the quality score recorded by
        the recipe as `quality_<metric>` (train/quality.py); None when it has none."""
        v = self.eval_loss if metric == EVAL_LOSS else self.metrics.get(f"quality_{metric}")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _failure_fix(e: BaseException, final: bool) -> str:
    """What to do after a save that failed with `e` (the line after the error)."""
    if final:
        first = "Free space or fix the disk" if isinstance(e, OSError) else "Fix the cause above"
        return (
            f"{first}, then resume with --resume auto to write the final checkpoint again (the last complete "
            "one is still there)."
        )
    if isinstance(e, OSError):
        return "Free space or fix the disk, then resume with --resume auto from the last complete checkpoint."
    return "Earlier checkpoints are intact: fix the cause above, then resume with --resume auto."


def is_fsdp(accelerator) -> bool:
    """True when `accelerator` shards the model with FSDP (the checkpoints are then sharded, see sharded.py)."""
    return accelerator is not None and accelerator.distributed_type == "FSDP"


def require_unsharded(accelerator) -> None:
    """Refuse DeepSpeed / Megatron runs: their optimizer state differs on every rank, and saving
    rank 0's state would silently lose the others. FSDP is supported (sharded checkpoints), with
    FSDP1 only with use_orig_params=True (frozen parameters, optimizer state by parameter name).
    Call it before any model loads."""
    kind = accelerator.distributed_type  # a str enum: compares equal to its name
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise CheckpointError(
            f"checkpoints of {kind.value} runs (sharded optimizer state) are not supported yet: "
            "launch with plain data parallelism (accelerate launch --multi_gpu) or FSDP."
        )
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if kind == "FSDP" and plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
        raise CheckpointError(
            "FSDP1 needs fsdp_use_orig_params: true (LoRA freezes parameters, and checkpoints store "
            "the optimizer state by parameter name); set it, or use fsdp_version: 2."
        )


class CheckpointManager:
    """Writes, verifies, rotates and indexes the checkpoints of one run folder.

    save_weights(dir): writes the trainable weights into `dir` (main process only; e.g.
        `lambda d: lora.save_trainable(model, d)`). verify_weights(dir): raises if the weights
        in `dir` do not load (e.g. the adapter loads onto the base model). Both are called
        with the temporary folder, before it gets its final name.
    ckpt_cfg: `cfg.checkpoint` (save_total_limit, keep_best, on_save_error, min_free_gb).
    estimate_bytes: expected size of one checkpoint (train.outdir.estimate_checkpoint_bytes),
        used for the free-space check of the first save; later saves use the previous size.
    sharded_root: FSDP runs only (required there): the FSDP-wrapped root module, and
        `weights_prefix` the name of the trained model inside it (e.g. "model."). Every rank writes
        its shards of it (sharded.py); for final/ and for a checkpoint that becomes the new best the
        trained model's full state dict is gathered on rank 0 and save_weights / verify_weights are
        called as `f(dir, state_dict=full_weights)`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        accelerator: Any | None,
        ckpt_cfg: Any,
        save_weights: Callable[[Path], None],
        verify_weights: Callable[[Path], None],
        *,
        estimate_bytes: int | None = None,
        sharded_root: torch.nn.Module | None = None,
        weights_prefix: str = "",
    ):
        self.run_dir = Path(run_dir)
        self.cfg = ckpt_cfg
        self.save_weights = save_weights
        self.verify_weights = verify_weights
        self._estimate = estimate_bytes
        self._failures = 0
        self.data_identity: dict | None = None  # recorded in every manifest ("data"); set by the recipe
        self.sharded_root, self.weights_prefix = sharded_root, weights_prefix
        if is_fsdp(accelerator) and sharded_root is None:
            raise CheckpointError("an FSDP run needs CheckpointManager(sharded_root=...) to gather the sharded state.")
        if accelerator is not None:
            require_unsharded(accelerator)
            if accelerator.num_processes != dist_utils.world_size():
                raise CheckpointError(
                    f"the accelerator has {accelerator.num_processes} processes but torch.distributed reports "
                    f"{dist_utils.world_size()}: the process group is not set up as accelerate expects."
                )
        self.is_main = dist_utils.is_main()
        self.world_size = dist_utils.world_size()
        self._records: dict[str, _Record] = {}
        self._linked: str | None = None  # the checkpoint best/ holds, once this manager linked it
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            self._scan()

    # -------------------------------------------------------------- state of the folder

    def _remove_leftovers(self) -> None:
        """Remove `.tmp-*` / `.old-*` folders left by killed processes (never a live one's)."""
        for entry in sorted(self.run_dir.iterdir()):
            m = LEFTOVER_RE.match(entry.name)
            if not m:
                continue
            if _pid_alive(int(m.group(1))):
                log.warning(
                    "checkpoint: leaving %s alone: process %s is still running (two runs in one folder?)",
                    entry,
                    m.group(1),
                )
                continue
            log.warning("checkpoint: removing %s, left by an interrupted save or removal", entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _scan(self) -> None:
        """Read the manifests of the complete checkpoints (sizes, eval losses); no hashing."""
        for _step, path in checkpoint_folders(self.run_dir):
            try:
                m = read_manifest(path)
            except CheckpointError as e:
                log.warning("checkpoint: %s is damaged and is not counted as a checkpoint of this run: %s", path, e)
                continue
            size = sum(f.get("bytes", 0) for f in m["files"].values() if isinstance(f, dict))  # resume verifies
            self._records[path.name] = _Record(
                path.name, int(m["step"]), m.get("eval_loss"), size, dict(m.get("metrics") or {})
            )
        if self._records and self._estimate is None:
            newest = max(self._records.values(), key=lambda r: r.step)
            self._estimate = newest.bytes

    @property
    def best_metric(self) -> str:
        return self.cfg.best_metric

    @property
    def best(self) -> Path | None:
        """The checkpoint with the best `checkpoint.best_metric` (lowest eval loss / CER / WER /
        cer_sim, highest similarity; the newest of equals); None when no save has that metric."""
        best = self._best_of(self._records.values())
        return self.run_dir / best.name if best is not None else None

    def _best_of(self, records) -> _Record | None:
        metric = self.best_metric
        scored = [r for r in records if r.score(metric) is not None]
        if not scored:
            return None
        sign = -1.0 if QUALITY_METRICS.get(metric, False) else 1.0
        return min(scored, key=lambda r: (sign * r.score(metric), -r.step))

    def at_step(self, step: int) -> Path | None:
        """The checkpoint saved after optimizer step `step` (checkpoint-<step> before final/), if kept."""
        found = [r for r in self._records.values() if r.step == step]
        return self.run_dir / min(found, key=lambda r: r.name == FINAL_NAME).name if found else None

    @property
    def latest(self) -> Path | None:
        if not self._records:
            return None
        return self.run_dir / max(self._records.values(), key=lambda r: (r.step, r.name == FINAL_NAME)).name

    # -------------------------------------------------------------- save

    def save(
        self,
        step: int,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        sampler_state: Any,
        epoch: int | float,
        metrics: Mapping[str, Any] | None,
        config: Any,
        grad_scaler: Any | None = None,
        eval_loss: float | None = None,
        final: bool = False,
    ) -> Path | None:
        """Write `checkpoint-<step>/` (or `final/`). Collective: call on every rank.

        Returns the checkpoint folder, or None when the save failed and
        `on_save_error: continue` (the error is logged with its cause; the next save tries
        again). Raises CheckpointError when it failed and the policy is `abort`, and always
        when `final=True`. `sampler_state` must be weights_only-safe (tensors, numbers,
        strings, lists, tuples, dicts); `metrics` and `eval_loss` must be JSON numbers/strings.
        """
        # verify_weights may draw random numbers (building a model initialises weights, LoRA
        # initialises adapters): the streams are put back, so that a run with saves, a run
        # without them and a run resumed from this save all draw the same numbers.
        if self.sharded_root is not None:
            kw = dict(optimizer=optimizer, scheduler=scheduler, sampler_state=sampler_state, epoch=epoch)
            kw.update(metrics=dict(metrics or {}), config=config, grad_scaler=grad_scaler, eval_loss=eval_loss)
            outcome, error = self._save_sharded(step, final=final, **kw)
            return self._conclude(outcome, error, final)
        with dist_utils.preserved_rng() as mine:
            rng = dist_utils.gather_to_main(mine)  # every rank's state, on rank 0
            outcome, error = (
                self._save_on_main(
                    step,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    sampler_state=sampler_state,
                    epoch=epoch,
                    metrics=dict(metrics or {}),
                    config=config,
                    grad_scaler=grad_scaler,
                    eval_loss=eval_loss,
                    final=final,
                    rng=rng,
                )
                if self.is_main
                else (None, None)
            )
        return self._conclude(outcome, error, final)

    def _conclude(self, outcome, error, final: bool) -> Path | None:
        # The one point where all ranks meet after a save: everyone learns the same outcome.
        status, message, fix = dist_utils.broadcast_from_main(outcome)
        if status == "ok":
            self._failures = 0
            return Path(message)
        self._failures += 1
        if final or self.cfg.on_save_error == "abort":
            if self.is_main:
                log.error("%s", message)
            raise CheckpointError(f"{message}\n{fix}") from error
        if self.is_main:
            # the message names the cause; a traceback only for an unexpected error (a bug, not a full disk)
            expected = isinstance(error, (CheckpointError, OSError))
            log.error(
                "%s -- on_save_error=continue: training goes on and the next save tries again (%d failed save(s) "
                "in a row); earlier checkpoints are intact.",
                message,
                self._failures,
                exc_info=None if expected else error,
            )
        return None

    def _save_sharded(self, step: int, *, final: bool, **kw) -> tuple[tuple | None, BaseException | None]:
        """FSDP: rank 0 checks the space and makes the temporary folder, every rank writes and hashes
        its shards there, rank 0 completes, verifies and publishes. Collective; the outcome as
        `_save_on_main` returns it (on rank 0; (None, None) elsewhere)."""
        name = FINAL_NAME if final else checkpoint_name(step)
        with dist_utils.preserved_rng() as mine:
            rng = dist_utils.gather_to_main(mine)
            prepared, error = self._prepare_tmp(step, name, kw) if self.is_main else (None, None)
            status, payload = dist_utils.broadcast_from_main(prepared)
            if status != "ok":
                return ((status, *payload) if self.is_main else None), error
            tmp = Path(payload)
            # every rank must see rank 0's folder before the collective write (a file system the
            # ranks do not share fails here, clearly, instead of hanging in the write)
            seen = dist_utils.gather_to_main(rank_tmp_ok(tmp))
            blind = dist_utils.broadcast_from_main([r for r, ok in enumerate(seen or []) if not ok])
            if blind:
                mine_files: tuple = (
                    "failed",
                    f"rank(s) {blind} do not see {tmp}: an FSDP run folder must be on a file system every "
                    "process (every node) shares",
                )
                shards = [mine_files]
            else:
                try:  # every rank: its own shards
                    mine_files = ("ok", save_shards(tmp, self.sharded_root, kw["optimizer"]))
                # DCP raises CheckpointException (a BaseException) on every rank when any rank's write failed
                except (Exception, DcpCheckpointException) as e:  # noqa: BLE001  (reported by rank 0)
                    mine_files = ("failed", f"rank {dist_utils.rank()}: {type(e).__name__}: {e}")
                shards = dist_utils.gather_to_main(mine_files)
            # final/ and a new best also get the usual weights (best/ must be usable by generate / export)
            usual = dist_utils.broadcast_from_main(final or (self.is_main and self._would_be_best(step, kw)))
            weights = self._gather_weights() if usual else None  # collective
            if not self.is_main:
                return None, None
            return self._save_on_main(step, final=final, rng=rng, tmp=tmp, shards=shards, full=weights, **kw)

    def _would_be_best(self, step: int, kw: dict) -> bool:
        """Rank 0: a checkpoint of `step` with these metrics would be linked as best/ (keep_best on)."""
        if not self.cfg.keep_best:
            return False
        name = checkpoint_name(step)
        candidate = _Record(name, int(step), kw["eval_loss"], 0, dict(kw["metrics"]))
        others = [r for r in self._records.values() if r.name != name]
        return self._best_of([*others, candidate]) is candidate

    def _prepare_tmp(self, step: int, name: str, kw: dict) -> tuple[tuple, BaseException | None]:
        """Rank 0: ("ok", temporary folder) after the space and JSON checks, or ("failed", (message,
        fix)) and the exception."""
        tmp = temp_path(self.run_dir / name)
        try:
            self._check_space()
            self._check_json(step, kw["metrics"], kw["eval_loss"], kw["epoch"])
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            fsync_path(self.run_dir)
        except Exception as e:  # noqa: BLE001
            what = "the final checkpoint" if name == FINAL_NAME else f"checkpoint-{step}"
            msg = f"saving {what} to {self.run_dir} failed: {type(e).__name__}: {e}"
            return ("failed", (msg, _failure_fix(e, name == FINAL_NAME))), e
        return ("ok", str(tmp)), None

    def _gather_weights(self) -> dict:
        """FSDP: the trained model's full state dict on rank 0's CPU (empty on the others): one
        tensor at a time through the GPU, the whole model in rank 0's host memory. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.sharded_root, options=options)
        n = len(self.weights_prefix)
        return {k[n:]: v for k, v in model_sd.items() if k.startswith(self.weights_prefix)}

    @staticmethod
    def _check_json(step, metrics, eval_loss, epoch) -> None:
        try:
            json.dumps({"metrics": metrics, "eval_loss": eval_loss, "epoch": epoch})  # fail before writing anything
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"metrics/eval_loss/epoch of step {step} are not JSON numbers or strings ({e}); pass float(x) for "
                "tensors."
            ) from e

    def _save_on_main(self, step, *, final, **kw) -> tuple[tuple[str, str, str], BaseException | None]:
        """(("ok", path, ""), None) or (("failed", message, fix), the exception)."""
        try:
            return ("ok", str(self._write(step, final=final, **kw)), ""), None
        # Any failure of a save (disk full, I/O error, a bug in save_weights, a failed
        # verification) is handled by one policy; it is logged with its cause, never dropped.
        except Exception as e:  # noqa: BLE001
            what = "the final checkpoint" if final else f"checkpoint-{step}"
            return (
                "failed",
                f"saving {what} to {self.run_dir} failed: {type(e).__name__}: {e}",
                _failure_fix(e, final),
            ), e

    def _write(
        self,
        step: int,
        *,
        optimizer,
        scheduler,
        sampler_state,
        epoch,
        metrics,
        config,
        grad_scaler,
        eval_loss,
        final,
        rng,
        full=None,
        tmp: Path | None = None,
        shards: list | None = None,
    ) -> Path:
        """Write, verify and publish. FSDP (`shards`: every rank's ("ok", hashed files) or ("failed",
        message), already written into `tmp`): `full` is the gathered weights for final/, else None."""
        name = FINAL_NAME if final else checkpoint_name(step)
        target = self.run_dir / name
        sharded = shards is not None
        t0 = time.monotonic()
        log.info("checkpoint: saving step %d to %s (attempt %d)", step, target, self._failures + 1)
        if not sharded:
            self._check_space()
            self._check_json(step, metrics, eval_loss, epoch)
            tmp = temp_path(target)
            if tmp.exists():
                shutil.rmtree(tmp)
        try:
            hashed: dict = {}
            if sharded:
                failed = [msg for status, msg in shards if status != "ok"]
                if failed:
                    raise CheckpointError("writing the shards failed on " + "; ".join(failed))
                for _, files in shards:
                    hashed.update(files)
            else:
                tmp.mkdir()
            if not sharded:
                self.save_weights(tmp)
            elif full is not None:
                self.save_weights(tmp, state_dict=full)
            state = training_state(
                step=step,
                epoch=epoch,
                world_size=self.world_size,
                optimizer=None if sharded else optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                grad_scaler=grad_scaler.state_dict() if grad_scaler is not None else None,
                sampler_state=sampler_state,
                rng=rng,
                layout=OPTIMIZER_DCP if sharded else None,
            )
            manifest = write_checkpoint_files(
                tmp,
                state,
                config,
                final=final,
                eval_loss=eval_loss,
                metrics=metrics,
                data=self.data_identity,
                hashed=hashed,
            )
            check_written(tmp, manifest)
            if not sharded:
                self.verify_weights(tmp)
            else:
                check_shards(tmp, trained_names(self.sharded_root))
                if full is not None:
                    self.verify_weights(tmp, state_dict=full)
            # Publish: one atomic rename; an earlier folder of that name (a damaged checkpoint
            # from an abandoned attempt, or an earlier final) is replaced only if it succeeds.
            publish_dir(tmp, target)
            claim(self.run_dir, name)  # ours: --overwrite may remove it, and only because it is listed
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                log.error("checkpoint: could not remove the temporary folder %s; the next run removes it", tmp)
            raise
        files = manifest["files"]

        total = sum(f["bytes"] for f in files.values())
        self._estimate = total
        self._records[name] = _Record(name, int(step), eval_loss, total, dict(metrics))
        listing = ", ".join(f"{rel} ({format_bytes(f['bytes'])})" for rel, f in files.items())
        log.info(
            "checkpoint: saved %s in %.1f s: %s; %s in total, %s free on the disk",
            target,
            time.monotonic() - t0,
            listing,
            format_bytes(total),
            format_bytes(_disk_free(self.run_dir)),
        )
        # Rotation and the index are housekeeping after a complete save: a failure there leaves
        # a good checkpoint and is logged (the next save's space check catches a filling disk).
        try:
            if not final:
                self._rotate(keep=name)
            if self.cfg.keep_best:
                self._link_best()
            self._write_index()
        except OSError as e:
            log.error(
                "checkpoint: %s is complete, but rotating old checkpoints / writing %s failed: %s",
                target,
                INDEX_FILE,
                e,
            )
        return target

    def _check_space(self) -> None:
        free = _disk_free(self.run_dir)
        reserve = int(self.cfg.min_free_gb * 1e9)
        if self._estimate is None:
            log.info("checkpoint: no size estimate yet; %s free on the disk", format_bytes(free))
            return
        needed = self._estimate + reserve
        if free < needed:
            raise CheckpointError(
                f"{self.run_dir}: {format_bytes(free)} free, a checkpoint needs about "
                f"{format_bytes(self._estimate)} plus checkpoint.min_free_gb={self.cfg.min_free_gb} GB kept free. "
                "Free space, or lower checkpoint.save_total_limit."
            )

    def _rotate(self, keep: str) -> None:
        """Keep the newest `save_total_limit` step checkpoints, the one just written and the best."""
        limit = self.cfg.save_total_limit
        if limit is None:
            return
        steps = sorted((r for r in self._records.values() if r.name != FINAL_NAME), key=lambda r: r.step, reverse=True)
        protected = {keep}
        best = self.best
        if best is not None and self.cfg.keep_best:
            protected.add(best.name)
        for rec in steps[limit:]:
            if rec.name in protected:
                continue
            path = self.run_dir / rec.name
            discard_dir(path)  # renamed away first: the folder disappears whole, never half-deleted
            del self._records[rec.name]
            disown(self.run_dir, rec.name)
            log.info("checkpoint: removed %s (save_total_limit=%d)", path, limit)
        fsync_path(self.run_dir)

    def _link_best(self) -> None:
        """best/ = the best checkpoint's files, hard-linked (a copy where the file system has no
        hard links), published with one rename like a checkpoint; rewritten when the best changes."""
        best = self.best
        target = self.run_dir / BEST_NAME
        if best is None or (self._linked == best.name and target.is_dir()):
            return
        with staged_dir(target) as tmp:
            for src in sorted(best.rglob("*")):
                dst = tmp / src.relative_to(best)
                if src.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        claim(self.run_dir, BEST_NAME)  # ours: --overwrite may remove it
        self._linked = best.name
        log.info("checkpoint: %s is the best by %s: linked as %s", best.name, self.best_metric, target)

    def _write_index(self) -> None:
        best, latest = self.best, self.latest
        records = sorted(self._records.values(), key=lambda r: (r.step, r.name == FINAL_NAME))
        write_json_atomic(
            self.run_dir / INDEX_FILE,
            {
                "latest": latest.name if latest else None,
                "best": None
                if best is None
                else {
                    "name": best.name,
                    "step": self._records[best.name].step,
                    "eval_loss": self._records[best.name].eval_loss,
                    "metric": self.best_metric,
                    "value": self._records[best.name].score(self.best_metric),
                    "folder": BEST_NAME if self._linked == best.name else None,
                },
                "final": FINAL_NAME if FINAL_NAME in self._records else None,
                "checkpoints": [dataclasses.asdict(r) for r in records],
            },
        )
        claim(self.run_dir, INDEX_FILE)

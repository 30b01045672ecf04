"""Run `higgs-tune train` in this process and SIGKILL it at a chosen point (resume tests).

    python tests/kill_harness.py CONFIG.yaml [--resume auto] --kill log:3
        killed right after the metrics of optimizer step 3 were written (between saves)
    python tests/kill_harness.py CONFIG.yaml --resume auto --kill save:6
        killed in the middle of writing checkpoint-6 (after its weights, before its manifest)

SIGKILL cannot be caught: nothing in the process gets to clean up, as with `kill -9`, an
OOM kill or a lost node.
"""

import os
import signal
import sys

import torch


def main() -> None:
    args = sys.argv[1:]
    kill = None
    if "--kill" in args:
        i = args.index("--kill")
        kill = args[i + 1]
        del args[i : i + 2]
    if kill:
        where, _, n = kill.partition(":")
        n = int(n)
        if where == "log":
            from higgs_tune.train import logging as tl

            original = tl.MetricsLogger.log

            def log_then_die(self, step, metrics, split="train"):
                original(self, step, metrics, split)
                if split == "train" and step == n:
                    os.kill(os.getpid(), signal.SIGKILL)

            tl.MetricsLogger.log = log_then_die
        elif where == "save":
            from higgs_tune.train import checkpoint as ck

            original_save = torch.save

            def save_then_die(obj, f, *a, **k):
                original_save(obj, f, *a, **k)
                if isinstance(obj, dict) and obj.get(ck.KEY_STEP) == n:
                    os.kill(os.getpid(), signal.SIGKILL)  # training_state.pt written, manifest not yet

            torch.save = save_then_die  # the module attribute the checkpoint writer calls
        else:
            raise SystemExit(f"unknown kill point {kill!r}")
    torch.set_num_threads(1)
    from higgs_tune.app.cli import main as cli

    sys.argv = ["higgs-tune", "train", *args]
    cli()


if __name__ == "__main__":
    main()

"""Run under `torchrun --nproc_per_node 2` with ACCELERATE_USE_FSDP=true and FSDP_* set: train
from CONFIG with FSDP2 on CPU (gloo).

    torchrun --standalone --nproc_per_node 2 tests/fsdp_train_script.py CONFIG [--resume PATH]

HIGGS_TEST_FAIL_SHARDS=<rank> makes that rank's first checkpoint write fail (tests the save policy).

accelerate 1.15 enables FSDP only on accelerators (CUDA, XPU, ...): on CPU it silently falls back
to DDP (`distributed_type` MULTI_CPU) even with an FSDP plugin. torch's FSDP2 itself runs on CPU,
so this script switches accelerate's state to FSDP right after the Accelerator is built, exactly
as `accelerate launch` with an FSDP config does on GPUs; everything after that (prepare ->
fully_shard, clipping, no_sync, the recipe, the checkpoints) is the code a GPU run uses.
"""

import os
import sys

import accelerate
import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from higgs_tune.config import load_config
from higgs_tune.train.recipe import train

_accelerator_init = accelerate.Accelerator.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION etc. from the environment
    PartialState().distributed_type = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = plugin


def _fail_first_shard_write_on(rank: int) -> None:
    """HIGGS_TEST_FAIL_SHARDS=<rank>: that rank's first shard file write fails inside
    torch.distributed.checkpoint's writer (a full disk on one node)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from higgs_tune.train import distributed

    real, calls = FileSystemWriter.write_data, []

    def failing(self, plan, planner):
        calls.append(1)
        if distributed.rank() == rank and len(calls) == 1:
            raise OSError(28, "No space left on device (test)")
        return real(self, plan, planner)

    FileSystemWriter.write_data = failing


def main() -> None:
    torch.set_num_threads(1)
    accelerate.Accelerator.__init__ = _fsdp_on_cpu
    if os.environ.get("HIGGS_TEST_FAIL_SHARDS"):
        _fail_first_shard_write_on(int(os.environ["HIGGS_TEST_FAIL_SHARDS"]))
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    result = train(load_config(sys.argv[1]), resume=resume)
    trained = [p for p in result.model.parameters() if p.requires_grad]
    # the parameters the run trained were FSDP2 shards (DTensors), not DDP replicas
    from torch.distributed.fsdp import FSDPModule

    # FSDP units: 1 = the whole model as one unit (NO_WRAP); 1 + layers with TRANSFORMER_BASED_WRAP
    units = sum(isinstance(m, FSDPModule) for m in result.model.modules()) + 1
    # one rank reports, each line in ONE write: both ranks share the pipe, and print() writes its
    # arguments, separators and end one by one, so two ranks' words could interleave mid-line
    if os.environ.get("RANK", "0") == "0":
        sys.stdout.write(f"trained parameter types: {sorted({type(p).__name__ for p in trained})}\n")
        sys.stdout.write(f"fsdp units: {units}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

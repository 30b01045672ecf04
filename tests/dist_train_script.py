"""Run under `torchrun --nproc_per_node 2`: train from CONFIG, then write this rank's trained
weights to OUT/rank<r>.safetensors so the test can compare the ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_train_script.py CONFIG OUT [--resume PATH]
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from higgs_tune.config import load_config
from higgs_tune.train.recipe import train


def main() -> None:
    torch.set_num_threads(1)
    config, out = sys.argv[1], Path(sys.argv[2])
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    result = train(load_config(config), resume=resume)
    rank = int(os.environ["RANK"])  # the process group is closed when train() returns
    weights = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()

"""Library noise off by default: what transformers, torch, accelerate, peft and the Hub client print
(progress bars while loading weights, FutureWarnings, generation-config deprecation notes, torch's
pytree notes) does not reach the user unless `--verbose`. Our own messages always do: they go
through the `higgs_tune` loggers, the rich console and click, none of which is touched here, and
warnings raised from higgs_tune modules stay visible.

Called once by the CLI before a command's module (and so torch/transformers) is imported: the
environment variables below are read by those libraries at import time.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARY_LOGGERS = ("transformers", "accelerate", "peft", "torch", "datasets", "huggingface_hub", "urllib3", "filelock")
# loggers that torch configures itself on import (a level set before would be reset): a filter stays
TORCH_NOTE_LOGGERS = ("torch.utils._pytree",)
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # generate-config deprecations, "Some weights were not used", ...
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars and the Hub's
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
}
_NOT_OURS = r"^(?!higgs_tune)"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries(verbose: bool) -> None:
    """Silence third-party warnings, notes and bars (errors still show) unless `verbose`."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOT_OURS)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in TORCH_NOTE_LOGGERS:
        logger = logging.getLogger(name)
        if _errors_only not in logger.filters:
            logger.addFilter(_errors_only)

"""Checkpoints that are never torn, verified after writing, and resumed exactly.

    format.py   the files of a checkpoint folder, its manifest (sizes, sha256), write + verify
    resume.py   the resume policy (RESUME_KEYS), finding a checkpoint, restoring the training state
    manager.py  CheckpointManager: saving on every rank, rotation, the failure policy

Folder and file names, atomic writes, fsync and hashing live in `higgs_tune.runfs`.
"""

from higgs_tune.runfs import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    CONFIG_HEADER,
    FINAL_NAME,
    INDEX_FILE,
    MANIFEST_FILE,
    TMP_PREFIX,
    TRAINING_STATE_FILE,
    TRASH_PREFIX,
)
from higgs_tune.train.checkpoint.format import (  # training_state.pt's keys: KEY_* in format.py
    FORMAT,
    FORMAT_VERSION,
    KEY_STEP,
    config_yaml_text,
    read_checkpoint_config,
    read_manifest,
    verify_checkpoint,
)
from higgs_tune.train.checkpoint.manager import (
    CheckpointManager,
    is_fsdp,
    require_unsharded,
)
from higgs_tune.train.checkpoint.resume import (
    RESUME_KEYS,
    SCHEDULE_LENGTH_KEYS,
    TrainingState,
    find_resume_checkpoint,
    load_training_state,
    newest_complete_checkpoint,
    resume_config_changes,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CONFIG_FILE",
    "CONFIG_HEADER",
    "FINAL_NAME",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "TMP_PREFIX",
    "TRAINING_STATE_FILE",
    "TRASH_PREFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "KEY_STEP",
    "config_yaml_text",
    "read_checkpoint_config",
    "read_manifest",
    "verify_checkpoint",
    "CheckpointManager",
    "is_fsdp",
    "require_unsharded",
    "RESUME_KEYS",
    "SCHEDULE_LENGTH_KEYS",
    "TrainingState",
    "find_resume_checkpoint",
    "load_training_state",
    "newest_complete_checkpoint",
    "resume_config_changes",
]

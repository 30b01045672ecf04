"""Typed errors. Each message names the file/row/setting at fault and what to do."""


class HiggsTuneError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with status 2."""


class DataError(HiggsTuneError):
    """Bad manifest, audio or cache content."""


class ModelLoadError(HiggsTuneError):
    """A checkpoint folder or id that is not a usable Higgs Audio v2 stack."""


class TrainingHealthError(HiggsTuneError):
    """A run that cannot produce a useful model (non-finite loss, no trained tokens, ...)."""


class CheckpointError(HiggsTuneError):
    """A checkpoint that cannot be written, verified or resumed."""


class OutputDirError(HiggsTuneError):
    """An output folder that cannot be used (not writable, too little space, foreign content)."""

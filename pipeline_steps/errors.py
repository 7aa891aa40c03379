"""Exceptions whose messages tell the user what to fix.

Each error names the file, the column or the params.yaml key at fault, so a
failing `dvc repro` points straight at the bad input instead of a traceback
deep inside pandas or torch.
"""


class PipelineError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(PipelineError):
    """A params.yaml key is missing, has an unknown value or points nowhere."""


class DataValidationError(PipelineError):
    """Input data is structurally unusable (missing file/column, empty, duplicate ids...)."""


class RejectThresholdExceeded(DataValidationError):
    """More rows were quarantined than params.yaml allows."""

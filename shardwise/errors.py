"""User-facing errors.

Every error a user can cause by input (config, data, launch options) is a `ShardwiseError`:
the CLI prints its message as one line and exits non-zero, without a traceback. The message
says what is wrong, the value, and what would work.
"""

from __future__ import annotations


class ShardwiseError(Exception):
    """Base class of errors caused by user input; printed as one line by the CLI."""


class ConfigError(ShardwiseError):
    """A configuration value is invalid or inconsistent with another one."""


class DataError(ShardwiseError):
    """A data source is missing, unreadable or too small for the requested batch."""


class LaunchError(ShardwiseError):
    """Processes could not be started, or one of them failed or timed out."""


class TrainingError(ShardwiseError):
    """Training cannot continue (e.g. the loss became non-finite)."""


class CheckpointError(ShardwiseError):
    """A checkpoint is missing, incomplete or incompatible with the run."""

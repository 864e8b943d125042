"""User-facing errors.

Every problem a user can fix (bad config, missing data, corrupt image, NaN loss, unreachable tracking
server) is raised as an :class:`RdmlError` whose message names the problem *and* the fix. The CLI
prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RdmlError(Exception):
    """An error the user can act on; the message says what went wrong and how to fix it."""


class ConfigError(RdmlError):
    """An invalid configuration key or value."""


class DataError(RdmlError):
    """A dataset is missing, malformed, or contains a corrupt file."""


class TrainingDivergedError(RdmlError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrackingError(RdmlError):
    """The MLflow tracking server cannot be reached or refused the request."""

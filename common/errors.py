"""PathFed's error hierarchy.

Every error says which thing is wrong (a file, a config field, a site) and what to do.
Each class derives from the builtin a caller would naturally catch.
"""

from __future__ import annotations


class PathFedError(Exception):
    """Base class of all PathFed errors."""


class ConfigError(PathFedError, ValueError):
    """A configuration value is invalid; the message names the field and allowed values."""


class UnknownModelError(PathFedError, KeyError):
    """A model or encoder name is not in its registry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(PathFedError, OSError):
    """A data folder or file is missing, empty or malformed; the message names the file."""


class SlideReadError(DataError):
    """An image or slide could not be read."""


class PrivacyBudgetExhausted(PathFedError, RuntimeError):
    """A site's next round would spend more privacy budget than it has."""

"""The one error the SAE readers raise for a file they cannot turn into an SAE."""

from __future__ import annotations


class SAEFormatError(ValueError):
    """An SAE file or folder is missing, unreadable, inconsistent or of an unsupported kind.

    The message names the file and the problem."""

"""The error every decoder raises for a model that cannot be decoded."""

from __future__ import annotations


class DecodeError(Exception):
    """The weights cannot be decoded; `reason` is stable, the message says why.

    Messages name the tenant's own files (paths inside the archive) and never a path,
    host or exception class of the machine that decodes them.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

"""Typed errors of the encoder registry. Messages name the source, the reason and the fix."""

from __future__ import annotations


class EncoderError(Exception):
    """Base class for encoder problems."""


class UnknownEncoderError(EncoderError, KeyError):
    """The encoder name is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(EncoderError):
    """Weights cannot be found, read or loaded into the architecture.

    ``str(err)`` reads ``"<source>: <reason>. Fix: <fix>"``.
    """

    def __init__(self, source: str, reason: str, fix: str) -> None:
        self.source = str(source)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.source}: {reason}. Fix: {fix}")

    def __reduce__(self):  # picklable across Dask workers
        return (type(self), (self.source, self.reason, self.fix))

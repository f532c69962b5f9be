"""Errors that reach the user.

Every problem a user can fix (a missing file, a misspelled step, a device that is not there)
is raised as a :class:`DamoError` carrying one line that names the problem and, where there is
one, what to do about it. The command line prints that line and exits with status 2; anything
else is a bug in this project or a plugin and is reported as such.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): backends raise pages of
    text, of which the first line is what names the problem."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class DamoError(Exception):
    """A problem with the user's input or environment, explained in one line.

    ``hint`` says what to do; it is printed after the message.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UnsupportedError(DamoError):
    """A plugin cannot serve this request (format, device, backend missing)."""


class VerificationError(DamoError):
    """A step's output did not match its input within the promised tolerance."""

    exit_code = 3


class PluginError(DamoError):
    """A plugin is broken or two plugins clash."""

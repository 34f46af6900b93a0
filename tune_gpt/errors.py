"""Errors that mean "the user asked for something that cannot work".

Library code raises these; the ``__main__`` entry points turn them into one line
on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class TuneGPTError(Exception):
    """Base class: bad input or an impossible request, explained in one line."""


class ConfigError(TuneGPTError, ValueError):
    """A configuration key or value is invalid; the message names it."""


class DataError(TuneGPTError, ValueError):
    """A corpus cannot be used; the message names the file or URL."""


class SpaceError(TuneGPTError, ValueError):
    """A search-space file is invalid; the message names the file and key."""


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by SIGINT/SIGTERM; the message says how to resume it.

    A KeyboardInterrupt (not a TuneGPTError): entry points exit with `exit_code`
    (130 for SIGINT, 143 for SIGTERM), as a shell does for an interrupted command.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code

"""One exception type for user errors (config, data, plugins).

The CLI catches ``ChimeraError`` once, prints its one-line message and exits 2; every other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ChimeraError(Exception):
    """A mistake in the user's input: a config file, an override, a dataset row or a plugin.

    ``key`` is the dotted config key at fault when there is one, so the config loader can name the file
    that set it.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RunInterrupted(Exception):
    """A run stopped on a signal after checkpointing (see ``toolkit.signals``); the CLI exits with
    ``exit_code`` = 128 + the signal number, as a shell reports a process killed by that signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""

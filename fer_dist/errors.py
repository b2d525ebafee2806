"""The one base of every refusal of bad input, and the one line a command prints for it.

fer-dist refuses what it cannot use (a config, a dataset layout, shards, a run folder, an option)
by raising an `InputError` whose message names the input and how to mend it; the commands print
that message as one line and exit with status 2. Every other exception is a fault of fer-dist or
of a library, and keeps its traceback. Operating-system errors (no such file, no space left, no
permission) name their file and are printed as one line too: they are the machine's refusal of an
input, not a fault of the code.
"""

from __future__ import annotations

TRACEBACK = "Traceback (most recent call last)"


class InputError(ValueError):
    """fer-dist refuses its input; the message says which and why. A ValueError, so that code
    catching ValueError for a bad value still catches it."""


def one_line(exc: BaseException) -> str:
    """What a command prints for a refusal: the message; for one raised in a loader worker and
    raised again here with the worker's traceback as its text (torch's DataLoader keeps the type,
    not the traceback), that traceback's last line, without the class name."""
    text = str(exc).strip()
    if TRACEBACK not in text:
        return text
    return text.splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]

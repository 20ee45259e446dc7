"""What hf-curvedit's messages say and to whom: the error of bad input, fixes worded for the reader (a command for the
``hf-curvedit`` command line, a call for Python), and secrets that no message may show.

- **Bad input.** `InputError` (a `ValueError`) is what hf-curvedit raises when it refuses settings, files or data;
  the command line exits 2 for it. Any other exception is a failure (exit 1, with its traceback).
- **Fixes for the reader.** `Fix` holds both wordings of a fix; it renders as the command-line one inside
  `on_command_line()` (which the ``hf-curvedit`` command enters) and as the Python one elsewhere.
- **Secrets.** `register_secret` notes a value (a Hub token) that must never be printed; `redact` replaces every
  noted value, and anything shaped like a Hub token, in a text. The command line passes every message, traceback and
  log line through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterator

__all__ = ["Fix", "InputError", "InputKeyError", "RedactingFilter", "on_command_line", "redact", "register_secret"]


class InputError(ValueError):
    """hf-curvedit refuses its input: settings, a file or data it cannot use. The message names the problem and the
    fix. (The command line's exit code 2.)"""


class InputKeyError(InputError, KeyError):
    """An `InputError` for a name that is not there (a split, a set, a module), also a `KeyError` as before."""

    def __str__(self) -> str:
        return ValueError.__str__(self)  # a KeyError would quote its message


_ON_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_curvedit_on_command_line", default=False)


@contextlib.contextmanager
def on_command_line() -> Iterator[None]:
    """Inside the block, every `Fix` renders as its command-line wording."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


class Fix:
    """A fix a message suggests, in both wordings: ``python`` (a call, an argument) and ``cli`` (a command, a flag).
    ``str()`` and f-strings give the one for the current reader (see `on_command_line`)."""

    def __init__(self, python: str, cli: str):
        self.python, self.cli = python, cli

    def __str__(self) -> str:
        return self.cli if _ON_COMMAND_LINE.get() else self.python

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"Fix(python={self.python!r}, cli={self.cli!r})"


_SECRETS: set[str] = set()
# the Hub's user access tokens (hf_ and 34 letters and digits); shorter runs are not matched
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
HIDDEN = "<token, not shown>"


def register_secret(value: object) -> None:
    """Note ``value`` (a token) as a secret that `redact` removes from every text (strings of 8 characters or more;
    ``None``, ``True`` and other non-strings are ignored)."""
    if isinstance(value, str) and len(value) >= 8:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret, and anything shaped like a Hub token, replaced by a placeholder."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return _HUB_TOKEN.sub(HIDDEN, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (and drops its arguments, now part of it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True

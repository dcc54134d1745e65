"""Ctrl-C: never lost while an output is written, and after the weights are written it keeps them, unverified.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives. Where that is
a finalizer or a weakref callback (the one a ThreadPoolExecutor registers runs each time a shard's
hashing lane is collected), Python prints the traceback ("Exception ignored in") and carries on: a
run interrupted while writing went on to finish and exit 0. The command's handler remembers the
signal, and `check` raises it again where the run decides what to keep.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

_pending = False


def install() -> None:
    """SIGINT raises KeyboardInterrupt, as Python's own handler does, and is remembered until `caught`;
    one swallowed by a finalizer prints no traceback (`check` raises it)."""
    signal.signal(signal.SIGINT, _handler)
    sys.unraisablehook = _unraisable


def _unraisable(u) -> None:
    if not (_pending and isinstance(u.exc_value, KeyboardInterrupt)):
        sys.__unraisablehook__(u)


def _handler(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def check() -> None:
    """Raise a Ctrl-C that came and was swallowed (only with `install`ed handling; otherwise nothing to do)."""
    if _pending:
        caught()
        raise KeyboardInterrupt


def caught() -> None:
    """The KeyboardInterrupt reached code that handles it: nothing is pending any more."""
    global _pending
    _pending = False


class VerificationInterrupted(KeyboardInterrupt):
    """Ctrl-C during verification: `output` is complete and in place, marked unverified."""

    def __init__(self, output: Path, later: str):
        super().__init__(str(output))
        self.output, self.later = output, later

    def __str__(self) -> str:
        return (f"interrupted during verification; the output {self.output} is complete but not verified (its "
                f"surgery_report.json and README.md say so): {self.later}")


def verify_later(output: Path, exactness) -> str:
    """How to verify an interrupted output afterwards."""
    from .ops import RESETS

    if exactness in RESETS:  # judged against states only a run builds (after the reinit or prune)
        return f"run the recipe again (with --force) to verify it; `surgery verify {output} --tolerance T` bounds its change from the source"
    return f"`surgery verify {output}` verifies it against its recorded source"


def message(e: KeyboardInterrupt) -> str:
    """The CLI's line for a Ctrl-C."""
    return str(e) if isinstance(e, VerificationInterrupted) else "interrupted; the output was not written"

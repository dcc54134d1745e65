"""What a person sees while models run: `layer i of n` bars on a terminal and one summary line per phase, on stderr."""
from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """`layer i of n` bars on a terminal and one summary line per phase, on stderr; silent when off."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    @contextlib.contextmanager
    def phase(self, desc: str, total: int | None = None):
        from tqdm import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=desc, unit="layer", leave=False, file=sys.stderr,
                   disable=not (self.enabled and sys.stderr.isatty()))
        summary: list[str] = []
        try:
            yield bar, summary
        finally:
            bar.close()
        if self.enabled:
            extra = f": {summary[0]}" if summary else ""
            print(f"{desc}{extra} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


    def note(self, line: str) -> None:
        """One line on stderr, when on: what is about to happen, or a changed estimate."""
        if self.enabled:
            print(line, file=sys.stderr, flush=True)


QUIET = Progress(False)

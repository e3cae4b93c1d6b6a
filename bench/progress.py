"""Progress on stderr while the bench runs: a tqdm bar when installed and stderr is a terminal,
else one plain line per case (readable in logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """One unit per case; ``status`` says what the current case is doing."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.case = ""
        self.started = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
            except ImportError:
                self._bar = None

    def start(self, case: str) -> None:
        self.case = case
        if self._bar is not None:
            self._bar.set_description_str(case)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total} {self._elapsed()}] {case}", file=sys.stderr, flush=True)

    def status(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"{self.case}: {what}")

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(f"[{self.done}/{self.total} {self._elapsed()}] done", file=sys.stderr, flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:.0f}s"

"""Live progress of a search: trials done / pruned / failed, best so far, rate, time left.

On a terminal it is a rich Live panel redrawn in place; otherwise (a log file, CI)
one plain line per finished trial. It goes to stderr, so stdout holds the run's summary
alone (`mergesearch run SPEC > out`). `quiet=True` shows nothing.
"""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from search.study.trial_counts import Counts


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_best(best: list[float] | None) -> str:
    if not best:
        return "-"
    return ", ".join(f"{v:.4g}" for v in best)


class Progress:
    def __init__(self, name: str, trials: int | None, timeout: float | None, quiet: bool = False):
        self.name, self.trials, self.timeout, self.quiet = name, trials, timeout, quiet
        self.console = Console(stderr=True)
        self.live: Live | None = None
        self.t0 = time.monotonic()
        self.counts = Counts()

    def __enter__(self) -> "Progress":
        self.t0 = time.monotonic()
        if not self.quiet and self.console.is_terminal:
            # rendered again at every refresh, so rate and time left move between finished trials
            self.live = Live(console=self.console, refresh_per_second=2, transient=False, get_renderable=self._render)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.__exit__(*exc)
            self.live = None

    def rate_per_minute(self) -> float:
        elapsed = time.monotonic() - self.t0
        return 60.0 * self.counts.finished_this_session / elapsed if elapsed > 0 else 0.0

    def time_left(self) -> float | None:
        elapsed = time.monotonic() - self.t0
        left = []
        if self.timeout is not None:
            left.append(self.timeout - elapsed)
        rate = self.rate_per_minute()
        if self.trials is not None and rate > 0:
            left.append(60.0 * max(0, self.trials - self.counts.done) / rate)
        return min(left) if left else None

    def _render(self) -> Table:
        c = self.counts
        table = Table(title=f"mergesearch run {self.name}", show_header=False, box=None)
        budget = f"/{self.trials}" if self.trials else ""
        table.add_row("trials", f"{c.done}{budget} done: {c.complete} complete, {c.pruned} pruned, {c.failed} failed; "
                      f"{c.running} running")
        # the best *search* score: the run's winner is chosen after the search, by held-out score
        best = _fmt_best(c.best)
        table.add_row("best search score", f"{best} (trial {c.best_trial})" if c.best_trial is not None else best)
        table.add_row("rate", f"{self.rate_per_minute():.1f} trials/min")
        table.add_row("time left", _fmt_seconds(self.time_left()))
        for k, v in c.extra.items():
            table.add_row(k, v)
        return table

    def update(self, counts: Counts, line: str | None = None) -> None:
        self.counts = counts
        if self.quiet:
            return
        if self.live is not None:
            self.live.refresh()
        elif line:
            c = counts
            print(
                f"[{c.done}{'/' + str(self.trials) if self.trials else ''}] {line} | best search score {_fmt_best(c.best)}"
                f" | {self.rate_per_minute():.1f}/min | left {_fmt_seconds(self.time_left())}",
                file=sys.stderr,
                flush=True,
            )

    def trial_finished(self, counts: Counts, frozen, reason: str | None) -> None:
        what = f"trial {frozen.number} {frozen.state.name.lower()}"
        if frozen.values:
            what += " " + ", ".join(f"{v:.4g}" for v in frozen.values)
        if reason and frozen.state.name != "COMPLETE":
            what += f" ({reason})"
        if frozen.user_attrs.get("duplicate_of") is not None:
            what += f" (duplicate of trial {frozen.user_attrs['duplicate_of']}: not built again)"
        self.update(counts, what)

    def message(self, text: str) -> None:
        if not self.quiet:  # one line, never cut into several (a terminal wraps it on screen)
            self.console.print(text, markup=False, soft_wrap=True)

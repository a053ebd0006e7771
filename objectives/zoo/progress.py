"""Progress of a long training loop on stderr: the zoo's base trains for minutes.

On a terminal, a bar with the step count, the time spent and the time left (rich),
cleared when the loop ends (the caller prints its own summary line). Elsewhere (a CI
log, a pipe) one line per quarter of the steps, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

LINES = 4  # off a terminal: a line at 1/4, 2/4 and 3/4 of the steps (the last is the caller's summary)


@contextmanager
def step_progress(label: str, total: int, stream: TextIO | None = None) -> Iterator[Callable[[], None]]:
    """Yield `step()`, to be called once per finished step of `total`."""
    stream = stream or sys.stderr
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        # "zoo: base ━━━━━━   412/2000 steps, 0:02:31 spent, 0:09:40 left"
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps,"),
                   TimeElapsedColumn(), TextColumn("spent,"), TimeRemainingColumn(), TextColumn("left"))
        with Progress(*columns, console=Console(file=stream), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda: bar.advance(task)
        return
    done, start = 0, time.perf_counter()
    marks = {total * k // LINES for k in range(1, LINES)} - {0, total}

    def step() -> None:
        nonlocal done
        done += 1
        if done in marks:
            spent = time.perf_counter() - start
            print(f"{label}: step {done}/{total}, {spent:.0f} s, about {spent / done * (total - done):.0f} s left",
                  file=stream, flush=True)

    yield step

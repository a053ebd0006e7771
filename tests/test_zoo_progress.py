"""The zoo's training progress: a bar on a terminal, three short lines in a log."""

from __future__ import annotations

import io

from objectives.zoo.progress import step_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(stream, total: int) -> str:
    with step_progress("zoo: base", total, stream) as step:
        for _ in range(total):
            step()
    return stream.getvalue()


def test_off_a_terminal_a_line_per_quarter_with_the_step_count_and_time_left():
    lines = run_steps(io.StringIO(), 2000).splitlines()
    assert [line.split(",")[0] for line in lines] == [f"zoo: base: step {n}/2000" for n in (500, 1000, 1500)]
    assert all(line.endswith(" s left") for line in lines)
    short = run_steps(io.StringIO(), 2).splitlines()  # a short loop: one line
    assert len(short) == 1 and short[0].startswith("zoo: base: step 1/2, ")


def test_on_a_terminal_a_bar_with_the_step_count_and_time_left():
    out = run_steps(Terminal(), 80)
    assert "zoo: base" in out and "80/80" in out and "spent," in out and "left" in out

"""The reproducible schedule: when a trial may be asked and told, so that a run repeats exactly.

With K workers, trial n (counted in the order this session asks them: its `seq`) is
asked when every trial asked before n - K has its outcome, and no trial asked at or
after n - K has been told: a result that comes in early is held back until the
sampler may see it. The pruner judges trial n on the trials asked before n - K alone,
which are told by then. What the sampler and the pruner see is then the same whichever
worker is faster, so a spec, a seed and a worker count give the same trials, bit for
bit. The price: a free worker may wait for the slowest of the last K trials.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial


class Schedule:
    def __init__(self, lag: int):
        self.lag = lag  # K: the number of workers
        self.asked = 0  # trials asked this session; the next one gets seq = asked
        self.seq_of: dict[int, int] = {}  # trial number -> seq, for this session's trials
        self.unfinished: set[int] = set()  # seqs asked whose outcome is not known yet

    def may_ask(self) -> bool:
        return all(seq >= self.asked - self.lag for seq in self.unfinished)

    def ask(self, number: int) -> int:
        """Trial `number` was asked; its seq."""
        seq, self.asked = self.asked, self.asked + 1
        self.seq_of[number] = seq
        return seq

    def started(self, seq: int) -> None:
        self.unfinished.add(seq)

    def settled(self, seq: int) -> None:
        """Its outcome is known (or it was left for --resume)."""
        self.unfinished.discard(seq)

    def may_tell(self, seq: int) -> bool:
        return seq < self.asked - self.lag

    def told_before(self, number: int, seq: int):
        """The trials the pruner may see when judging trial `number`: those asked before seq - K (and earlier
        sessions', and baselines), and the trial itself."""
        cutoff = seq - self.lag

        def visible(trials: list[FrozenTrial]) -> list[FrozenTrial]:
            return [t for t in trials if t.number == number or self.seq_of.get(t.number, -1) < cutoff]

        return visible

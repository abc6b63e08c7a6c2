"""Ratios that cannot flatter: each one comes from pairs measured back to back.

On a shared machine a neighbour's burst of load slows whatever runs during it.
Dividing the best run of one thing by the best run of another picks the two
luckiest moments, which need not be the same moment. So each repeat measures
the figure and its baseline one right after the other, the ratio is taken
within that pair, and the report gives the median ratio with its range over
all pairs, keeping every pair.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

Step = Callable[[], Awaitable[float]]


@dataclass(frozen=True)
class Spread:
    """The median of some repeats and their range."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def text(self, spec: str) -> str:
        """``"0.51 [0.42 to 0.70]"`` for ``spec=".2f"``."""
        return f"{self.median:{spec}} [{self.min:{spec}} to {self.max:{spec}}]"


@dataclass(frozen=True)
class Pair:
    """One repeat: the baseline and the figure, measured back to back, and figure / baseline."""

    baseline: float
    subject: float
    ratio: float


@dataclass(frozen=True)
class Paired:
    """``subject`` over ``baseline``, pair by pair."""

    subject: str
    baseline: str
    ratio: Spread
    subject_figure: Spread
    baseline_figure: Spread
    pairs: list[Pair]

    @classmethod
    def of(cls, subject: str, subjects: Sequence[float], baseline: str, baselines: Sequence[float]) -> Paired:
        if len(subjects) != len(baselines) or not subjects:
            raise ValueError(f"{subject} / {baseline}: {len(subjects)} figures for {len(baselines)} baselines")
        pairs = [Pair(base, value, value / base) for value, base in zip(subjects, baselines, strict=True)]
        return cls(
            subject,
            baseline,
            Spread.of([pair.ratio for pair in pairs]),
            Spread.of(subjects),
            Spread.of(baselines),
            pairs,
        )

    def text(self) -> str:
        return f"{self.subject} / {self.baseline}: {self.ratio.text('.2f')} over {len(self.pairs)} pairs"


async def interleaved(repeats: int, steps: Mapping[str, Step]) -> dict[str, list[float]]:
    """Each step's figure once per repeat, every step of a repeat run one after the other.

    Even repeats run the steps in the order given, odd ones in reverse, so that
    neither member of a pair always goes first (and always meets the colder
    cache or the start of a neighbour's burst).
    """
    names = list(steps)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            figures[name].append(await steps[name]())
    return figures

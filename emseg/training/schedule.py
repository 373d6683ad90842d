"""Learning-rate schedules: over the run's steps, or over its time budget.

Without a time limit the learning rate warms up linearly for ``warmup_steps`` (at most 10 % of
the run) and then follows a cosine decay to ``lr * min_lr_ratio`` at the last step. With a time
limit the run may stop long before its last step, so the schedule follows the *budget*: its
progress is the larger of the share of steps done and the share of the time limit spent, the
warm-up ends at ``warmup_fraction`` of it (or after ``warmup_steps``, whichever comes first) and
the cosine decay reaches its floor when the budget is spent. A run stopped by its time limit
therefore always ends with a decayed learning rate, however few steps the machine gave it.

:class:`TimeBudget` (the one reader of ``config.time_limit``) gives the loop all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emseg.config import TrainConfig


def _cosine(progress: float, config: TrainConfig) -> float:
    floor = config.peak_lr * config.min_lr_ratio
    return floor + 0.5 * (config.peak_lr - floor) * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up (at most 10 % of the run), then cosine decay to lr * min_lr_ratio."""
    warmup = min(config.warmup_steps, max(1, total // 10))
    if step < warmup:
        return config.peak_lr * (step + 1) / warmup
    return _cosine((step - warmup) / max(1, total - warmup), config)


def budget_progress(step: int, total: int, elapsed: float, time_limit: float) -> float:
    """How much of the run is behind us, in [0, 1]: steps done or budget spent, the larger."""
    return min(1.0, max(step / max(1, total), elapsed / time_limit))


def budget_learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    """The learning rate at ``step`` once ``progress`` (:func:`budget_progress`) of the budget is spent."""
    warm = config.warmup_fraction
    ramp = max((step + 1) / max(1, config.warmup_steps), progress / warm if warm > 0 else math.inf)
    if ramp < 1:
        return config.peak_lr * ramp
    return _cosine((progress - warm) / max(1e-9, 1 - warm), config)


@dataclass(frozen=True)
class TimeBudget:
    """A run's time limit in seconds (``seconds`` None: the step count alone ends the run)."""

    seconds: float | None

    @classmethod
    def of(cls, config: TrainConfig) -> TimeBudget:
        return cls(config.time_limit)

    def learning_rate(self, step: int, total: int, spent: float, config: TrainConfig) -> float:
        """The learning rate of ``step``: over the run's ``total`` steps, or over the budget when
        there is one (``spent`` seconds of it gone)."""
        if self.seconds is None:
            return learning_rate(step, total, config)
        return budget_learning_rate(step, budget_progress(step, total, spent, self.seconds), config)

    def left(self, spent: float) -> float:
        """Seconds left after ``spent`` (infinite without a limit)."""
        return math.inf if self.seconds is None else max(0.0, self.seconds - spent)

    def exhausted(self, spent: float) -> bool:
        """Whether ``spent`` seconds are past the limit: the run stops after this step."""
        return self.seconds is not None and spent > self.seconds


__all__ = ["learning_rate", "budget_progress", "budget_learning_rate", "TimeBudget"]

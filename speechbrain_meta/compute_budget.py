"""Equal compute: a budget of measured training seconds for meta-training.

Algorithms differ in the cost of a meta-step (second-order MAML's is several
times the multitask baseline's), so an equal number of episodes is not an
equal budget. With ``train_time_budget_minutes`` a :class:`MetaBrain
<speechbrain_meta.brain.MetaBrain>` adds up the time of its training
batches (``fit_batch``: the inner loops, the meta-gradient and the outer
step; not the data loading, validation or checkpoints) in a
:class:`TrainingClock` and, once the sum exceeds the budget, finishes the
current batch, validates and checkpoints as at the end of an epoch and ends
``fit``. The clock is a checkpoint recoverable, so a resumed run counts the
time spent before it was killed. :func:`write_training_record` records what
a training used (``training_time.json``), :func:`read_training_record`
reads it back.

Example
-------
>>> clock = TrainingClock(budget_minutes=0.5)
>>> clock.add(20.0)
>>> clock.spent
False
>>> clock.add(11.0)
>>> clock.spent, clock.seconds
(True, 31.0)
>>> TrainingClock().spent  # no budget: never spent
False
"""

import json
import math
import os
from typing import Optional

from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError

__all__ = [
    "TRAINING_RECORD",
    "TrainingClock",
    "read_training_record",
    "write_training_record",
]

TRAINING_RECORD = "training_time.json"


@register_checkpoint_hooks
class TrainingClock:
    """The seconds spent in training batches, against an optional budget.

    Arguments
    ---------
    budget_minutes : float, optional
        The budget; None: none (the clock only measures).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the budget is not a finite number of minutes > 0.
    """

    def __init__(self, budget_minutes: Optional[float] = None):
        if budget_minutes is not None and not 0 < float(budget_minutes) < math.inf:
            raise SetupError(
                "train_time_budget_minutes must be a finite number of minutes > 0, "
                f"got {budget_minutes!r}; null trains for every epoch."
            )
        self.budget_minutes = budget_minutes
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        """Count the time of one training batch."""
        self.seconds += seconds

    @property
    def spent(self) -> bool:
        """Whether the time counted exceeds the budget."""
        return self.budget_minutes is not None and self.seconds > 60 * float(
            self.budget_minutes
        )

    @mark_as_saver
    def save(self, path: str) -> None:
        """Write the seconds counted to ``path``."""
        with open(path, "w", encoding="utf-8") as stream:
            json.dump({"seconds": self.seconds}, stream)

    @mark_as_loader
    def load(self, path: str, end_of_epoch: bool = False) -> None:
        """Restore the seconds counted when ``path`` was saved."""
        del end_of_epoch
        with open(path, encoding="utf-8") as stream:
            self.seconds = float(json.load(stream)["seconds"])


def write_training_record(brain, folder: str) -> dict:
    """Write ``<folder>/training_time.json``: what a training used.

    Arguments
    ---------
    brain : speechbrain_meta.brain.MetaBrain
        The Brain after ``fit`` (its ``training_clock`` and ``optimizer_step``).
    folder : str
        The training's output folder.

    Returns
    -------
    dict
        ``train_seconds`` (the time of the training batches),
        ``meta_steps`` (the outer optimizer's steps),
        ``train_time_budget_minutes`` and ``stopped_by_budget``.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> brain = SimpleNamespace(training_clock=TrainingClock(1), optimizer_step=7)
    >>> brain.training_clock.add(61.04)
    >>> folder = getfixture("tmp_path")
    >>> write_training_record(brain, str(folder)) == read_training_record(str(folder))
    True
    >>> read_training_record(str(folder))["stopped_by_budget"]
    True
    """
    clock = brain.training_clock
    record = {
        "train_seconds": round(clock.seconds, 1),
        "meta_steps": int(brain.optimizer_step),
        "train_time_budget_minutes": clock.budget_minutes,
        "stopped_by_budget": clock.spent,
    }
    path = os.path.join(folder, TRAINING_RECORD)
    with atomic_write(path) as stream:
        json.dump(record, stream, indent=2)
    return record


def read_training_record(folder: str) -> Optional[dict]:
    """The record of :func:`write_training_record` in ``folder`` (None: none)."""
    path = os.path.join(folder, TRAINING_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)

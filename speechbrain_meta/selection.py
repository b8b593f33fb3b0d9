"""Choosing how long (and how fast) to adapt, without the test set.

Fine-tuning on minutes of speech overfits: the test error falls, then rises
again, and where it turns depends on the initialisation and the budget. The
number of updates that a user's adapted model gets must therefore be chosen
on data of the budget itself. :func:`hold_out` sets a part of the budget
aside; :func:`select_updates` fine-tunes on the rest from the initialisation,
once per learning rate of a small grid, scores the held-out part after each
curve point, and picks the point with the lowest held-out CER (ties: fewer
updates, then the earlier rate). Every run starts from the same weights and
random generator state, which are restored at the end, so that the run that
follows (``adapt.py``'s curve on the whole budget, with the chosen rate) is
exactly the run it would have been without the selection; its weights at the
chosen step are the ones to keep: the selected schedule refit on the whole
budget.

Example
-------
>>> from speechbrain.dataio.dataset import DynamicItemDataset
>>> data = DynamicItemDataset({f"u{i}": {"duration": 1.0} for i in range(10)})
>>> fit, held_out = hold_out(data, 0.2, seed=1)
>>> len(fit), len(held_out), set(fit.data_ids) & set(held_out.data_ids)
(8, 2, set())
"""

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional, Sequence, Tuple

import speechbrain as sb
from speechbrain.dataio.dataset import FilteredSortedDynamicItemDataset

from speechbrain_meta.adaptation import adaptation_curve
from speechbrain_meta.checkpoints import RandomState
from speechbrain_meta.errors import SetupError

__all__ = ["Selection", "hold_out", "select_updates"]

logger = logging.getLogger(__name__)


def hold_out(dataset, fraction: float, seed: int) -> Tuple[object, object]:
    """Split an adaptation budget into a part to fit and a part to select on.

    Arguments
    ---------
    dataset : speechbrain.dataio.dataset.DynamicItemDataset
        The budget's utterances (at least 2).
    fraction : float
        The share held out, ``0 < fraction < 1``: ``round(fraction * n)``
        utterances, at least 1, and at least 1 left to fit.
    seed : int
        Seed of the draw.

    Returns
    -------
    tuple
        ``(fit, held_out)`` datasets with the pipeline of ``dataset``.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If ``fraction`` is not in (0, 1) or the budget has fewer than 2
        utterances.
    """
    if not 0 < fraction < 1:
        raise SetupError(
            f"selection_fraction must be in (0, 1), got {fraction!r}; 0 "
            "disables the selection (set --selection_fraction 0)."
        )
    ids = sorted(dataset.data_ids)
    if len(ids) < 2:
        raise SetupError(
            f"A budget of {len(ids)} utterance cannot be split to select the "
            "number of updates: raise --budget or set --selection_fraction 0."
        )
    count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    held = set(random.Random(f"{seed}:selection").sample(ids, count))
    return (
        FilteredSortedDynamicItemDataset(dataset, [i for i in ids if i not in held]),
        FilteredSortedDynamicItemDataset(dataset, [i for i in ids if i in held]),
    )


@dataclass
class Selection:
    """What :func:`select_updates` measured and chose.

    Arguments
    ---------
    step : int
        The chosen number of updates.
    lr : float or None
        The chosen learning rate (None: the optimizer's own).
    points : list of dict
        Every held-out point: ``lr``, ``step``, ``cer`` (and the other
        metrics), in the order measured.
    """

    step: int
    lr: Optional[float]
    points: List[dict] = field(default_factory=list)


def select_updates(
    brain: sb.Brain,
    fit_set,
    held_out,
    curve_steps: Sequence[int],
    lrs: Optional[Sequence[float]] = None,
    metric: str = "cer",
    **curve_options,
) -> Selection:
    """Pick the number of updates (and rate) by the error on held-out data.

    Arguments
    ---------
    brain : speechbrain.core.Brain
        The Brain holding the initialisation (restored afterwards, as are
        the random generators); its ``opt_class`` takes an ``lr`` keyword
        when ``lrs`` is given.
    fit_set, held_out : Dataset
        The two parts of the budget (:func:`hold_out`).
    curve_steps : sequence of int
        The candidate numbers of updates.
    lrs : sequence of float, optional
        Learning rates to try; None: the optimizer's own only.
    metric : str
        The entry of each curve point to minimise (from ``metrics``).
    **curve_options : dict
        Passed on to :func:`speechbrain_meta.adaptation.adaptation_curve`
        (loader options, ``seed``, ``metrics``, ``progressbar``).

    Returns
    -------
    Selection
        The chosen step and rate and every held-out point.

    Raises
    ------
    ValueError
        If no point has a finite ``metric``.
    """
    weights = copy.deepcopy(brain.modules.state_dict())
    generators = RandomState.state()
    opt_class = brain.opt_class
    points = []
    try:
        for lr in lrs or [None]:
            brain.opt_class = opt_class if lr is None else partial(opt_class, lr=lr)
            for point in adaptation_curve(
                brain, fit_set, held_out, curve_steps, **curve_options
            ):
                points.append({"lr": lr, **point})
            brain.modules.load_state_dict(weights)
            RandomState.restore(generators)
    finally:
        brain.opt_class = opt_class
        brain.modules.load_state_dict(weights)
        RandomState.restore(generators)
    scored = [p for p in points if math.isfinite(p[metric])]
    if not scored:
        raise ValueError(f"No held-out point has a finite {metric}: {points}")
    order = {lr: rank for rank, lr in enumerate(lrs or [None])}
    best = min(scored, key=lambda p: (p[metric], p["step"], order[p["lr"]]))
    logger.info(
        "Selected on %d held-out utterances: %d updates%s (held-out %s %.4g)",
        len(held_out),
        best["step"],
        "" if best["lr"] is None else f" at lr {best['lr']:g}",
        metric,
        best[metric],
    )
    return Selection(best["step"], best["lr"], points)

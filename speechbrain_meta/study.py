"""Several seeds and paired confidence intervals: the protocol as a study.

One seed of the protocol is one draw of a corpus, of episodes and of the
adaptation budgets; whether meta-learning pays is a question about the
distribution of those draws. This module holds what the protocol needs to
answer it:

* per-utterance scores: :func:`utterance_scores` takes each test
  utterance's character and word edits and reference lengths from
  SpeechBrain's ``ErrorRateStats`` at every curve point (``adapt.py`` writes
  them to ``utterances.csv`` with :func:`write_utterances`);
  :func:`selected_step` reads the step that the adaptation kept
  (``selection.json``);
* several seeds: :func:`protocol_seeds` and :func:`seed_overrides` (each
  seed after the first has its own data folders ``<folder>_<seed>`` and
  stage folders ``<output_folder>/seed_<seed>``);
* the summary: :func:`summary_rows` gives, per (target, budget, init, step),
  the mean and standard deviation of the CER over seeds and the paired
  difference against the multitask baseline of the init's regime with a
  two-level bootstrap confidence interval (:func:`bootstrap_difference`),
  also at the step each adaptation selected; :func:`write_summary`,
  :func:`summary_markdown`, and :func:`training_markdown` for the compute
  each training used.

Example
-------
>>> diff, low, high = bootstrap_difference(
...     [[2, 1, 3]], [[2, 1, 3]], [[10, 10, 10]], replicates=200
... )
>>> diff, low, high
(0.0, 0.0, 0.0)
"""

import csv
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError

__all__ = [
    "SELECTED",
    "SUMMARY_FIELDS",
    "UTTERANCE_FIELDS",
    "bootstrap_difference",
    "init_regimes",
    "mean_over_seeds",
    "protocol_seeds",
    "read_summary",
    "read_utterances",
    "seed_overrides",
    "selected_step",
    "summary_markdown",
    "summary_rows",
    "training_markdown",
    "utterance_scores",
    "write_summary",
    "write_utterances",
]

UTTERANCE_FIELDS = ("step", "ID", "char_errors", "chars", "word_errors", "words")
SUMMARY_FIELDS = (
    "regime",
    "target",
    "budget",
    "init",
    "step",
    "seeds",
    "mean_cer",
    "sd_cer",
    "diff_vs_multitask",
    "ci_low",
    "ci_high",
)
#: The ``step`` of a summary row for the point each adaptation kept.
SELECTED = "selected"
_UTTERANCES = "utterances.csv"
_SELECTION = "selection.json"
# Key of one adaptation stage: (seed, target, budget, init).
StageKey = Tuple[int, str, str, str]


# ---------------------------------------------------------- per utterance
def utterance_scores(step: int, cer_metric, wer_metric) -> List[dict]:
    """Each scored utterance's edits and reference lengths at one curve point.

    Arguments
    ---------
    step : int
        The number of updates of the point.
    cer_metric, wer_metric : speechbrain.utils.metric_stats.ErrorRateStats
        The recipe's trackers after the evaluation (characters, words).

    Returns
    -------
    list of dict
        One per utterance, with the keys of :data:`UTTERANCE_FIELDS`.

    Example
    -------
    >>> from speechbrain.utils.metric_stats import ErrorRateStats
    >>> cer, wer = ErrorRateStats(split_tokens=True), ErrorRateStats()
    >>> for metric in (cer, wer):
    ...     metric.append(["u1"], [["a", "cat"]], [["a", "cap"]])
    >>> utterance_scores(5, cer, wer)  # doctest: +NORMALIZE_WHITESPACE
    [{'step': 5, 'ID': 'u1', 'char_errors': 1, 'chars': 5,
      'word_errors': 1, 'words': 2}]
    """
    words = {score["key"]: score for score in wer_metric.scores}
    return [
        {
            "step": step,
            "ID": score["key"],
            "char_errors": score["num_edits"],
            "chars": score["num_ref_tokens"],
            "word_errors": words[score["key"]]["num_edits"],
            "words": words[score["key"]]["num_ref_tokens"],
        }
        for score in cer_metric.scores
    ]


def write_utterances(rows: Sequence[dict], path: str) -> None:
    """Write per-utterance scores (:data:`UTTERANCE_FIELDS`) as CSV, atomically."""
    with atomic_write(path, newline="") as stream:
        writer = csv.DictWriter(stream, UTTERANCE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_utterances(folder: str) -> Optional[Dict[int, Dict[str, Tuple[int, int]]]]:
    """The character scores of an adaptation folder's ``utterances.csv``.

    Arguments
    ---------
    folder : str
        The adaptation's output folder.

    Returns
    -------
    dict or None
        ``step -> {ID: (char_errors, chars)}``; None without the file (a
        stage adapted before ``adapt.py`` wrote it).

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> write_utterances([{"step": 0, "ID": "u1", "char_errors": 3, "chars": 9,
    ...                    "word_errors": 1, "words": 2}], str(folder / _UTTERANCES))
    >>> read_utterances(str(folder)), read_utterances(str(folder / "none"))
    ({0: {'u1': (3, 9)}}, None)
    """
    path = os.path.join(folder, _UTTERANCES)
    if not os.path.isfile(path):
        return None
    scores = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            scores[int(row["step"])][row["ID"]] = (
                int(row["char_errors"]),
                int(row["chars"]),
            )
    return dict(scores)


def selected_step(folder: str, steps: Sequence[int]) -> int:
    """The number of updates an adaptation kept: ``selection.json``'s choice.

    Without a selection (``selection_fraction: 0``, a budget of one
    utterance, or a stage adapted before the selection existed) ``adapt.py``
    keeps the last curve step.

    Arguments
    ---------
    folder : str
        The adaptation's output folder.
    steps : sequence of int
        Its curve steps.

    Returns
    -------
    int
        The step kept.

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> selected_step(str(folder), [0, 25, 50])
    50
    >>> _ = (folder / _SELECTION).write_text('{"step": 25, "lr": null}')
    >>> selected_step(str(folder), [0, 25, 50])
    25
    """
    path = os.path.join(folder, _SELECTION)
    if not os.path.isfile(path):
        return max(steps)
    with open(path, encoding="utf-8") as stream:
        return int(json.load(stream)["step"])


# ------------------------------------------------------------------ seeds
def protocol_seeds(hparams: dict) -> List[int]:
    """A protocol's seeds: its ``seeds``, or else its one ``seed``.

    Example
    -------
    >>> protocol_seeds({"seed": 1234}), protocol_seeds({"seed": 1, "seeds": [1, 2]})
    ([1234], [1, 2])
    """
    seeds = [int(seed) for seed in hparams.get("seeds") or [hparams["seed"]]]
    if len(set(seeds)) != len(seeds):
        raise SetupError(f"seeds must be distinct, got {seeds}.")
    return seeds


def seed_overrides(hparams: dict, seed: int, first: bool) -> dict:
    """The protocol YAML's overrides that make it run one of its seeds.

    The first seed keeps the YAML's folders, so that a protocol with one
    seed runs exactly as it did before seeds existed. Every other seed gets
    its own data, ``<value>_<seed>`` for each key of ``seed_folders``
    (default ``[data_folder]``; the data preparation builds them with that
    seed), and its own stages in ``<output_folder>/seed_<seed>``.

    Arguments
    ---------
    hparams : dict
        The loaded protocol YAML.
    seed : int
        The seed.
    first : bool
        Whether it is the first of ``seeds``.

    Returns
    -------
    dict
        Top-level overrides (empty: the YAML as loaded).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If a key of ``seed_folders`` is not in the YAML.

    Example
    -------
    >>> protocol = {"seed": 1, "output_folder": "out", "data_folder": "data/x"}
    >>> seed_overrides(protocol, 1, first=True)
    {}
    >>> seed_overrides(protocol, 2, first=False)
    {'seed': 2, 'output_folder': 'out/seed_2', 'data_folder': 'data/x_2'}
    """
    overrides = {} if seed == hparams["seed"] else {"seed": seed}
    if first:
        return overrides
    folders = hparams.get("seed_folders")
    if folders is None:
        folders = ["data_folder"] if "data_folder" in hparams else []
    missing = [key for key in folders if key not in hparams]
    if missing:
        raise SetupError(f"seed_folders names {missing}, which are not protocol keys.")
    overrides.update(
        seed=seed, output_folder=os.path.join(hparams["output_folder"], f"seed_{seed}")
    )
    overrides.update({key: f"{hparams[key]}_{seed}" for key in folders})
    return overrides


def init_regimes(hparams: dict, adapted: Sequence[str]) -> Tuple[dict, dict]:
    """Every adapted init's regime and every regime's baseline, checked.

    Arguments
    ---------
    hparams : dict
        The protocol YAML: ``regimes`` (init -> regime, or a list of regimes
        for an init compared with the baselines of several; default: every
        init in one regime, ``all``) and ``baselines`` (regime -> init;
        default ``{all: multitask}`` when ``multitask`` is adapted, else none).
    adapted : sequence of str
        The adapted inits.

    Returns
    -------
    tuple
        ``(regimes, baselines)``, ``regimes`` as init -> list of regimes.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If ``regimes`` misses an adapted init or names another, or a baseline
        of ``baselines`` is not an adapted init of its regime.

    Example
    -------
    >>> init_regimes({}, ["maml", "multitask"])
    ({'maml': ['all'], 'multitask': ['all']}, {'all': 'multitask'})

    One init compared with the baselines of two regimes:

    >>> init_regimes(
    ...     {"regimes": {"lora": ["full", "lora"], "mt": "full", "mt_lora": "lora"},
    ...      "baselines": {"full": "mt", "lora": "mt_lora"}},
    ...     ["lora", "mt", "mt_lora"],
    ... )[0]
    {'lora': ['full', 'lora'], 'mt': ['full'], 'mt_lora': ['lora']}
    """
    given = hparams.get("regimes") or {init: "all" for init in adapted}
    missing = [init for init in adapted if init not in given]
    unknown = [init for init in given if init not in adapted]
    if missing or unknown:
        raise SetupError(
            f"regimes must name every adapted init once: missing {missing}, "
            f"not adapted {unknown}."
        )
    regimes = {init: _regime_list(value) for init, value in given.items()}
    baselines = hparams.get("baselines")
    if not baselines:  # the default: multitask, when it is adapted
        return regimes, {"all": "multitask"} if "multitask" in adapted else {}
    for regime, base in baselines.items():
        if regime not in regimes.get(base, []):
            raise SetupError(
                f"The baseline of regime '{regime}', '{base}', is not an adapted "
                f"init of that regime (regimes: {regimes})."
            )
    return regimes, dict(baselines)


def _regime_list(value) -> List[str]:
    """An init's regimes: one name or a list of them."""
    return [value] if isinstance(value, str) else list(value)


# -------------------------------------------------------------- statistics
def bootstrap_difference(
    first: Sequence[Sequence[int]],
    second: Sequence[Sequence[int]],
    lengths: Sequence[Sequence[int]],
    replicates: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Tuple[float, float, float]:
    """The paired CER difference of two inits, with a two-level bootstrap CI.

    Each replicate draws the seeds with replacement, then, for every seed
    drawn, that seed's test utterances with replacement, and computes the
    CER difference of the pooled edits over the pooled reference lengths.

    Arguments
    ---------
    first, second : sequence of sequences of int
        Per seed, the character edits of every test utterance for each init
        (the same utterances in the same order).
    lengths : sequence of sequences of int
        Per seed, the utterances' reference lengths in characters.
    replicates : int
        Bootstrap replicates.
    seed : int
        Seed of the resampling (fixed: the same data give the same interval).
    level : float
        Coverage of the interval.

    Returns
    -------
    tuple
        ``(difference, low, high)`` in CER points (first minus second).

    Example
    -------
    >>> rng = np.random.default_rng(1)
    >>> second = [rng.integers(0, 20, 50) for _ in range(3)]
    >>> first = [s + 5 for s in second]  # 5 more edits in 50 characters
    >>> diff, low, high = bootstrap_difference(first, second, [[50] * 50] * 3)
    >>> round(diff, 6), round(low, 6), round(high, 6)
    (10.0, 10.0, 10.0)
    """
    diffs = [np.asarray(a, float) - np.asarray(b, float) for a, b in zip(first, second)]
    sizes = [np.asarray(n, float) for n in lengths]
    if not diffs or any(len(d) != len(n) or not len(d) for d, n in zip(diffs, sizes)):
        raise ValueError("Every seed needs scores of the same, non-empty utterances.")
    estimate = 100 * sum(d.sum() for d in diffs) / sum(n.sum() for n in sizes)
    rng = np.random.default_rng(seed)
    count = len(diffs)
    drawn = rng.integers(count, size=(replicates, count))
    edits, chars = np.zeros(replicates), np.zeros(replicates)
    for slot in range(count):
        for index, (diff, size) in enumerate(zip(diffs, sizes)):
            chosen = drawn[:, slot] == index
            rows = rng.integers(len(diff), size=(int(chosen.sum()), len(diff)))
            edits[chosen] += diff[rows].sum(axis=1)
            chars[chosen] += size[rows].sum(axis=1)
    low, high = np.quantile(100 * edits / chars, [(1 - level) / 2, (1 + level) / 2])
    return float(estimate), float(low), float(high)


def mean_over_seeds(rows: Sequence[dict]) -> List[dict]:
    """Result rows averaged over seeds: one per (init, target, budget, step).

    Example
    -------
    >>> rows = [{"seed": s, "init": "a", "target": "t", "budget": "1min",
    ...          "step": 0, "cer": c, "wer": 2 * c} for s, c in ((1, 10.0), (2, 20.0))]
    >>> mean_over_seeds(rows)  # doctest: +NORMALIZE_WHITESPACE
    [{'init': 'a', 'target': 't', 'budget': '1min', 'step': 0,
      'cer': 15.0, 'wer': 30.0}]
    """
    groups = defaultdict(list)
    for row in rows:
        groups[(row["init"], row["target"], row["budget"], row["step"])].append(row)
    return [
        {
            "init": init,
            "target": target,
            "budget": budget,
            "step": step,
            "cer": float(np.mean([r["cer"] for r in group])),
            "wer": float(np.mean([r["wer"] for r in group])),
        }
        for (init, target, budget, step), group in groups.items()
    ]


def _with_scores(points: dict, scores: dict, key: tuple) -> dict:
    """``seed -> (cer, utterance scores at its step or None)``."""
    return {
        seed: (cer, (scores.get((seed, *key)) or {}).get(step))
        for seed, (cer, step) in points.items()
    }


def _paired_difference(mine: dict, theirs: dict) -> Tuple[Optional[float], ...]:
    """The difference against the baseline over the seeds both have."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None, None, None
    paired = [(mine[seed][1], theirs[seed][1]) for seed in seeds]
    if any(a is None or b is None or set(a) != set(b) for a, b in paired):
        # No per-utterance scores: the difference of the means, no interval.
        diff = np.mean([mine[seed][0] - theirs[seed][0] for seed in seeds])
        return float(diff), None, None
    ids = [sorted(a) for a, _ in paired]
    return bootstrap_difference(
        [[a[i][0] for i in order] for (a, _), order in zip(paired, ids)],
        [[b[i][0] for i in order] for (_, b), order in zip(paired, ids)],
        [[a[i][1] for i in order] for (a, _), order in zip(paired, ids)],
    )


def summary_rows(
    rows: Sequence[dict],
    scores: Dict[StageKey, Optional[dict]],
    selected: Dict[StageKey, int],
    regimes: dict,
    baselines: dict,
) -> List[dict]:
    """The protocol's summary over seeds (the columns of :data:`SUMMARY_FIELDS`).

    One row per (target, budget, init) and curve step, and one with step
    :data:`SELECTED` for the step each seed's adaptation kept (its own
    choice, per seed and init): ``seeds`` (how many have the point),
    ``mean_cer`` and ``sd_cer`` (sample standard deviation; None with one
    seed) over seeds, and, for every init but its regime's baseline,
    ``diff_vs_multitask`` (CER points of the pooled edits of the paired
    seeds and utterances, init minus baseline) with the 95 % bootstrap
    interval ``ci_low``, ``ci_high`` of :func:`bootstrap_difference`. An
    init of several regimes has these rows once per regime, each against
    that regime's baseline. A stage without per-utterance scores gives the
    difference of the mean CERs and no interval.

    Arguments
    ---------
    rows : sequence of dict
        Result rows with a ``seed``.
    scores : dict
        ``(seed, target, budget, init) -> read_utterances(...)`` (None: none).
    selected : dict
        ``(seed, target, budget, init) -> step kept``.
    regimes, baselines : dict
        Of :func:`init_regimes` (a regime may also be given as one name).

    Returns
    -------
    list of dict
        The summary, in the order of the rows.

    Example
    -------
    >>> rows = [{"seed": s, "init": i, "target": "t", "budget": "1min", "step": 5,
    ...          "cer": c, "wer": 90.0}
    ...         for s, i, c in ((1, "maml", 30.0), (2, "maml", 40.0),
    ...                         (1, "multitask", 50.0), (2, "multitask", 50.0))]
    >>> picked = {(s, "t", "1min", i): 5 for s in (1, 2) for i in ("maml", "multitask")}
    >>> regimes = {"maml": "all", "multitask": "all"}
    >>> first = summary_rows(rows, {}, picked, regimes, {"all": "multitask"})[0]
    >>> first["mean_cer"], round(first["sd_cer"], 3), first["diff_vs_multitask"]
    (35.0, 7.071, -15.0)
    """
    curves = defaultdict(dict)  # (target, budget, init) -> seed -> step -> cer
    for row in rows:
        key = (row["target"], row["budget"], row["init"])
        curves[key].setdefault(row["seed"], {})[row["step"]] = row["cer"]
    summary = []
    for target, budget, init in curves:
        for regime in _regime_list(regimes[init]):
            summary += _regime_rows(
                regime, (target, budget, init), curves, scores, selected, baselines
            )
    return summary


def _regime_rows(
    regime: str,
    key: tuple,
    curves: dict,
    scores: dict,
    selected: dict,
    baselines: dict,
) -> List[dict]:
    """The summary rows of one (target, budget, init) against one regime's baseline."""
    target, budget, init = key
    by_seed = curves[key]
    steps = sorted({step for curve in by_seed.values() for step in curve})
    base = baselines.get(regime)
    base_curves = curves.get((target, budget, base), {}) if base != init else {}
    rows = []
    for step in [*steps, SELECTED]:
        points = _points(by_seed, step, key, selected)
        if not points:
            continue
        cers = [cer for cer, _ in points.values()]
        diff = low = high = None
        if base_curves:
            theirs = _points(base_curves, step, (target, budget, base), selected)
            diff, low, high = _paired_difference(
                _with_scores(points, scores, key),
                _with_scores(theirs, scores, (target, budget, base)),
            )
        rows.append(
            {
                "regime": regime,
                "target": target,
                "budget": budget,
                "init": init,
                "step": step,
                "seeds": len(points),
                "mean_cer": float(np.mean(cers)),
                "sd_cer": float(np.std(cers, ddof=1)) if len(cers) > 1 else None,
                "diff_vs_multitask": diff,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def _points(by_seed: dict, step, key: tuple, selected: dict) -> Dict[int, tuple]:
    """``seed -> (cer, step)`` of one curve point, or of the step kept."""
    points = {}
    for seed, curve in by_seed.items():
        at = selected.get((seed, *key), max(curve)) if step == SELECTED else step
        if at in curve:
            points[seed] = (curve[at], at)
    return points


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(summary: Sequence[dict], path: str) -> None:
    """Write :func:`summary_rows` as CSV (None as an empty cell), atomically."""
    with atomic_write(path, newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(SUMMARY_FIELDS)
        for row in summary:
            writer.writerow([_cell(row[field]) for field in SUMMARY_FIELDS])


def read_summary(path: str) -> List[dict]:
    """Read :func:`write_summary`'s CSV (numbers as float, empty cells as None).

    Example
    -------
    >>> row = {field: None for field in SUMMARY_FIELDS}
    >>> row.update(regime="all", target="t", budget="1min", init="a", step=SELECTED,
    ...            seeds=2, mean_cer=12.5)
    >>> path = str(getfixture("tmp_path") / "summary.csv")
    >>> write_summary([row], path)
    >>> read_summary(path)[0]["mean_cer"], read_summary(path)[0]["sd_cer"]
    (12.5, None)
    """
    numbers = set(SUMMARY_FIELDS[5:])
    with open(path, newline="", encoding="utf-8") as stream:
        return [
            {
                key: (float(value) if value else None) if key in numbers else value
                for key, value in row.items()
            }
            for row in csv.DictReader(stream)
        ]


def _points_text(value: Optional[float]) -> str:
    return "" if value is None or math.isnan(value) else f"{value:+.2f}"


def summary_markdown(summary: Sequence[dict]) -> str:
    """The summary's rows for the step each adaptation kept and the last step.

    Example
    -------
    >>> row = {"regime": "all", "target": "t", "budget": "1min", "init": "maml",
    ...        "step": SELECTED, "seeds": 3, "mean_cer": 30.0, "sd_cer": 2.0,
    ...        "diff_vs_multitask": -5.0, "ci_low": -8.0, "ci_high": -2.0}
    >>> print(summary_markdown([row]).splitlines()[-1])
    | all | t | 1min | maml | selected | 3 | 30.00 ± 2.00 | -5.00 [-8.00, -2.00] |
    """
    last = defaultdict(int)
    for row in summary:
        if row["step"] != SELECTED:
            key = (row["target"], row["budget"], row["init"])
            last[key] = max(last[key], int(row["step"]))
    lines = [
        "",
        "Over seeds (summary.csv): mean CER ± standard deviation, and the paired "
        "difference against the regime's multitask baseline with its 95 % "
        "bootstrap interval over seeds and test utterances, at the step each "
        "adaptation selected on its held-out part and at the last step.",
        "",
        "| regime | target | budget | init | step | seeds | CER (%) | "
        "vs multitask (points) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in summary:
        key = (row["target"], row["budget"], row["init"])
        if row["step"] != SELECTED and int(row["step"]) != last[key]:
            continue
        cer = f"{row['mean_cer']:.2f}"
        if row["sd_cer"] is not None:
            cer += f" ± {row['sd_cer']:.2f}"
        diff = _points_text(row["diff_vs_multitask"])
        if diff and row["ci_low"] is not None:
            diff += f" [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
        lines.append(
            f"| {row['regime']} | {row['target']} | {row['budget']} | {row['init']} "
            f"| {row['step']} | {int(row['seeds'])} | {cer} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def training_markdown(records: Dict[Tuple[int, str], Optional[dict]]) -> str:
    """A table of the compute each training used (``training_time.json``).

    Arguments
    ---------
    records : dict
        ``(seed, init) -> read_training_record(folder)``; None entries (a
        training run before the record existed) are left out.

    Returns
    -------
    str
        Markdown (empty if no record).

    Example
    -------
    >>> record = {"train_seconds": 61.0, "meta_steps": 40,
    ...           "train_time_budget_minutes": 1, "stopped_by_budget": True}
    >>> print(training_markdown({(1, "maml"): record}).splitlines()[-1])
    | maml | 1 | 61.0 | 40 | 1 | yes |
    """
    shown = {key: record for key, record in records.items() if record}
    if not shown:
        return ""
    lines = [
        "",
        "Compute of each training (training_time.json): the seconds of its "
        "training batches and its meta-steps, against the time budget.",
        "",
        "| init | seed | training seconds | meta-steps | budget (min) | stopped by "
        "budget |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for (seed, init), record in shown.items():
        budget = record["train_time_budget_minutes"]
        lines.append(
            f"| {init} | {seed} | {record['train_seconds']:.1f} | "
            f"{record['meta_steps']} | {'' if budget is None else f'{budget:g}'} | "
            f"{'yes' if record['stopped_by_budget'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"

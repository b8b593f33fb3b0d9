"""Results of the adaptation protocol: CSV, Markdown report, plots, stage records.

The protocol adapts every initialisation to every target language with every
budget and records the test error rates along the adaptation curve, one row
per curve point with the columns of :data:`RESULT_FIELDS`. This module reads
and writes those rows (:func:`write_results`, :func:`read_results`), turns
them into a Markdown report (:func:`report_markdown`) and PNG plots of CER
against adaptation steps (:func:`plot_curves`), and records which stages of
the protocol's initialisations start from: their parameter files
(:func:`init_parameters`) and the character encoder each is adapted with
(:func:`adaptation_encoders`).

Example
-------
>>> rows = [
...     {"init": "maml", "target": "cs", "budget": "2min", "step": 0,
...      "cer": 90.0, "wer": 100.0},
...     {"init": "maml", "target": "cs", "budget": "2min", "step": 50,
...      "cer": 40.0, "wer": 80.0},
... ]
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "adaptation.csv")
>>> write_results(rows, path)
>>> read_results(path) == rows
True
"""

import csv
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import speechbrain as sb

from speechbrain_meta.adaptation import BUDGET_UNITS, find_init_checkpoint
from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError

__all__ = [
    "RESULT_FIELDS",
    "SEEDED_FIELDS",
    "adaptation_encoders",
    "budget_label",
    "final_points",
    "parse_budget",
    "init_parameters",
    "plot_curves",
    "read_results",
    "report_markdown",
    "write_results",
]

RESULT_FIELDS = ("init", "target", "budget", "step", "cer", "wer")
#: The columns of a protocol with several seeds.
SEEDED_FIELDS = ("seed", *RESULT_FIELDS)
_UNIT_SUFFIX = dict(zip(BUDGET_UNITS, ("min", "utt")))
_LABEL = re.compile(r"^(\d+(?:\.\d+)?)(min|utt)$")


_BUDGET_ITEM = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(utterances?|utt|minutes?|min|hours?|h)\s*$"
)
_ITEM_UNITS = {"utt": "utterances", "min": "minutes", "h": "hours"}


def parse_budget(item, unit: str) -> Tuple[float, str]:
    """One entry of a protocol's ``budgets``: a number, or a number and a unit.

    A number is in the protocol's ``budget_unit``; a string names its own
    unit (``"5 utterances"``, ``"10 minutes"``, ``"1 hour"``; hours become
    minutes), so that one protocol mixes them as ML-SUPERB does.

    Arguments
    ---------
    item : float or str
        The entry.
    unit : str
        The protocol's ``budget_unit`` (``minutes`` or ``utterances``).

    Returns
    -------
    tuple
        ``(value, unit)`` with unit ``minutes`` or ``utterances`` (a number
        entry's value as given).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the entry is neither.

    Example
    -------
    >>> parse_budget(2, "minutes"), parse_budget("5 utterances", "minutes")
    ((2, 'minutes'), (5.0, 'utterances'))
    >>> parse_budget("1 hour", "utterances")
    (60.0, 'minutes')
    """
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return item, unit  # as given: the stages' records hold it so
    match = _BUDGET_ITEM.match(str(item))
    if match is None:
        raise SetupError(
            f"Budget {item!r} is neither a number (in budget_unit: {unit}) nor a "
            "number and a unit, e.g. '5 utterances', '10 minutes' or '1 hour'."
        )
    value, named = float(match[1]), match[2].rstrip("s")
    named = _ITEM_UNITS.get(named, named + "s")
    if named == "hours":
        return value * 60, "minutes"
    return value, named


def budget_label(value: float, unit: str) -> str:
    """The name of a budget in the results, e.g. ``2min`` or ``50utt``.

    Arguments
    ---------
    value : float
        The budget.
    unit : str
        ``minutes`` or ``utterances``.

    Returns
    -------
    str
        The value (without a trailing ``.0``) and a unit suffix.

    Example
    -------
    >>> budget_label(2.0, "minutes"), budget_label(0.5, "minutes")
    ('2min', '0.5min')
    >>> budget_label(50, "utterances")
    '50utt'
    """
    if unit not in _UNIT_SUFFIX:
        raise ValueError(f"Unknown budget unit '{unit}'; use one of {BUDGET_UNITS}.")
    return f"{float(value):g}{_UNIT_SUFFIX[unit]}"


def _budget_order(label: str) -> Tuple[str, float]:
    match = _LABEL.match(label)
    return (match.group(2), float(match.group(1))) if match else (label, 0.0)


def write_results(rows: Sequence[dict], path: str, seeded: bool = False) -> None:
    """Write result rows as CSV (the columns of RESULT_FIELDS), atomically.

    Arguments
    ---------
    rows : sequence of dict
        Rows with at least the keys of :data:`RESULT_FIELDS`.
    path : str
        The CSV file; its folder is created.
    seeded : bool
        Whether to write the rows' ``seed`` too, as the first column
        (:data:`SEEDED_FIELDS`): a protocol with several seeds.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = SEEDED_FIELDS if seeded else RESULT_FIELDS
    with atomic_write(path, newline="") as stream:
        writer = csv.DictWriter(stream, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_results(path: str) -> List[dict]:
    """Read result rows written by :func:`write_results`.

    Arguments
    ---------
    path : str
        The CSV file.

    Returns
    -------
    list of dict
        Rows with ``step`` (and ``seed``, if written) as int and ``cer`` /
        ``wer`` as float.

    Raises
    ------
    ValueError
        If the columns are not those of :data:`RESULT_FIELDS` or
        :data:`SEEDED_FIELDS`.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if tuple(reader.fieldnames or ()) not in (RESULT_FIELDS, SEEDED_FIELDS):
            raise ValueError(
                f"{path} has columns {reader.fieldnames}, expected {RESULT_FIELDS} "
                f"or {SEEDED_FIELDS}."
            )
        return [
            {
                **row,
                **({"seed": int(row["seed"])} if "seed" in row else {}),
                "step": int(row["step"]),
                "cer": float(row["cer"]),
                "wer": float(row["wer"]),
            }
            for row in reader
        ]


def final_points(rows: Sequence[dict]) -> Dict[Tuple[str, str, str], dict]:
    """The row of the last curve step of every (target, budget, init).

    Arguments
    ---------
    rows : sequence of dict
        Result rows.

    Returns
    -------
    dict
        ``(target, budget, init) -> row``.

    Example
    -------
    >>> rows = [{"init": "a", "target": "t", "budget": "1min", "step": s,
    ...          "cer": 50.0 - s, "wer": 90.0} for s in (0, 10)]
    >>> final_points(rows)[("t", "1min", "a")]["cer"]
    40.0
    """
    last = {}
    for row in rows:
        key = (row["target"], row["budget"], row["init"])
        if key not in last or row["step"] > last[key]["step"]:
            last[key] = row
    return last


def _ordered(values, key=None) -> list:
    """Distinct values in order of first appearance (or sorted by ``key``)."""
    distinct = list(dict.fromkeys(values))
    return sorted(distinct, key=key) if key else distinct


def report_markdown(
    rows: Sequence[dict],
    comparisons: Sequence[Sequence[str]] = (),
    title: str = "Low-resource adaptation",
) -> str:
    """A Markdown report of the protocol's results.

    It has one table of CER along the adaptation curve (one line per target,
    budget and initialisation, with the WER of the last step) and, for each
    pair ``(a, b)`` of ``comparisons``, on how many (target, budget) pairs
    ``a`` ends with a lower CER than ``b``.

    Arguments
    ---------
    rows : sequence of dict
        Result rows.
    comparisons : sequence of (str, str)
        Pairs of initialisation names.
    title : str
        The report's title.

    Returns
    -------
    str
        The report.

    Example
    -------
    >>> rows = [{"init": i, "target": "cs", "budget": "2min", "step": 10,
    ...          "cer": c, "wer": 90.0} for i, c in (("maml", 30.0), ("random", 80.0))]
    >>> print(report_markdown(rows, [("maml", "random")], title="Demo"))
    # Demo
    <BLANKLINE>
    CER (%) on each target's test set after 10 adaptation steps; WER (%) after the last.
    <BLANKLINE>
    | target | budget | init | CER@10 | WER@10 |
    | --- | --- | --- | ---: | ---: |
    | cs | 2min | maml | 30.00 | 90.00 |
    | cs | 2min | random | 80.00 | 90.00 |
    <BLANKLINE>
    Final CER (last step), pairwise:
    <BLANKLINE>
    | comparison | lower CER on | mean CER difference (points) |
    | --- | ---: | ---: |
    | maml < random | 1 / 1 | -50.00 |
    <BLANKLINE>
    """
    if not rows:
        raise ValueError("No results to report.")
    steps = _ordered((row["step"] for row in rows), key=int)
    targets = _ordered(row["target"] for row in rows)
    budgets = _ordered((row["budget"] for row in rows), key=_budget_order)
    inits = _ordered(row["init"] for row in rows)
    cer = {(r["target"], r["budget"], r["init"], r["step"]): r["cer"] for r in rows}
    last = final_points(rows)
    lines = [
        f"# {title}",
        "",
        f"CER (%) on each target's test set after {', '.join(map(str, steps))} "
        "adaptation steps; WER (%) after the last.",
        "",
        "| target | budget | init | "
        + " | ".join(f"CER@{s}" for s in steps)
        + f" | WER@{steps[-1]} |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in steps) + " | ---: |",
    ]
    for target in targets:
        for budget in budgets:
            for init in inits:
                if (target, budget, init) not in last:
                    continue
                cells = [cer.get((target, budget, init, s)) for s in steps]
                cells = ["" if c is None else f"{c:.2f}" for c in cells]
                wer = last[(target, budget, init)]["wer"]
                lines.append(
                    f"| {target} | {budget} | {init} | {' | '.join(cells)} "
                    f"| {wer:.2f} |"
                )
    if comparisons:
        lines += [
            "",
            "Final CER (last step), pairwise:",
            "",
            "| comparison | lower CER on | mean CER difference (points) |",
            "| --- | ---: | ---: |",
        ]
        for first, second in comparisons:
            pairs = [
                (last[(t, b, first)]["cer"], last[(t, b, second)]["cer"])
                for t in targets
                for b in budgets
                if (t, b, first) in last and (t, b, second) in last
            ]
            if not pairs:
                continue
            wins = sum(a < b for a, b in pairs)
            mean = sum(a - b for a, b in pairs) / len(pairs)
            lines.append(
                f"| {first} < {second} | {wins} / {len(pairs)} | {mean:+.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict], folder: str) -> List[str]:
    """PNG plots of CER against adaptation steps, one file per target.

    Each file ``cer_<target>.png`` has one panel per budget and one line
    per initialisation: the CER, or with several seeds (rows with a
    ``seed``) the mean over seeds and a shaded band from the lowest to the
    highest seed's CER.

    Arguments
    ---------
    rows : sequence of dict
        Result rows.
    folder : str
        Where the PNG files go (created).

    Returns
    -------
    list of str
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    curves = defaultdict(lambda: defaultdict(list))  # key -> step -> CERs
    for row in rows:
        curves[(row["target"], row["budget"], row["init"])][row["step"]].append(
            row["cer"]
        )
    seeds = len({row.get("seed") for row in rows})
    budgets = _ordered((row["budget"] for row in rows), key=_budget_order)
    inits = _ordered(row["init"] for row in rows)
    paths = []
    for target in _ordered(row["target"] for row in rows):
        shown = [b for b in budgets if any((target, b, i) in curves for i in inits)]
        figure, axes = plt.subplots(
            1, len(shown), figsize=(4.2 * len(shown), 3.6), sharey=True, squeeze=False
        )
        for axis, budget in zip(axes[0], shown):
            for init in inits:
                points = sorted(curves.get((target, budget, init), {}).items())
                if not points:
                    continue
                steps = [step for step, _ in points]
                (line,) = axis.plot(
                    steps,
                    [sum(cers) / len(cers) for _, cers in points],
                    marker="o",
                    label=init,
                )
                if seeds > 1:
                    axis.fill_between(
                        steps,
                        [min(cers) for _, cers in points],
                        [max(cers) for _, cers in points],
                        color=line.get_color(),
                        alpha=0.2,
                    )
            title = f"{target}, budget {budget}"
            if seeds > 1:
                title += f"\n{seeds} seeds: mean, min-max"
            axis.set_title(title)
            axis.set_xlabel("adaptation steps")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel("CER (%)")
        axes[0][-1].legend()
        figure.tight_layout()
        path = os.path.join(folder, f"cer_{target}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def init_parameters(options: dict, key: str) -> Optional[str]:
    """The parameter file a stage starts from (None: none).

    Arguments
    ---------
    options : dict
        The stage's YAML overrides.
    key : str
        The one naming the initialisation (``init_from``, ``init_checkpoint``);
        ``init_min_key`` picks the checkpoint as the stage itself does.

    Returns
    -------
    str or None
        The ``model.ckpt`` it loads.
    """
    path = options.get(key)
    if path is None:
        return None
    return find_init_checkpoint(
        path, min_key=options.get("init_min_key", "CER")
    ).paramfile


def adaptation_encoders(checkpoints: dict, folder: str) -> Dict[str, Optional[str]]:
    """The ``label_encoder.txt`` each initialisation is adapted with.

    An initialisation with a checkpoint keeps its own encoder; a random one
    (no checkpoint) takes a copy of theirs, ``<folder>/label_encoder.txt``,
    rewritten only when its labels change. So an adaptation's settings depend
    on its own initialisation alone: adding, removing or reordering the
    others leaves a finished stage finished.

    Arguments
    ---------
    checkpoints : dict
        Init name -> checkpoint path (see ``adapt.py``), None if random.
    folder : str
        Where the random initialisations' copy goes (the protocol's output).

    Returns
    -------
    dict
        Init name -> encoder file (None for a random init when every init is
        random).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If two initialisations have different character encoders.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.dataio.encoder import CTCTextEncoder
    >>> runs = tempfile.mkdtemp()
    >>> checkpoints = {"random": None}
    >>> for name in ("maml", "multitask"):
    ...     os.makedirs(f"{runs}/{name}/save/CKPT+1")
    ...     checkpoints[name] = f"{runs}/{name}/save/CKPT+1/model.ckpt"
    ...     open(checkpoints[name], "wb").close()
    ...     encoder = CTCTextEncoder()
    ...     encoder.update_from_iterable("ab", sequence_input=True)
    ...     encoder.insert_blank(index=0)
    ...     encoder.save(f"{runs}/{name}/save/label_encoder.txt")
    >>> files = adaptation_encoders(checkpoints, runs)
    >>> [os.path.relpath(files[name], runs) for name in ("maml", "random")]
    ['maml/save/label_encoder.txt', 'label_encoder.txt']
    >>> _ = encoder.add_label("c")
    >>> encoder.save(f"{runs}/multitask/save/label_encoder.txt")
    >>> adaptation_encoders(checkpoints, runs)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    speechbrain_meta.errors.SetupError: The initialisations 'maml' and ...
    """
    files = {
        name: find_init_checkpoint(path).label_encoder_file
        for name, path in checkpoints.items()
        if path is not None
    }
    mappings = {
        name: sb.dataio.encoder.CTCTextEncoder.from_saved(path).lab2ind
        for name, path in files.items()
    }
    first = next(iter(files), None)
    for name, mapping in mappings.items():
        if mapping != mappings[first]:
            raise SetupError(
                f"The initialisations '{first}' and '{name}' have different "
                f"character encoders ({files[first]}, {files[name]}): train them "
                "on the same source data so that their results are comparable."
            )
    random = [name for name, path in checkpoints.items() if path is None]
    shared = None
    if random and files:
        shared = os.path.join(folder, "label_encoder.txt")
        if not (
            os.path.isfile(shared)
            and sb.dataio.encoder.CTCTextEncoder.from_saved(shared).lab2ind
            == mappings[first]
        ):
            os.makedirs(folder, exist_ok=True)
            with open(files[first], newline="", encoding="utf-8") as source:
                with atomic_write(shared, newline="") as stream:
                    stream.write(source.read())  # a copy, byte for byte
    return {**files, **dict.fromkeys(random, shared)}

r"""The manifests of a split: one multilingual CSV, or one CSV per task.

``train_csv``, ``valid_csv`` and ``test_csv`` each take

* a path: one manifest whose task column (``task_key``, ``lang`` by default)
  says each row's task, as the recipes here write it;
* a mapping from task name to path: one manifest per task without a task
  column, as SpeechBrain's CommonVoice recipe writes them (``ID, duration,
  wav, spk_id, wrd``, one language per folder); the task column is added in
  memory, the files are never changed;
* a list whose items are paths (each with its task column) or such mappings.

:func:`task_manifests` reads that value into :class:`TaskManifest` entries;
:func:`load_task_manifests` loads and merges the entries of a split, adds
the task column and normalises the transcripts as the recipes do
(:func:`speechbrain_meta.text.normalize_text` in the row's task language,
unless ``keep_text_verbatim``). IDs must be unique within a split.

Example
-------
>>> folder = getfixture("tmp_path")
>>> for lang, text in (("de", "Guten Tag!"), ("fr", "L’été déjà ?")):
...     _ = (folder / f"{lang}.csv").write_text(
...         f"ID,duration,wav,spk_id,wrd\n{lang}1,1.0,{lang}1.wav,s1,{text}\n"
...     )
>>> manifests = task_manifests(
...     {"de": str(folder / "de.csv"), "fr": str(folder / "fr.csv")}, "train_csv"
... )
>>> [entry.task for entry in manifests]
['de', 'fr']
>>> data = load_task_manifests(manifests, task_key="lang", option="train_csv")
>>> [(data[i]["lang"], data[i]["wrd"]) for i in data]
[('de', 'guten tag'), ('fr', "l'été déjà")]
"""

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from speechbrain_meta.errors import SetupError
from speechbrain_meta.manifest_check import load_manifest_data
from speechbrain_meta.text import normalize_text

__all__ = [
    "TaskManifest",
    "load_task_manifests",
    "manifests_record",
    "task_manifests",
]

logger = logging.getLogger(__name__)

_LISTED = 5  # rows named in a message


@dataclass(frozen=True)
class TaskManifest:
    """One CSV of a split and where its rows' task comes from.

    Arguments
    ---------
    path : str
        The CSV manifest.
    task : str or None
        The task of every row (the file has no task column, or one with only
        this value); None: each row's task column says it.
    """

    path: str
    task: Optional[str] = None


def _entries(item, option: str) -> list:
    if isinstance(item, (str, os.PathLike)):
        return [TaskManifest(os.fspath(item))]
    if isinstance(item, Mapping):
        if not item:
            raise SetupError(f"{option} has an empty mapping: give task: path pairs.")
        entries = []
        for task, path in item.items():
            if not isinstance(path, (str, os.PathLike)) or not str(task).strip():
                raise SetupError(
                    f"{option}: {task!r}: {path!r} is not a task name and a CSV "
                    "path (e.g. fr: /data/cv/fr/train.csv)."
                )
            entries.append(TaskManifest(os.fspath(path), str(task)))
        return entries
    raise SetupError(
        f"{option} must be a CSV path, a mapping from task name to CSV path, or "
        f"a list of them; got {item!r}."
    )


def task_manifests(value, option: str) -> list:
    """The manifests that a ``*_csv`` key names.

    Arguments
    ---------
    value : str, mapping or list
        The key's value: a path, a mapping from task name to path, or a list
        of paths and such mappings.
    option : str
        The key's name, for messages (e.g. ``"train_csv"``).

    Returns
    -------
    list of TaskManifest
        In the order given.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the value is none of these, or an empty mapping or list.

    Example
    -------
    >>> task_manifests(["all.csv", {"cs": "cs/train.csv"}], "train_csv")
    [TaskManifest(path='all.csv', task=None), TaskManifest(path='cs/train.csv', task='cs')]
    """  # noqa: E501
    if isinstance(value, (list, tuple)):
        if not value:
            raise SetupError(f"{option} is an empty list: give at least one CSV.")
        return [entry for item in value for entry in _entries(item, option)]
    return _entries(value, option)


def manifests_record(value: Union[str, Sequence, Mapping]) -> Union[str, list]:
    """What a ``*_csv`` value names, with absolute paths, for run records.

    A single path gives its absolute path (as records written before
    mappings existed have it); anything else a list of ``[task, path]``
    pairs (task None where a column says it).

    Example
    -------
    >>> manifests_record({"cs": "/data/cs.csv"})
    [['cs', '/data/cs.csv']]
    """
    entries = task_manifests(value, "manifests")
    if len(entries) == 1 and entries[0].task is None:
        return os.path.abspath(entries[0].path)
    return [[entry.task, os.path.abspath(entry.path)] for entry in entries]


def _listed(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_LISTED])
    return shown + (f" and {len(ids) - _LISTED} more" if len(ids) > _LISTED else "")


def _set_task(rows: dict, entry: TaskManifest, task_key: str, option: str) -> None:
    if entry.task is None:
        return
    values = {row[task_key] for row in rows.values() if row.get(task_key)}
    other = sorted(values - {entry.task})
    if other:
        raise SetupError(
            f"{option}: {entry.path} is given as task '{entry.task}' but its "
            f"'{task_key}' column also has {other}: list the file as a plain "
            "path (its column gives the tasks) or give each task its own file."
        )
    for row in rows.values():
        row[task_key] = entry.task


def load_task_manifests(
    manifests: Sequence[TaskManifest],
    *,
    task_key: str,
    option: str,
    replacements: Optional[Mapping[str, object]] = None,
    skip_ids: Collection[str] = (),
    keep_text_verbatim: bool = False,
    skip_bad_rows: bool = False,
) -> dict:
    """Load and merge the manifests of a split, the task of every row set.

    Arguments
    ---------
    manifests : sequence of TaskManifest
        The split's CSVs (see :func:`task_manifests`); each was checked
        first (:func:`speechbrain_meta.manifest_check.check_manifests`, the
        files given a task without a task column).
    task_key : str
        The task column, added from the mapping where a file lacks it.
    option : str
        The key they come from, for messages.
    replacements : mapping of str to object, optional
        The values of the ``$variables`` in the CSVs.
    skip_ids : collection of str
        IDs of rows to leave out (the bad rows found by the check).
    keep_text_verbatim : bool
        Keep the transcripts as written; otherwise each is normalised in
        its task's language (NFC, casefold, punctuation removed, the
        language's letters and word-internal apostrophes kept) and the
        number changed is logged.
    skip_bad_rows : bool
        Leave out (and count) rows whose transcript is empty once
        normalised, instead of raising.

    Returns
    -------
    dict of str to dict
        The rows of all the files by ID, as ``load_data_csv`` returns them.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If an ID is in two of the files, a file given a task has other
        values in its task column, or (unless ``skip_bad_rows``) a
        transcript is only punctuation.
    """
    data, origin = {}, {}
    for entry in manifests:
        rows = load_manifest_data(
            entry.path, replacements=replacements, skip_ids=skip_ids
        )
        _set_task(rows, entry, task_key, option)
        shared = [utt_id for utt_id in rows if utt_id in data]
        if shared:
            raise SetupError(
                f"{option}: IDs {_listed(shared)} are in both "
                f"{origin[shared[0]]} and {entry.path}: the IDs of a split must "
                "be unique (prefix them with the task in one of the files)."
            )
        data.update(rows)
        origin.update(dict.fromkeys(rows, entry.path))
    if keep_text_verbatim:
        return data
    changed, emptied = 0, []
    for utt_id, row in data.items():
        text = normalize_text(row["wrd"], str(row[task_key]))
        changed += text != row["wrd"]
        row["wrd"] = text
        if not text:
            emptied.append(utt_id)
    if changed:
        logger.info(
            f"{option}: {changed} of {len(data)} transcripts normalised (NFC, "
            "casefold, punctuation removed; --keep_text_verbatim True keeps "
            "them as written)."
        )
    if emptied and not skip_bad_rows:
        raise SetupError(
            f"{option}: the transcripts of {_listed(emptied)} are empty once "
            "punctuation is removed: fix them, or set --skip_bad_rows True to "
            "leave them out."
        )
    if emptied:
        logger.warning(
            f"{option}: leaving out {len(emptied)} rows whose transcript is "
            f"only punctuation (skip_bad_rows: True): {_listed(emptied)}."
        )
    return {utt_id: row for utt_id, row in data.items() if row["wrd"]}

"""SpeechBrain CSV manifests and the bookkeeping shared by the preparation recipes.

A manifest has the columns ``ID,duration,wav,spk_id,lang,wrd``; ``wav`` starts
with ``$data_root`` so that the corpus can be moved (SpeechBrain's
``load_data_csv`` replaces it with ``replacements={"data_root": data_folder}``).
Every file is written atomically (temporary file, then rename).

Which folders a recipe may write into
-------------------------------------
A preparation writes into its ``data_folder`` (audio, and the default download
cache ``<data_folder>/downloads``) and its ``save_folder`` (manifests and
``corpus.json``), and into nothing else but an explicitly given download
folder. :func:`claim_folders` lets it write into a folder only if

* the folder does not exist or is empty (a download cache of the recipe that
  is already there, such as ``<data_folder>/downloads`` filled by hand, does
  not count), or
* the folder holds a ``corpus.json`` record of the same recipe (its
  ``"recipe"`` field), finished or not. A record of an earlier version, which
  has no ``"recipe"`` field, counts as the recipe's own when its ``options``
  have exactly the option keys that the recipe records.

Any other folder (a user's own manifests, an unrelated file, a folder of the
other recipe) raises :class:`FolderNotOwnedError` before anything is written
anywhere. Within its own folders a recipe rewrites only its own files (the
manifests, ``corpus.json``, ``wav/<lang>/<ID>.wav``), deterministically.

Records
-------
Before writing anything else, :func:`claim_folders` writes into every folder a
``corpus.json`` that says the build is in progress (``"complete": false``, the
recipe and its options), so that an interrupted build stays recognisable as
the recipe's own; :func:`write_record` writes the complete record (options and
sizes) last, and :func:`is_prepared` accepts only a complete record with equal
options.

Example
-------
>>> import os, tempfile
>>> folder = os.path.join(tempfile.mkdtemp(), "corpus")  # not there yet: free
>>> options = {"seed": 1}
>>> folders = claim_folders([folder], "demo", options)
>>> is_prepared(folder, ["train"], options, "demo")  # in progress
False
>>> row = {"ID": "de_m1_0", "duration": 1.5, "wav": "$data_root/wav/de/de_m1_0.wav",
...        "spk_id": "de_m1", "lang": "de", "wrd": "guten tag"}
>>> write_manifest(f"{folder}/train.csv", [row])
>>> print(open(f"{folder}/train.csv").read().strip())
ID,duration,wav,spk_id,lang,wrd
de_m1_0,1.5,$data_root/wav/de/de_m1_0.wav,de_m1,de,guten tag
>>> write_record(folders, "demo", options, {"train": [row]})
>>> is_prepared(folder, ["train"], options, "demo")
True
>>> is_prepared(folder, ["train"], {"seed": 2}, "demo")
False
>>> folders = claim_folders([folder], "demo", {"seed": 2})  # its own: rebuilt
>>> try:
...     claim_folders([folder], "other", options)
... except FolderNotOwnedError as error:
...     print(error.files, error.owner)
['train.csv', 'corpus.json'] demo
"""

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import soundfile

from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError

__all__ = [
    "COMMAND_LINE_CHOICE",
    "DEFAULT_CHOICE",
    "MANIFEST_FIELDS",
    "RECORD_NAME",
    "FolderNotOwnedError",
    "atomic_write_text",
    "check_folder",
    "claim_folders",
    "is_prepared",
    "manifest_paths",
    "wav_duration",
    "write_manifest",
    "write_record",
]

MANIFEST_FIELDS = ("ID", "duration", "wav", "spk_id", "lang", "wrd")
RECORD_NAME = "corpus.json"
# The options that a FolderNotOwnedError tells the user to change: those of
# train.py, and those of the recipes' command line.
DEFAULT_CHOICE = "--data_folder"
COMMAND_LINE_CHOICE = "--data_folder/--save_folder"


class FolderNotOwnedError(SetupError):
    """A preparation would write into a folder that holds files it did not make.

    Arguments
    ---------
    folder : str
        The folder.
    recipe : str
        The recipe that may not write into it, e.g. ``"embedded_corpus"``.
    files : list of str
        The names of the folder's entries (folders end with ``/``), the
        manifests first; empty when ``folder`` is not a folder.
    owner : str, optional
        The recipe named in the folder's ``corpus.json``, if any.
    choice : str
        The option to change, named in the message (``--data_folder``).

    Example
    -------
    >>> error = FolderNotOwnedError("corpora/cv", "embedded_corpus", ["train.csv"])
    >>> print(error)  # doctest: +NORMALIZE_WHITESPACE
    Folder 'corpora/cv' holds files not made by the embedded_corpus recipe
    (train.csv): pass --skip_prep True to train on the manifests it holds, or
    choose another --data_folder.
    """

    def __init__(
        self,
        folder: str,
        recipe: str,
        files: list[str],
        owner: Optional[str] = None,
        choice: str = DEFAULT_CHOICE,
    ) -> None:
        self.folder = str(folder)
        self.recipe = recipe
        self.files = list(files)
        self.owner = owner
        self.choice = choice
        super().__init__(self._message())

    def __reduce__(self):
        return (
            type(self),
            (self.folder, self.recipe, self.files, self.owner, self.choice),
        )

    def _message(self) -> str:
        advice = (
            "pass --skip_prep True to train on the manifests it holds, or choose "
            f"another {self.choice}."
        )
        if not self.files:
            return (
                f"'{self.folder}' is not a folder, so the {self.recipe} recipe "
                f"cannot write into it: {advice}"
            )
        shown = ", ".join(self.files[:3])
        if len(self.files) > 3:
            shown += f" and {len(self.files) - 3} more"
        if self.owner and self.owner != self.recipe:
            shown += f"; its {RECORD_NAME} is of the {self.owner} recipe"
        return (
            f"Folder '{self.folder}' holds files not made by the {self.recipe} "
            f"recipe ({shown}): {advice}"
        )

    def with_choice(self, choice: str) -> "FolderNotOwnedError":
        """The same error, telling the user to change ``choice`` instead.

        Arguments
        ---------
        choice : str
            The option(s) to name, e.g. :data:`COMMAND_LINE_CHOICE`.

        Returns
        -------
        FolderNotOwnedError
            A new error with the new message.
        """
        return type(self)(self.folder, self.recipe, self.files, self.owner, choice)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Arguments
    ---------
    path : str
        Destination file; its folder is created if needed.
    text : str
        Content, written as UTF-8.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(str(path)) as stream:
        stream.write(text)


def manifest_paths(save_folder: str, splits: list[str]) -> dict[str, str]:
    """Return ``{split: "<save_folder>/<split>.csv"}``.

    Arguments
    ---------
    save_folder : str
        Folder of the manifests.
    splits : list of str
        Split names.

    Returns
    -------
    dict
        Manifest path of each split.
    """
    return {split: os.path.join(save_folder, f"{split}.csv") for split in splits}


def wav_duration(path: str) -> float:
    """Return the duration in seconds of an audio file, read from its header.

    Arguments
    ---------
    path : str
        Audio file.

    Returns
    -------
    float
        Number of frames divided by the sample rate, rounded to 0.1 ms.
    """
    info = soundfile.info(path)
    return round(info.frames / info.samplerate, 4)


def write_manifest(path: str, rows: list[dict]) -> None:
    """Write a SpeechBrain CSV manifest atomically.

    Arguments
    ---------
    path : str
        The ``.csv`` file.
    rows : list of dict
        One dict per utterance with the keys of ``MANIFEST_FIELDS``.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _statistics(rows: list[dict]) -> dict:
    stats = {}
    for row in rows:
        lang = stats.setdefault(row["lang"], {"utterances": 0, "hours": 0.0})
        lang["utterances"] += 1
        lang["hours"] += float(row["duration"]) / 3600
    for lang in stats.values():
        lang["hours"] = round(lang["hours"], 4)
    return stats


def _read_record(folder: str) -> Optional[dict]:
    """The ``corpus.json`` of ``folder`` as a dict, or None if none can be read."""
    try:
        text = (Path(folder) / RECORD_NAME).read_text(encoding="utf-8")
        record = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _owned(record: Optional[dict], recipe: str, option_keys: Iterable[str]) -> bool:
    """Whether a record was written by ``recipe`` (or by its earlier version)."""
    if record is None:
        return False
    if "recipe" in record:
        return record["recipe"] == recipe
    options = record.get("options")  # an earlier version: known by its options
    return isinstance(options, dict) and set(options) == set(option_keys)


def _entry_name(entry: os.DirEntry) -> str:
    return f"{entry.name}/" if entry.is_dir() else entry.name


def _entry_order(name: str) -> tuple:
    rank = 0 if name.endswith(".csv") else 1 if name == RECORD_NAME else 2
    return rank, name


def check_folder(
    folder: str,
    recipe: str,
    option_keys: Iterable[str],
    cache: Optional[str] = None,
) -> None:
    """Raise unless ``recipe`` may write into ``folder``; write nothing.

    Arguments
    ---------
    folder : str
        A folder the recipe would write into.
    recipe : str
        The recipe's name, as recorded in ``corpus.json``.
    option_keys : iterable of str
        The keys of the options the recipe records: a record without a
        ``"recipe"`` field (an earlier version) is the recipe's own when its
        options have exactly these keys.
    cache : str, optional
        The recipe's download cache: when it is an entry of ``folder``, it
        does not make the folder non-empty.

    Raises
    ------
    FolderNotOwnedError
        When ``folder`` is not a folder, or holds files but no record of
        ``recipe``.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> check_folder(folder, "demo", ["seed"])  # empty
    >>> _ = open(f"{folder}/notes.txt", "w").write("mine")
    >>> check_folder(folder, "demo", ["seed"])
    Traceback (most recent call last):
      ...
    recipes.manifest.FolderNotOwnedError: Folder ... (notes.txt): pass ...
    """
    path = Path(folder)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise FolderNotOwnedError(folder, recipe, [])
    record = _read_record(folder)
    if _owned(record, recipe, option_keys):
        return
    cache_path = os.path.realpath(cache) if cache else None
    with os.scandir(path) as entries:
        names = [
            _entry_name(entry)
            for entry in entries
            if not (
                cache_path
                and entry.is_dir()
                and os.path.realpath(entry.path) == cache_path
            )
        ]
    if names:
        owner = record.get("recipe") if record is not None else None
        raise FolderNotOwnedError(
            folder,
            recipe,
            sorted(names, key=_entry_order),
            owner if isinstance(owner, str) else None,
        )


def claim_folders(
    folders: Sequence[str],
    recipe: str,
    options: dict,
    cache: Optional[str] = None,
    **extra,
) -> list[str]:
    """Claim the folders of a preparation: check them all, then mark each.

    Every folder is checked with :func:`check_folder` first; only when all of
    them may be written into, each gets a ``corpus.json`` that marks the build
    as in progress (``"recipe"``, ``"complete": false``, ``"options"`` and
    ``extra``). Call it before writing anything else, downloads included.

    Arguments
    ---------
    folders : sequence of str
        The folders the preparation writes into, the one of the manifests
        last (e.g. ``[data_folder, save_folder]``); the same folder named
        twice is claimed once.
    recipe : str
        The recipe's name, e.g. ``"embedded_corpus"``.
    options : dict
        The options of the preparation (see :func:`write_record`).
    cache : str, optional
        The download cache (see :func:`check_folder`).
    **extra
        Further JSON-serialisable fields of the in-progress record.

    Returns
    -------
    list of str
        The claimed folders, in order and without repetitions: pass them to
        :func:`write_record`.

    Raises
    ------
    FolderNotOwnedError
        When a folder is not the recipe's; then nothing is written.
    """
    claimed = {}
    for folder in folders:
        claimed.setdefault(os.path.realpath(folder), str(folder))
    claimed = list(claimed.values())
    for folder in claimed:
        check_folder(folder, recipe, list(options), cache)
    record = {"recipe": recipe, "complete": False, "options": options, **extra}
    for folder in claimed:
        _write_json(folder, record)
    return claimed


def _write_json(folder: str, record: dict) -> None:
    atomic_write_text(
        os.path.join(folder, RECORD_NAME),
        json.dumps(record, indent=2, ensure_ascii=False) + "\n",
    )


def write_record(
    folders: Union[str, Sequence[str]],
    recipe: str,
    options: dict,
    splits: dict,
    **extra,
) -> None:
    """Write ``corpus.json``: the options of a finished preparation and its sizes.

    Arguments
    ---------
    folders : str or sequence of str
        The folders claimed with :func:`claim_folders` (or just the manifest
        folder); the record is written into each, in order.
    recipe : str
        The recipe's name, recorded as ``"recipe"``.
    options : dict
        Everything that determines the content of the manifests; a later
        preparation with the same options is skipped.
    splits : dict
        ``{split: rows}`` as written to the manifests.
    **extra
        Further JSON-serialisable fields to record (e.g. the languages).
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    record = {
        "recipe": recipe,
        "complete": True,
        "options": options,
        **extra,
        "splits": {split: _statistics(rows) for split, rows in splits.items()},
    }
    for folder in folders:
        _write_json(folder, record)


def is_prepared(
    save_folder: str,
    splits: list[str],
    options: dict,
    recipe: Optional[str] = None,
) -> bool:
    """Whether every manifest exists and ``corpus.json`` records a finished build.

    Arguments
    ---------
    save_folder : str
        Folder of the manifests.
    splits : list of str
        Split names whose manifests must exist.
    options : dict
        The options of the preparation about to run.
    recipe : str, optional
        The recipe about to run: a record of another recipe is not accepted
        (a record without ``"recipe"``, of an earlier version, is).

    Returns
    -------
    bool
        True when the record is complete, of ``recipe``, with the same options,
        and the manifests exist: the preparation can be skipped.
    """
    record = _read_record(save_folder)
    paths = manifest_paths(save_folder, splits).values()
    if record is None or not all(os.path.isfile(p) for p in paths):
        return False
    if record.get("complete", True) is not True:  # no field: an earlier version
        return False
    if recipe is not None and record.get("recipe", recipe) != recipe:
        return False
    return record.get("options") == json.loads(json.dumps(options))

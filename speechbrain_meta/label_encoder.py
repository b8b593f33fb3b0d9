"""A run's character encoder and a record of what it was built from.

SpeechBrain's ``CTCTextEncoder.load_or_create`` reuses whatever
``label_encoder.txt`` it finds. A run that failed before its first checkpoint
leaves one behind, and a rerun with other source languages would train their
letters as ``<unk>``. :func:`check_encoder_sources` prevents that with a
record beside the file (``label_encoder.json``: the sources it was built from,
or the initialisation it was copied from):

* same sources as this run, or copied from a warm start: reused;
* other sources (or no record) and no checkpoint in the run's save folder:
  the file is left over from a failed run, and is rebuilt;
* other sources and checkpoints trained with it: :class:`SetupError`, since
  resuming would mix two label sets;
* no record (written before records existed) but checkpoints: reused, and
  :func:`missing_labels` then refuses it if it lacks a character of the
  sources.

Example
-------
>>> import tempfile
>>> from speechbrain.dataio.encoder import CTCTextEncoder
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "label_encoder.txt")
>>> encoder = CTCTextEncoder()
>>> encoder.update_from_iterable(["ab"], sequence_input=True)
>>> encoder.save(path)
>>> write_encoder_record(path, built_from={"tasks": ["de"]})
>>> check_encoder_sources(path, {"tasks": ["de"]}, has_checkpoints=True)
>>> os.path.exists(path)
True
>>> check_encoder_sources(path, {"tasks": ["ru"]}, has_checkpoints=False)
>>> os.path.exists(path)  # left over from a failed run: rebuilt by the caller
False
"""

import json
import logging
import os
from typing import Iterable, List, Optional, Sequence

from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError

__all__ = [
    "check_encoder_sources",
    "encoder_record_path",
    "missing_labels",
    "read_encoder_record",
    "write_encoder_record",
]

logger = logging.getLogger(__name__)


def encoder_record_path(encoder_file: str) -> str:
    """The record beside an encoder file (``label_encoder.txt`` -> ``.json``)."""
    return os.path.splitext(encoder_file)[0] + ".json"


def read_encoder_record(encoder_file: str) -> Optional[dict]:
    """The record of ``encoder_file``, or None if it has none (or a broken one)."""
    try:
        with open(encoder_record_path(encoder_file), encoding="utf-8") as stream:
            record = json.load(stream)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_encoder_record(
    encoder_file: str,
    built_from: Optional[dict] = None,
    copied_from: Optional[str] = None,
    added_labels: Sequence[str] = (),
) -> None:
    """Record what ``encoder_file`` was built from (or copied from).

    Arguments
    ---------
    encoder_file : str
        The encoder's ``label_encoder.txt``.
    built_from : dict, optional
        JSON-serialisable description of the data it was built from (e.g.
        the training manifest, task key and source tasks).
    copied_from : str, optional
        The encoder file it is a copy of (warm start).
    added_labels : sequence of str
        Labels added to the copy for letters of the data that the original
        lacked.
    """
    record = {"built_from": built_from, "copied_from": copied_from}
    if added_labels:
        record["added_labels"] = list(added_labels)
    path = encoder_record_path(encoder_file)
    with atomic_write(path) as stream:
        json.dump(record, stream, indent=2, ensure_ascii=False, sort_keys=True)


def _describe(record: Optional[dict]) -> str:
    if record is None:
        return "unrecorded sources"
    return json.dumps(record.get("built_from"), ensure_ascii=False, sort_keys=True)


def check_encoder_sources(
    encoder_file: str, built_from: dict, has_checkpoints: bool
) -> None:
    """Make sure an existing encoder file fits a run built from ``built_from``.

    Arguments
    ---------
    encoder_file : str
        The run's ``label_encoder.txt`` (it may not exist yet).
    built_from : dict
        What this run would build it from (compared with the record).
    has_checkpoints : bool
        Whether the run's save folder holds checkpoints trained with it.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the file was built from other sources and checkpoints use it.
    """
    if not os.path.isfile(encoder_file):
        return
    record = read_encoder_record(encoder_file)
    if record is not None and (
        record.get("copied_from") or record.get("built_from") == built_from
    ):
        return
    if not has_checkpoints:
        logger.warning(
            f"{encoder_file} was left by an earlier run without checkpoints, "
            f"built from {_describe(record)}; rebuilding it from this run's "
            f"sources {_describe({'built_from': built_from})}."
        )
        os.remove(encoder_file)
        if record is not None:
            os.remove(encoder_record_path(encoder_file))
        return
    if record is None:
        return
    raise SetupError(
        f"{encoder_file} was built from {_describe(record)} and the checkpoints "
        "beside it were trained with it, but this run's sources are "
        f"{_describe({'built_from': built_from})}: pass another --output_folder, "
        "or the same sources as before."
    )


def missing_labels(encoder, texts: Iterable[str]) -> List[str]:
    """The characters of ``texts`` that ``encoder`` has no label for.

    Arguments
    ---------
    encoder : speechbrain.dataio.encoder.CategoricalEncoder
        A character encoder.
    texts : iterable of str
        Transcripts.

    Returns
    -------
    list of str
        The unknown characters, sorted.

    Example
    -------
    >>> from speechbrain.dataio.encoder import CTCTextEncoder
    >>> encoder = CTCTextEncoder()
    >>> encoder.update_from_iterable(["ab"], sequence_input=True)
    >>> missing_labels(encoder, ["abc", "ба"])
    ['c', 'а', 'б']
    """
    characters = {character for text in texts for character in text}
    return sorted(characters - set(encoder.lab2ind))

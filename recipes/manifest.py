"""SpeechBrain CSV manifests and the bookkeeping shared by the preparation recipes.

A manifest has the columns ``ID,duration,wav,spk_id,lang,wrd``; ``wav`` starts
with ``$data_root`` so that the corpus can be moved (SpeechBrain's
``load_data_csv`` replaces it with ``replacements={"data_root": data_folder}``).
Every file is written atomically (temporary file, then rename), and a
preparation records its options in ``corpus.json`` last, so that an
interrupted preparation is never mistaken for a finished one.

Example
-------
>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> row = {"ID": "de_m1_0", "duration": 1.5, "wav": "$data_root/wav/de/de_m1_0.wav",
...        "spk_id": "de_m1", "lang": "de", "wrd": "guten tag"}
>>> write_manifest(f"{folder}/train.csv", [row])
>>> print(open(f"{folder}/train.csv").read().strip())
ID,duration,wav,spk_id,lang,wrd
de_m1_0,1.5,$data_root/wav/de/de_m1_0.wav,de_m1,de,guten tag
>>> options = {"seed": 1}
>>> is_prepared(folder, ["train"], options)
False
>>> write_record(folder, options, {"train": [row]})
>>> is_prepared(folder, ["train"], options), is_prepared(folder, ["train"], {"seed": 2})
(True, False)
"""

import csv
import io
import json
import os
from pathlib import Path

import soundfile

__all__ = [
    "MANIFEST_FIELDS",
    "RECORD_NAME",
    "atomic_write_text",
    "is_prepared",
    "manifest_paths",
    "wav_duration",
    "write_manifest",
    "write_record",
]

MANIFEST_FIELDS = ("ID", "duration", "wav", "spk_id", "lang", "wrd")
RECORD_NAME = "corpus.json"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Arguments
    ---------
    path : str
        Destination file; its folder is created if needed.
    text : str
        Content, written as UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def write_record(save_folder: str, options: dict, splits: dict, **extra) -> None:
    """Write ``corpus.json``: the options of a finished preparation and its sizes.

    Arguments
    ---------
    save_folder : str
        Folder of the manifests.
    options : dict
        Everything that determines the content of the manifests; a later
        preparation with the same options is skipped.
    splits : dict
        ``{split: rows}`` as written to the manifests.
    **extra
        Further JSON-serialisable fields to record (e.g. the languages).
    """
    record = {
        "options": options,
        **extra,
        "splits": {split: _statistics(rows) for split, rows in splits.items()},
    }
    atomic_write_text(
        os.path.join(save_folder, RECORD_NAME),
        json.dumps(record, indent=2, ensure_ascii=False) + "\n",
    )


def is_prepared(save_folder: str, splits: list[str], options: dict) -> bool:
    """Whether every manifest exists and ``corpus.json`` records the same options.

    Arguments
    ---------
    save_folder : str
        Folder of the manifests.
    splits : list of str
        Split names whose manifests must exist.
    options : dict
        The options of the preparation about to run.

    Returns
    -------
    bool
        True when the preparation can be skipped.
    """
    record = Path(save_folder) / RECORD_NAME
    paths = manifest_paths(save_folder, splits).values()
    if not record.is_file() or not all(os.path.isfile(p) for p in paths):
        return False
    try:
        recorded = json.loads(record.read_text(encoding="utf-8")).get("options")
    except (json.JSONDecodeError, AttributeError):
        return False
    return recorded == json.loads(json.dumps(options))

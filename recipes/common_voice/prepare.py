"""Prepares Mozilla Common Voice releases: SpeechBrain manifests of several locales.

Input: a release folder as extracted from the downloads, ``cv-corpus-<version>``
(every locale's archive extracts into the same one), holding
``<locale>/{train,dev,test}.tsv`` (tab separated, with a header; fields with a
double quote are quoted as in CSV), ``<locale>/clips/*.mp3`` and, in recent
releases, ``<locale>/clip_durations.tsv`` (``clip``, ``duration[ms]``). Only the
columns ``client_id``, ``path`` and ``sentence`` are used, so every release
since Common Voice 1 is read. The release is never written into.

Output, in ``save_folder``: ``{train,dev,test}.csv`` with the columns
``ID,duration,wav,spk_id,lang,wrd`` and ``corpus.json``:

* the split is the release's own (``train.tsv``, ``dev.tsv``, ``test.tsv``:
  disjoint speakers and sentences); with ``use_validated=True`` the train
  manifest is built from ``validated.tsv`` instead (many more clips for some
  locales), without the clips whose speaker or sentence is in dev or test;
* ``ID`` is ``<locale>_<clip number>`` (``fr_19123456`` for
  ``common_voice_fr_19123456.mp3``), ``lang`` the locale (``sv-SE``),
  ``spk_id`` ``<locale>_<12 hex digits of the SHA-256 of client_id>`` (more
  digits if two speakers shared them), ``wrd`` the sentence normalised by
  :func:`speechbrain_meta.text.normalize_text` in the locale's language (the
  apostrophe kept inside words in French, English, Catalan...);
* ``wav`` is the absolute path of the mp3 in the release (soundfile reads it;
  ``train.py`` resamples 48 or 32 kHz to 16 kHz when loading), or, with
  ``convert_to_wav=True``, ``$data_root/wav/<locale>/<ID>.wav``: a 16 kHz mono
  16-bit wav written into the save folder (``train.py --data_folder
  <save_folder>`` replaces ``$data_root``);
* ``duration`` comes from ``clip_durations.tsv`` when the release has it, else
  from the mp3 headers (read in parallel), or from the converted wav.

Clips are skipped, and counted per locale, split and reason in the log and in
``corpus.json`` (``"skipped"``): sentences with digits or spoken symbols or
empty once normalised, missing or unreadable (corrupt) mp3 files, zero or more
than ``max_duration`` seconds, and the clips beyond the caps
(``max_hours_per_speaker``, then ``max_hours_per_language``, applied to the
``capped_splits``, train by default, in an order drawn with ``seed``; dev and
test are kept whole so that the benchmark stays the release's). See
:mod:`recipes.release`.

``save_folder`` must be missing, empty, or a folder of this recipe (see
:mod:`recipes.manifest`); a rerun with the same options returns at once, one
with other options rebuilds it.

Command line (from the repository root)::

    python -m recipes.common_voice.prepare --data_folder cv-corpus-17.0-2024-03-15 \
        --save_folder data/cv --locales de fr it --target_locales it

Example
-------
>>> from speechbrain.utils.distributed import run_on_main
>>> manifests = run_on_main(
...     prepare_common_voice,
...     kwargs={"data_folder": "cv-corpus-17.0-2024-03-15",
...             "save_folder": "data/cv", "locales": ["de", "fr"]},
... )  # doctest: +SKIP
"""

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from recipes.manifest import check_folder, is_prepared, manifest_paths
from recipes.preparation import run_preparation
from recipes.release import (
    SPLITS,
    Clip,
    SkipCounts,
    build_manifests,
    check_save_folder,
    release_parser,
    short_ids,
)
from speechbrain_meta.errors import SetupError
from speechbrain_meta.text import normalize_text

__all__ = [
    "CLIP_DURATIONS",
    "NEEDED_COLUMNS",
    "RECIPE",
    "prepare_common_voice",
    "read_clip_durations",
    "read_locale",
    "read_tsv",
    "release_locales",
]

logger = logging.getLogger(__name__)

RECIPE = "common_voice"
NEEDED_COLUMNS = ("client_id", "path", "sentence")
CLIP_DURATIONS = "clip_durations.tsv"
_TSVS = ("train.tsv", "dev.tsv", "test.tsv", "validated.tsv")


def _unquote(field: str) -> str:
    """A field as written: quoted (CSV style, ``""`` for ``"``) or not."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def read_tsv(path: str) -> tuple:
    r"""Read a Common Voice TSV: a header, then one clip per line.

    Each line is split at its tabs, so that a stray double quote (some
    releases have unmatched ones) never swallows the next lines; a field that
    starts and ends with ``"`` is unquoted as in CSV.

    Arguments
    ---------
    path : str
        The ``.tsv`` file.

    Returns
    -------
    tuple
        ``(columns, rows)``: the header's names and one dict per line (missing
        trailing fields are empty).

    Example
    -------
    >>> path = getfixture("tmp_path") / "train.tsv"
    >>> _ = path.write_text('path\tsentence\na.mp3\t"Say ""hi"" now."\n')
    >>> read_tsv(str(path))
    (['path', 'sentence'], [{'path': 'a.mp3', 'sentence': 'Say "hi" now.'}])
    """
    with open(path, encoding="utf-8") as stream:
        header = stream.readline().rstrip("\r\n")
        columns = [_unquote(name.strip()) for name in header.split("\t")]
        rows = []
        for line in stream:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = [_unquote(field) for field in line.split("\t")]
            fields += [""] * (len(columns) - len(fields))
            rows.append(dict(zip(columns, fields)))
    return columns, rows


def release_locales(data_folder: str) -> list:
    """Return the locales of a release: its folders that hold a split's TSV.

    Arguments
    ---------
    data_folder : str
        The release (``cv-corpus-<version>``).

    Returns
    -------
    list of str
        Sorted locale codes.
    """
    folder = Path(data_folder)
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and any((entry / name).is_file() for name in _TSVS)
    )


def read_clip_durations(locale_folder: str) -> Optional[dict]:
    """Return ``{clip file name: seconds}`` from ``clip_durations.tsv``, if any.

    Arguments
    ---------
    locale_folder : str
        ``<release>/<locale>``.

    Returns
    -------
    dict or None
        None when the release has no usable ``clip_durations.tsv`` (the
        durations are then read from the audio headers).
    """
    path = os.path.join(locale_folder, CLIP_DURATIONS)
    if not os.path.isfile(path):
        return None
    columns, rows = read_tsv(path)
    unit = next((c for c in columns if c.startswith("duration")), None)
    if "clip" not in columns or unit is None:
        logger.warning(
            "%s has no clip and duration columns: durations are read from the "
            "audio headers.",
            path,
        )
        return None
    scale = 1000.0 if "[ms]" in unit else 1.0
    durations = {}
    for row in rows:
        try:
            durations[row["clip"]] = float(row[unit]) / scale
        except ValueError:
            continue  # read from the header instead
    return durations


def _read_checked(path: str) -> list:
    if not os.path.isfile(path):
        raise SetupError(
            f"{path} does not exist: is {os.path.dirname(path)} a complete Common "
            "Voice locale folder (train.tsv, dev.tsv, test.tsv, clips/)?"
        )
    columns, rows = read_tsv(path)
    for column in NEEDED_COLUMNS:
        if column not in columns:
            raise SetupError(
                f"{path} has no column '{column}' (its columns: "
                f"{', '.join(columns)}): a Common Voice TSV needs "
                f"{', '.join(NEEDED_COLUMNS)}."
            )
    return rows


def _clip_id(locale: str, path: str) -> str:
    stem = Path(path).stem
    return f"{locale}_{stem.removeprefix(f'common_voice_{locale}_')}"


def read_locale(
    data_folder: str, locale: str, skips: SkipCounts, use_validated: bool = False
) -> list:
    """Return the clips of one locale of a release, in split and file order.

    Arguments
    ---------
    data_folder : str
        The release.
    locale : str
        The locale (its folder's name).
    skips : SkipCounts
        Gets the clips of ``validated.tsv`` left out (``use_validated``).
    use_validated : bool
        Train clips from ``validated.tsv`` (minus dev/test speakers,
        sentences and clips) instead of ``train.tsv``.

    Returns
    -------
    list of Clip
        The clips of train, dev and test.

    Raises
    ------
    SetupError
        If a TSV is missing or lacks a needed column.
    """
    folder = os.path.join(data_folder, locale)
    train_name = "validated.tsv" if use_validated else "train.tsv"
    tables = {
        "train": _read_checked(os.path.join(folder, train_name)),
        "dev": _read_checked(os.path.join(folder, "dev.tsv")),
        "test": _read_checked(os.path.join(folder, "test.tsv")),
    }
    if use_validated:
        held = tables["dev"] + tables["test"]
        paths = {row["path"] for row in held}
        speakers = {row["client_id"] for row in held}
        sentences = {normalize_text(row["sentence"], locale) for row in held}
        train = []
        for row in tables["train"]:
            if (
                row["path"] in paths
                or row["client_id"] in speakers
                or normalize_text(row["sentence"], locale) in sentences
            ):
                skips.add(locale, "train", "in_dev_or_test")
            else:
                train.append(row)
        tables["train"] = train
    speaker_ids = short_ids(
        sorted({row["client_id"] for rows in tables.values() for row in rows}), locale
    )
    durations = read_clip_durations(folder) or {}
    clips_folder = os.path.abspath(os.path.join(folder, "clips"))
    clips = []
    for split in SPLITS:
        for row in tables[split]:
            clips.append(
                Clip(
                    utt_id=_clip_id(locale, row["path"]),
                    split=split,
                    lang=locale,
                    spk_id=speaker_ids[row["client_id"]],
                    sentence=row["sentence"],
                    text_language=locale,
                    audio=os.path.join(clips_folder, row["path"]),
                    duration=durations.get(row["path"]),
                )
            )
    return clips


def _as_list(values: Union[None, str, Sequence[str]]) -> list:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return [str(value) for value in values]


def _check_cap(name: str, value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:
        raise SetupError(f"{name} must be > 0 (or None for no cap), got {value}.")
    return None if value is None else float(value)


def prepare_common_voice(
    data_folder: str,
    save_folder: Optional[str] = None,
    locales: Union[str, Sequence[str], None] = None,
    target_locales: Union[str, Sequence[str], None] = None,
    max_hours_per_language: Optional[float] = None,
    max_hours_per_speaker: Optional[float] = None,
    capped_splits: Sequence[str] = ("train",),
    max_duration: Optional[float] = 30.0,
    use_validated: bool = False,
    convert_to_wav: bool = False,
    seed: int = 1234,
    num_workers: int = 2,
    download_folder: Optional[str] = None,
) -> dict:
    """Write the manifests of some locales of a Common Voice release.

    Arguments
    ---------
    data_folder : str
        The release, ``cv-corpus-<version>`` (read only).
    save_folder : str
        Where the manifests, ``corpus.json`` and the converted wavs go
        (required; not inside ``data_folder``).
    locales : list of str
        The locales (folder names of the release, e.g. ``de``, ``sv-SE``).
    target_locales : list of str, optional
        Locales recorded as the held-out ``targets`` of ``corpus.json``
        (``train.py`` holds them out of meta-training when ``target_tasks``
        is null); they must be among ``locales``. Default: none.
    max_hours_per_language : float, optional
        Hours kept per locale in each capped split; None: all.
    max_hours_per_speaker : float, optional
        Hours kept per speaker in each capped split; None: all.
    capped_splits : sequence of str
        The splits the caps apply to (default: train only).
    max_duration : float, optional
        Clips longer than this many seconds are skipped; None: none.
    use_validated : bool
        Build train from ``validated.tsv`` (without dev/test speakers and
        sentences) instead of ``train.tsv``.
    convert_to_wav : bool
        Convert the kept clips to 16 kHz mono 16-bit wavs in
        ``<save_folder>/wav/<locale>/``.
    seed : int
        Seed of the caps' draw.
    num_workers : int
        Threads that read audio headers and convert.
    download_folder : str, optional
        Not used (the release is downloaded by the user); accepted because
        every recipe's command line has it.

    Returns
    -------
    dict
        ``{"train": path, "dev": path, "test": path}`` of the manifests.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        On a missing save folder (or one inside the release), a locale not
        in the release, a TSV that is missing or lacks a needed column, a bad
        option.
    recipes.manifest.FolderNotOwnedError
        When ``save_folder`` holds files this recipe did not make.
    """
    del download_folder  # no download: see the docstring
    locales = _as_list(locales)
    targets = _as_list(target_locales)
    save_folder = check_save_folder(save_folder, data_folder, "--data_folder")
    present = release_locales(data_folder)
    if not locales:
        raise SetupError(
            f"No locale chosen: pass --locales, among those of {data_folder}: "
            f"{' '.join(present) or 'none'}."
        )
    if len(set(locales)) != len(locales):
        raise SetupError(f"--locales names a locale twice: {' '.join(locales)}.")
    unknown = [t for t in targets if t not in locales]
    if unknown:
        raise SetupError(
            f"--target_locales {' '.join(unknown)} not among --locales "
            f"{' '.join(locales)}: a held-out target must be prepared too."
        )
    wrong = [s for s in capped_splits if s not in SPLITS]
    if wrong:
        raise SetupError(f"--capped_splits {wrong}: choose among {list(SPLITS)}.")
    options = {
        "release": os.path.realpath(data_folder),
        "locales": locales,
        "target_locales": targets,
        "max_hours_per_language": _check_cap(
            "max_hours_per_language", max_hours_per_language
        ),
        "max_hours_per_speaker": _check_cap(
            "max_hours_per_speaker", max_hours_per_speaker
        ),
        "capped_splits": list(capped_splits),
        "max_duration": _check_cap("max_duration", max_duration),
        "use_validated": bool(use_validated),
        "convert_to_wav": bool(convert_to_wav),
        "seed": seed,
    }
    paths = manifest_paths(save_folder, list(SPLITS))
    if is_prepared(save_folder, list(SPLITS), options, RECIPE):
        logger.info("Common Voice is prepared in %s, skipping.", save_folder)
        return paths
    if not os.path.isdir(data_folder):
        raise SetupError(f"--data_folder {data_folder} is not a folder.")
    missing = [locale for locale in locales if locale not in present]
    if missing:
        hint = ""
        if os.path.isfile(os.path.join(data_folder, "train.tsv")):
            hint = " (it is a locale folder: pass the release folder above it)"
        raise SetupError(
            f"Locale(s) {' '.join(missing)} not in the Common Voice release "
            f"{data_folder}{hint}: it has {' '.join(present) or 'no locale'}. "
            "Choose --locales among them, or extract their downloads into it."
        )
    check_folder(save_folder, RECIPE, list(options))  # before the long reading

    skips = SkipCounts()
    clips = []
    for locale in locales:
        clips += read_locale(data_folder, locale, skips, use_validated)
    described = {
        "corpus": "Common Voice",
        "languages": locales,
        "targets": targets,
        "seed": seed,
    }
    return build_manifests(
        clips, skips, save_folder, RECIPE, options, described, num_workers
    )


def main(argv: Optional[list] = None) -> None:
    """Command-line entry point (see ``--help``).

    Arguments
    ---------
    argv : list of str, optional
        Arguments; default: ``sys.argv[1:]``.
    """
    parser = release_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--locales", nargs="+", required=True, help="e.g. de fr")
    parser.add_argument("--target_locales", nargs="*", default=[])
    parser.add_argument(
        "--use_validated", action="store_true", help="train from validated.tsv"
    )
    run_preparation(prepare_common_voice, parser, argv)


if __name__ == "__main__":
    main()

"""Prepares FLEURS languages: SpeechBrain manifests from a downloaded copy.

Input: the folder of the FLEURS languages as the Hugging Face dataset
``google/fleurs`` holds them (``data/`` of a clone of it, or that clone
itself): ``<lang>/{train,dev,test}.tsv`` and the audio of each split extracted
from ``<lang>/audio/<split>.tar.gz`` into ``<lang>/audio/<split>/`` (16 kHz
wavs; a ``<split>/`` folder inside it is found too). The TSVs have no header
and the columns ``id`` (the sentence: its recordings by several readers share
it), ``file_name``, ``raw_transcription``, ``transcription``, ``words``,
``num_samples`` (at 16 kHz) and ``gender``. The folder is never written into.

Output, in ``save_folder``: ``{train,dev,test}.csv`` with the columns
``ID,duration,wav,spk_id,lang,wrd`` and ``corpus.json``:

* the split is FLEURS's own; ``lang`` is the FLEURS code (``cs_cz``) unless
  ``lang_names`` maps it (``"short"``: the part before the first ``_``,
  ``cs``; or a dict, ``{"pt_br": "pt"}``), so that FLEURS languages can be
  held-out targets next to Common Voice locales;
* ``ID`` is ``<lang>_<file name without .wav>``;
* ``wrd`` is ``raw_transcription`` (the text as written, the default of
  ``text_column``) normalised by :func:`speechbrain_meta.text.normalize_text`
  in the language before the first ``_`` of the code, exactly as Common Voice
  sentences are: the two corpora then share one normal form. FLEURS's own
  ``transcription`` (lowercased, punctuation removed by FLEURS) is used, and
  normalised the same way, with ``text_column="transcription"``.
  Sentences with digits or spoken symbols are skipped (their transcript and
  speech differ once the digits are removed), as in every recipe;
* ``spk_id`` is ``<lang>_sentence<id>``: FLEURS publishes no speaker
  identity, so the clips are grouped by the sentence read (its recordings, by
  different readers, share the group). It is not a speaker: FLEURS states that
  train speakers differ from dev and test speakers, but without speaker
  identities this cannot be checked, nor can speakers be capped
  (``max_hours_per_speaker`` caps the hours per sentence group);
* ``wav`` is the absolute path of the FLEURS wav, or with
  ``convert_to_wav=True`` ``$data_root/wav/<lang>/<ID>.wav`` (16 kHz mono
  16-bit, in the save folder);
* ``duration`` is ``num_samples / 16000``, or read from the header when
  ``num_samples`` is not a positive number, or from the converted wav.

Skipped clips are counted per language, split and reason (see
:mod:`recipes.release`), caps applied as in :mod:`recipes.common_voice`.

Command line (from the repository root)::

    python -m recipes.fleurs.prepare --data_folder fleurs/data \
        --save_folder data/fleurs --languages cs_cz pt_br --lang_names short

Example
-------
>>> from speechbrain.utils.distributed import run_on_main
>>> manifests = run_on_main(
...     prepare_fleurs,
...     kwargs={"data_folder": "fleurs/data", "save_folder": "data/fleurs",
...             "languages": ["cs_cz"], "lang_names": "short"},
... )  # doctest: +SKIP
"""

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from recipes.manifest import check_folder, is_prepared, manifest_paths
from recipes.preparation import SAMPLE_RATE, run_preparation
from recipes.release import (
    SPLITS,
    Clip,
    SkipCounts,
    build_manifests,
    check_save_folder,
    release_parser,
)
from speechbrain_meta.errors import SetupError

__all__ = [
    "COLUMNS",
    "RECIPE",
    "TEXT_COLUMNS",
    "fleurs_languages",
    "language_folder",
    "manifest_names",
    "prepare_fleurs",
    "read_language",
    "read_tsv",
]

logger = logging.getLogger(__name__)

RECIPE = "fleurs"
COLUMNS = (
    "id",
    "file_name",
    "raw_transcription",
    "transcription",
    "words",
    "num_samples",
    "gender",
)
TEXT_COLUMNS = ("raw_transcription", "transcription")


def read_tsv(path: str) -> list:
    r"""Read a FLEURS TSV (no header, the :data:`COLUMNS`), one dict per line.

    Arguments
    ---------
    path : str
        ``<lang>/<split>.tsv``.

    Returns
    -------
    list of dict
        The rows, with the keys of :data:`COLUMNS`.

    Raises
    ------
    SetupError
        If the file is missing or a line does not have the 7 columns.

    Example
    -------
    >>> path = getfixture("tmp_path") / "dev.tsv"
    >>> _ = path.write_text("7\t1.wav\tHi!\thi\th|i|\t16000\tFEMALE\n")
    >>> [(row["id"], row["raw_transcription"]) for row in read_tsv(str(path))]
    [('7', 'Hi!')]
    """
    if not os.path.isfile(path):
        raise SetupError(
            f"{path} does not exist: a FLEURS language folder holds train.tsv, "
            "dev.tsv, test.tsv and audio/."
        )
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if number == 1 and fields[0] == "id":
                continue  # a header written by another tool
            if len(fields) != len(COLUMNS):
                raise SetupError(
                    f"{path}:{number} has {len(fields)} tab-separated columns, a "
                    f"FLEURS TSV has {len(COLUMNS)} ({', '.join(COLUMNS)})."
                )
            rows.append(dict(zip(COLUMNS, fields)))
    return rows


def _root(data_folder: str) -> Path:
    """The folder of the language folders: ``data_folder`` or its ``data/``."""
    folder = Path(data_folder)
    if not _languages_in(folder) and (folder / "data").is_dir():
        return folder / "data"
    return folder


def _languages_in(folder: Path) -> list:
    """The sorted names of the sub-folders of ``folder`` that hold a split TSV."""
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and any((entry / f"{s}.tsv").is_file() for s in SPLITS)
    )


def fleurs_languages(data_folder: str) -> list:
    """Return the FLEURS languages of a download (``<lang>/`` or ``data/<lang>/``).

    Arguments
    ---------
    data_folder : str
        The download.

    Returns
    -------
    list of str
        Sorted FLEURS codes.
    """
    return _languages_in(_root(data_folder))


def language_folder(data_folder: str, language: str) -> str:
    """Return ``<data_folder>/<language>`` or ``<data_folder>/data/<language>``.

    Arguments
    ---------
    data_folder : str
        The download.
    language : str
        A FLEURS code.

    Returns
    -------
    str
        The language's folder.
    """
    return str(_root(data_folder) / language)


def _audio_folder(folder: str, split: str) -> str:
    audio = os.path.join(folder, "audio", split)
    nested = os.path.join(audio, split)  # an archive extracted into audio/<split>
    if os.path.isdir(nested):
        return os.path.abspath(nested)
    if not os.path.isdir(audio):
        archive = os.path.join(folder, "audio", f"{split}.tar.gz")
        if os.path.isfile(archive):
            raise SetupError(
                f"{archive} is not extracted: run tar -xzf {archive} -C "
                f"{os.path.join(folder, 'audio')} (its wavs go into {audio}/)."
            )
        raise SetupError(f"{audio} does not exist: the {split} audio is missing.")
    return os.path.abspath(audio)


def manifest_names(
    languages: Sequence[str], lang_names: Union[None, str, dict] = None
) -> dict:
    """Return ``{FLEURS code: manifest lang}``.

    Arguments
    ---------
    languages : sequence of str
        FLEURS codes.
    lang_names : None, "short" or dict
        None: the codes; ``"short"``: the part before the first ``_``; a
        dict: its names (codes it does not map keep their code).

    Returns
    -------
    dict
        The name of each language.

    Raises
    ------
    SetupError
        If two languages would get the same name.

    Example
    -------
    >>> manifest_names(["cs_cz", "pt_br"], "short")
    {'cs_cz': 'cs', 'pt_br': 'pt'}
    >>> manifest_names(["cs_cz", "pt_br"], {"pt_br": "pt"})
    {'cs_cz': 'cs_cz', 'pt_br': 'pt'}
    """
    if lang_names is None:
        names = {code: code for code in languages}
    elif lang_names == "short":
        names = {code: code.split("_")[0] for code in languages}
    elif isinstance(lang_names, dict):
        names = {code: str(lang_names.get(code, code)) for code in languages}
    else:
        raise SetupError(
            f"lang_names must be null, 'short' or a mapping, got {lang_names!r}."
        )
    taken = {}
    for code, name in names.items():
        if name in taken:
            raise SetupError(
                f"FLEURS languages {taken[name]} and {code} would both be '{name}' "
                "in the manifests: map them to different names with --lang_names."
            )
        taken[name] = code
    return names


def _duration(num_samples: str) -> Optional[float]:
    try:
        samples = int(num_samples)
    except ValueError:
        return None
    return samples / SAMPLE_RATE if samples > 0 else None


def read_language(
    data_folder: str, language: str, name: str, text_column: str = TEXT_COLUMNS[0]
) -> list:
    """Return the clips of one FLEURS language, in split and file order.

    Arguments
    ---------
    data_folder : str
        The download.
    language : str
        The FLEURS code.
    name : str
        Its manifest ``lang``.
    text_column : str
        ``raw_transcription`` or ``transcription``.

    Returns
    -------
    list of Clip
        The clips of train, dev and test.
    """
    folder = language_folder(data_folder, language)
    text_language = language.split("_")[0]
    clips = []
    for split in SPLITS:
        rows = read_tsv(os.path.join(folder, f"{split}.tsv"))
        audio = _audio_folder(folder, split)
        for row in rows:
            clips.append(
                Clip(
                    utt_id=f"{name}_{Path(row['file_name']).stem}",
                    split=split,
                    lang=name,
                    spk_id=f"{name}_sentence{row['id']}",
                    sentence=row[text_column],
                    text_language=text_language,
                    audio=os.path.join(audio, row["file_name"]),
                    duration=_duration(row["num_samples"]),
                )
            )
    return clips


def _as_list(values: Union[None, str, Sequence[str]]) -> list:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return [str(value) for value in values]


def _parse_lang_names(values: Union[None, str, dict, Sequence[str]]):
    """``None``, ``"short"``, a dict, or ``["cs_cz=cs", ...]`` from the command line."""
    if values is None or isinstance(values, (str, dict)):
        return values
    values = list(values)
    if not values:
        return None
    if values == ["short"]:
        return "short"
    mapping = {}
    for value in values:
        code, sep, name = value.partition("=")
        if not sep or not code or not name:
            raise SetupError(
                f"--lang_names {value}: give 'short' or code=name pairs "
                "(e.g. cs_cz=cs pt_br=pt)."
            )
        mapping[code] = name
    return mapping


def _check_positive(name: str, value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:
        raise SetupError(f"{name} must be > 0 (or None for no limit), got {value}.")
    return None if value is None else float(value)


def prepare_fleurs(
    data_folder: str,
    save_folder: Optional[str] = None,
    languages: Union[str, Sequence[str], None] = None,
    target_languages: Union[str, Sequence[str], None] = None,
    lang_names: Union[None, str, dict, Sequence[str]] = None,
    text_column: str = "raw_transcription",
    max_hours_per_language: Optional[float] = None,
    max_hours_per_speaker: Optional[float] = None,
    capped_splits: Sequence[str] = ("train",),
    max_duration: Optional[float] = 30.0,
    convert_to_wav: bool = False,
    seed: int = 1234,
    num_workers: int = 2,
    download_folder: Optional[str] = None,
) -> dict:
    """Write the manifests of some FLEURS languages.

    Arguments
    ---------
    data_folder : str
        The download: the folder of the ``<lang>/`` folders, or the one with
        ``data/`` (read only).
    save_folder : str
        Where the manifests, ``corpus.json`` and the converted wavs go
        (required; not inside ``data_folder``).
    languages : list of str
        FLEURS codes (``cs_cz``, ``pt_br``...).
    target_languages : list of str, optional
        Held-out ``targets`` of ``corpus.json``, as FLEURS codes or manifest
        names; among ``languages``. Default: none.
    lang_names : None, "short", dict or list of "code=name"
        The manifest ``lang`` of each language (see :func:`manifest_names`).
    text_column : str
        ``raw_transcription`` (default) or ``transcription``.
    max_hours_per_language : float, optional
        Hours kept per language in each capped split; None: all.
    max_hours_per_speaker : float, optional
        Hours kept per ``spk_id`` (sentence group) in each capped split.
    capped_splits : sequence of str
        The splits the caps apply to (default: train only).
    max_duration : float, optional
        Longer clips (seconds) are skipped; None: none.
    convert_to_wav : bool
        Write 16 kHz mono 16-bit wavs into ``<save_folder>/wav/<lang>/``.
    seed : int
        Seed of the caps' draw.
    num_workers : int
        Threads that read audio headers and convert.
    download_folder : str, optional
        Not used (FLEURS is downloaded by the user).

    Returns
    -------
    dict
        ``{"train": path, "dev": path, "test": path}`` of the manifests.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        On a missing save folder (or one inside the download), a language
        not in the download, a malformed TSV, audio not extracted, a bad
        option.
    recipes.manifest.FolderNotOwnedError
        When ``save_folder`` holds files this recipe did not make.
    """
    del download_folder  # no download: see the docstring
    languages = _as_list(languages)
    save_folder = check_save_folder(save_folder, data_folder, "--data_folder")
    present = fleurs_languages(data_folder)
    if not languages:
        raise SetupError(
            f"No language chosen: pass --languages, among those of {data_folder}: "
            f"{' '.join(present) or 'none'}."
        )
    if len(set(languages)) != len(languages):
        raise SetupError(f"--languages names a language twice: {' '.join(languages)}.")
    if text_column not in TEXT_COLUMNS:
        raise SetupError(
            f"text_column {text_column!r}: choose {' or '.join(TEXT_COLUMNS)}."
        )
    names = manifest_names(languages, _parse_lang_names(lang_names))
    targets = []
    for target in _as_list(target_languages):
        name = names.get(target, target)
        if name not in names.values():
            raise SetupError(
                f"--target_languages {target} is not among --languages "
                f"{' '.join(languages)}: a held-out target must be prepared too."
            )
        targets.append(name)
    wrong = [s for s in capped_splits if s not in SPLITS]
    if wrong:
        raise SetupError(f"--capped_splits {wrong}: choose among {list(SPLITS)}.")
    options = {
        "release": os.path.realpath(data_folder),
        "languages": languages,
        "lang_names": names,
        "targets": targets,
        "text_column": text_column,
        "max_hours_per_language": _check_positive(
            "max_hours_per_language", max_hours_per_language
        ),
        "max_hours_per_speaker": _check_positive(
            "max_hours_per_speaker", max_hours_per_speaker
        ),
        "capped_splits": list(capped_splits),
        "max_duration": _check_positive("max_duration", max_duration),
        "convert_to_wav": bool(convert_to_wav),
        "seed": seed,
    }
    paths = manifest_paths(save_folder, list(SPLITS))
    if is_prepared(save_folder, list(SPLITS), options, RECIPE):
        logger.info("FLEURS is prepared in %s, skipping.", save_folder)
        return paths
    missing = [code for code in languages if code not in present]
    if missing:
        raise SetupError(
            f"Language(s) {' '.join(missing)} not in the FLEURS folder "
            f"{data_folder}: it has {' '.join(present) or 'no language'}. Choose "
            "--languages among them (FLEURS codes such as cs_cz), or download them."
        )
    check_folder(save_folder, RECIPE, list(options))  # before the long reading

    clips = []
    for code in languages:
        clips += read_language(data_folder, code, names[code], text_column)
    described = {
        "corpus": "FLEURS",
        "languages": [names[code] for code in languages],
        "targets": targets,
        "seed": seed,
    }
    return build_manifests(
        clips, SkipCounts(), save_folder, RECIPE, options, described, num_workers
    )


def main(argv: Optional[list] = None) -> None:
    """Command-line entry point (see ``--help``).

    Arguments
    ---------
    argv : list of str, optional
        Arguments; default: ``sys.argv[1:]``.
    """
    parser = release_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="+", required=True, help="e.g. cs_cz")
    parser.add_argument("--target_languages", nargs="*", default=[])
    parser.add_argument(
        "--lang_names", nargs="*", help="'short', or code=name pairs (cs_cz=cs)"
    )
    parser.add_argument("--text_column", choices=TEXT_COLUMNS, default=TEXT_COLUMNS[0])
    run_preparation(prepare_fleurs, parser, argv)


if __name__ == "__main__":
    main()

"""Tiny fake downloads of Common Voice and FLEURS, for the tests of their recipes.

Both are built from the audio of the tiny embedded corpus (the ``tiny_corpus``
session fixture of ``tests/conftest.py``: 12 languages, 8 train, 2 dev and 2
test utterances each, espeak-ng voices ``<lang>_<variant>`` that are disjoint
between splits), laid out and formatted as the real downloads are:

* :func:`build_common_voice_release` writes a ``cv-corpus-<version>`` release:
  ``<locale>/{train,dev,test,validated,invalidated,other}.tsv`` with the header
  of recent releases (:data:`CV_COLUMNS`, tab separated, a field with a double
  quote quoted as in CSV), ``<locale>/clip_durations.tsv`` (``clip``,
  ``duration[ms]``) and ``<locale>/clips/common_voice_<locale>_<n>.mp3`` (48 kHz
  mono by default). Speakers (``client_id``, 128 hex digits) are disjoint
  between train, dev and test, as in the real releases;
* :func:`build_fleurs_folder` writes the ``data/`` folder of ``google/fleurs``:
  ``<lang>/{train,dev,test}.tsv`` without a header (:data:`FLEURS_COLUMNS`) and
  ``<lang>/audio/<split>/<file_name>.wav`` (16 kHz, the archives extracted).

Sentences carry real punctuation, casing and apostrophes: the tiny corpus's
normalised sentence, capitalised and punctuated (it normalises back to the
tiny corpus's ``wrd``), except the first train clips of some languages, which
get a sentence of :data:`CV_SENTENCES` / :data:`FLEURS_SENTENCES` (with the
form the recipes must normalise it to). The audio of those clips does not say
their sentence: the fixtures test preparation, not recognition.

Helpers break or inspect a copy: :func:`corrupt_file`, :func:`drop_tsv_column`,
:func:`tree_snapshot` (to check that a recipe left a download untouched).

Example (in a test)::

    from release_fixtures import build_common_voice_release  # tests/ is on sys.path
    release = build_common_voice_release(tmp_path, tiny_corpus, ["fr", "cs"])
    prepare_common_voice(str(release.folder), str(tmp_path / "cv"), release.locales)
"""

import csv
import hashlib
import io
import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import soundfile

__all__ = [
    "CV_COLUMNS",
    "CV_SENTENCES",
    "CV_VERSION",
    "FLEURS_CODES",
    "FLEURS_COLUMNS",
    "FLEURS_SENTENCES",
    "FakeFleurs",
    "FakeRelease",
    "build_common_voice_release",
    "build_fleurs_folder",
    "corrupt_file",
    "drop_tsv_column",
    "manifest_bytes",
    "manifests",
    "read_rows",
    "record",
    "tiny_rows",
    "tree_snapshot",
]

SPLITS = ("train", "dev", "test")
CV_VERSION = "17.0-2024-03-15"
# The header of the split TSVs of Common Voice 17 and later.
CV_COLUMNS = (
    "client_id",
    "path",
    "sentence_id",
    "sentence",
    "sentence_domain",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
)
FLEURS_COLUMNS = (
    "id",
    "file_name",
    "raw_transcription",
    "transcription",
    "words",
    "num_samples",
    "gender",
)
# The FLEURS code of each language of the tiny corpus.
FLEURS_CODES = {
    "en": "en_us",
    "de": "de_de",
    "nl": "nl_nl",
    "sv": "sv_se",
    "fr": "fr_fr",
    "es": "es_419",
    "it": "it_it",
    "pl": "pl_pl",
    "ru": "ru_ru",
    "bg": "bg_bg",
    "cs": "cs_cz",
    "pt": "pt_br",
}
# (sentence, its normal form) given to the first train clips of a language.
CV_SENTENCES = {
    "en": [
        ('"Don\'t stop," she said.', "don't stop she said"),
        ("Rock 'n' roll: Bob’s band!", "rock n roll bob's band"),
    ],
    "fr": [
        ("L’été, déjà ?", "l'été déjà"),
        ("« Aujourd'hui », c'est l'heure !", "aujourd'hui c'est l'heure"),
    ],
    "de": [("„Wie geht's?“ – Gut.", "wie geht's gut")],
    "it": [("L'anno scorso, sì.", "l'anno scorso sì")],
    "cs": [("Příliš žluťoučký kůň – 'úpěl'.", "příliš žluťoučký kůň úpěl")],
    "pt": [("Um copo d’água, por favor!", "um copo d'água por favor")],
}
FLEURS_SENTENCES = {
    "en": [("It's 2011, said the report.", None)],  # digits: skipped
    "fr": [("L’été, déjà ?", "l'été déjà"), ("En 1998, il pleuvait.", None)],
    "cs": [("Příliš žluťoučký kůň – 'úpěl'.", "příliš žluťoučký kůň úpěl")],
    "pt": [("Um copo d’água, por favor!", "um copo d'água por favor")],
}


@dataclass
class FakeRelease:
    """A fake Common Voice release.

    Attributes
    ----------
    folder : pathlib.Path
        ``cv-corpus-<version>``: pass it as ``data_folder``.
    locales : list of str
        Its locales (``sv-SE``...).
    rows : dict
        ``{locale: {tsv name without .tsv: [row dict]}}``: the rows written,
        with the keys of :data:`CV_COLUMNS`, for ``train``, ``dev``, ``test``,
        ``validated``, ``invalidated`` and ``other``.
    words : dict
        ``{clip file name: expected normalised sentence}``.
    sources : dict
        ``{clip file name: the tiny corpus wav it was made from}``.
    """

    folder: Path
    locales: list
    rows: dict = field(default_factory=dict)
    words: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    def clip(self, locale: str, name: str) -> Path:
        """Return the path of clip ``name`` (``common_voice_...mp3``)."""
        return self.folder / locale / "clips" / name

    def tsv(self, locale: str, split: str) -> Path:
        """Return the path of ``<locale>/<split>.tsv``."""
        return self.folder / locale / f"{split}.tsv"


@dataclass
class FakeFleurs:
    """A fake FLEURS download.

    Attributes
    ----------
    folder : pathlib.Path
        Pass it as ``data_folder`` (the language folders are in it, or in its
        ``data/`` with ``hf_layout=True``).
    languages : list of str
        FLEURS codes.
    rows : dict
        ``{code: {split: [row dict]}}`` with the keys of :data:`FLEURS_COLUMNS`.
    words : dict
        ``{(code, file_name): expected normalised sentence or None}`` (None:
        the sentence has digits and must be skipped).
    """

    folder: Path
    languages: list
    rows: dict = field(default_factory=dict)
    words: dict = field(default_factory=dict)

    def language_folder(self, code: str) -> Path:
        """Return the folder of language ``code``."""
        root = self.folder / "data" if (self.folder / "data").is_dir() else self.folder
        return root / code


def tiny_rows(tiny_corpus: dict) -> dict:
    """Return ``{lang: {split: [row]}}`` of the tiny corpus, wav paths resolved.

    Arguments
    ---------
    tiny_corpus : dict
        The ``tiny_corpus`` fixture.

    Returns
    -------
    dict
        The manifest rows (``ID``, ``duration``, ``wav``, ``spk_id``, ``lang``,
        ``wrd``), ``wav`` an absolute path.
    """
    result = {}
    for split in SPLITS:
        with open(tiny_corpus[split], newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                row["wav"] = row["wav"].replace(
                    "$data_root", tiny_corpus["data_folder"]
                )
                result.setdefault(row["lang"], {s: [] for s in SPLITS})[split].append(
                    row
                )
    return result


def _punctuate(words: str, index: int) -> str:
    """A normalised sentence as written: capitalised, with punctuation."""
    first, _, rest = words.partition(" ")
    text = first[:1].upper() + first[1:]
    if rest:
        text += ("," if index % 3 == 1 else "") + " " + rest
    return text + ".?!"[index % 3]


def _write_tsv(path: Path, columns: Sequence[str], rows: list, header: bool) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([row[column] for column in columns])
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _resampled(wav: str, rate: int):
    import torch
    import torchaudio.functional

    data, source_rate = soundfile.read(wav, dtype="float32")
    if source_rate == rate:
        return data
    signal = torchaudio.functional.resample(torch.from_numpy(data), source_rate, rate)
    return signal.numpy()


def build_common_voice_release(
    root,
    tiny_corpus: dict,
    locales: Sequence[str] = ("en", "fr", "sv-SE", "cs"),
    version: str = CV_VERSION,
    sample_rate: int = 48000,
    clip_durations: bool = True,
) -> FakeRelease:
    """Write a fake Common Voice release with the tiny corpus's audio as mp3.

    Each locale has the tiny corpus's 8 train, 2 dev and 2 test utterances of
    its language (the part of the locale before ``-``); ``validated.tsv`` has
    them all and two more clips (the first train sentence recorded again by
    the same speaker, and the first test sentence again by its test speaker),
    ``invalidated.tsv`` and ``other.tsv`` one clip each; every clip of every
    TSV is in ``clips/`` and in ``clip_durations.tsv`` (its duration as
    soundfile reads the mp3, in whole milliseconds).

    Arguments
    ---------
    root : path
        A folder; the release is ``<root>/cv-corpus-<version>``.
    tiny_corpus : dict
        The ``tiny_corpus`` fixture.
    locales : sequence of str
        Common Voice locales whose language the tiny corpus has.
    version : str
        The release's version (in its folder's name).
    sample_rate : int
        The mp3s' rate (real clips are 48 or 32 kHz).
    clip_durations : bool
        Write ``clip_durations.tsv`` (older releases have none).

    Returns
    -------
    FakeRelease
        The release and what was written.
    """
    tiny = tiny_rows(tiny_corpus)
    folder = Path(root) / f"cv-corpus-{version}"
    release = FakeRelease(folder=folder, locales=list(locales))
    numbers = itertools.count(38_000_001)
    for locale in locales:
        lang = locale.split("-")[0]
        (folder / locale / "clips").mkdir(parents=True)
        curated = list(CV_SENTENCES.get(lang, []))
        tables = {name: [] for name in (*SPLITS, "invalidated", "other")}
        durations = []

        def add(
            utterance, sentence, words, up=2, down=0, locale=locale, durations=durations
        ):
            name = f"common_voice_{locale}_{next(numbers)}.mp3"
            row, milliseconds = _write_cv_clip(
                release.clip(locale, name), utterance, sentence, locale, sample_rate
            )
            row.update(up_votes=str(up), down_votes=str(down))
            durations.append((name, milliseconds))
            release.words[name] = words
            release.sources[name] = utterance["wav"]
            return row

        for split in SPLITS:
            for index, utterance in enumerate(tiny[lang][split]):
                if split == "train" and index < len(curated):
                    sentence, words = curated[index]
                else:
                    sentence = _punctuate(utterance["wrd"], index)
                    words = utterance["wrd"]
                tables[split].append(add(utterance, sentence, words))
        validated = [*tables["train"], *tables["dev"], *tables["test"]]
        # Recorded again by the same speaker: in validated.tsv only.
        for split in ("train", "test"):
            again = tables[split][0]
            words = release.words[again["path"]]
            utterance = tiny[lang][split][0]
            validated.append(add(utterance, again["sentence"], words))
        tables["validated"] = validated
        dev = tiny[lang]["dev"]
        tables["invalidated"].append(add(dev[0], "Zzz qqq.", None, up=0, down=2))
        tables["other"].append(add(dev[1], _punctuate("noch nicht", 0), None, up=0))
        for name, rows in tables.items():
            _write_tsv(folder / locale / f"{name}.tsv", CV_COLUMNS, rows, True)
        if clip_durations:
            _write_tsv(
                folder / locale / "clip_durations.tsv",
                ("clip", "duration[ms]"),
                [{"clip": n, "duration[ms]": str(ms)} for n, ms in durations],
                True,
            )
        release.rows[locale] = tables
    return release


def _write_cv_clip(
    path: Path, utterance: dict, sentence: str, locale: str, sample_rate: int
) -> tuple:
    """Write a tiny corpus utterance as a Common Voice mp3; return its TSV row."""
    audio = _resampled(utterance["wav"], sample_rate)
    soundfile.write(path, audio, sample_rate, format="MP3")
    info = soundfile.info(str(path))
    variant = utterance["spk_id"].split("_")[-1]
    row = {
        "client_id": hashlib.sha512(f"tiny:{utterance['spk_id']}".encode()).hexdigest(),
        "path": path.name,
        "sentence_id": hashlib.sha256(sentence.encode()).hexdigest(),
        "sentence": sentence,
        "sentence_domain": "",
        "up_votes": "2",
        "down_votes": "0",
        "age": "twenties" if variant[-1] in "13" else "",
        "gender": "male_masculine" if variant[0] == "m" else "female_feminine",
        "accents": "",
        "variant": "",
        "locale": locale,
        "segment": "",
    }
    return row, round(1000 * info.frames / info.samplerate)


def _fleurs_transcription(raw: str) -> str:
    """FLEURS's own ``transcription``: lowercased, punctuation removed."""
    text = re.sub(r"[^\w\s']", " ", raw.lower())
    return re.sub(r"\s+", " ", text).strip()


def build_fleurs_folder(
    root,
    tiny_corpus: dict,
    languages: Sequence[str] = ("en_us", "fr_fr", "cs_cz", "pt_br"),
    hf_layout: bool = False,
    nested_audio: bool = False,
) -> FakeFleurs:
    """Write a fake FLEURS download with the tiny corpus's wavs.

    Each language has the tiny corpus's train, dev and test utterances of its
    language; the train clips go in pairs that share a sentence ``id`` (and
    its transcription), as the several readers of a FLEURS sentence do.

    Arguments
    ---------
    root : path
        The folder to write into; it becomes the download (``data_folder``).
    tiny_corpus : dict
        The ``tiny_corpus`` fixture.
    languages : sequence of str
        FLEURS codes of tiny corpus languages (:data:`FLEURS_CODES`).
    hf_layout : bool
        Put the language folders into ``<root>/data/``, as in a clone of the
        Hugging Face dataset.
    nested_audio : bool
        Put the wavs into ``audio/<split>/<split>/`` (an archive extracted
        into a folder of its name).

    Returns
    -------
    FakeFleurs
        The download and what was written.
    """
    tiny = tiny_rows(tiny_corpus)
    by_code = {code: lang for lang, code in FLEURS_CODES.items()}
    root = Path(root)
    base = root / "data" if hf_layout else root
    fleurs = FakeFleurs(folder=root, languages=list(languages))
    number = 10_004_088_536_354_799_000
    sentence_id = 1500
    for code in languages:
        lang = by_code[code]
        curated = list(FLEURS_SENTENCES.get(lang, []))
        fleurs.rows[code] = {}
        for split in SPLITS:
            audio = base / code / "audio" / split
            if nested_audio:
                audio = audio / split
            audio.mkdir(parents=True)
            rows = []
            for index, utterance in enumerate(tiny[lang][split]):
                number += 1
                name = f"{number}.wav"
                shutil.copyfile(utterance["wav"], audio / name)
                shared = split == "train" and index % 2 == 1
                if shared:  # a second reader of the previous sentence
                    raw = rows[-1]["raw_transcription"]
                    words = fleurs.words[(code, rows[-1]["file_name"])]
                else:
                    sentence_id += 1
                    if split == "train" and index // 2 < len(curated):
                        raw, words = curated[index // 2]
                    else:
                        raw = _punctuate(utterance["wrd"], index)
                        words = utterance["wrd"]
                transcription = _fleurs_transcription(raw)
                info = soundfile.info(str(audio / name))
                variant = utterance["spk_id"].split("_")[-1]
                rows.append(
                    {
                        "id": str(sentence_id),
                        "file_name": name,
                        "raw_transcription": raw,
                        "transcription": transcription,
                        "words": "|".join(transcription),
                        "num_samples": str(info.frames),
                        "gender": "MALE" if variant[0] == "m" else "FEMALE",
                    }
                )
                fleurs.words[(code, name)] = words
            _write_tsv(base / code / f"{split}.tsv", FLEURS_COLUMNS, rows, False)
            fleurs.rows[code][split] = rows
    return fleurs


def corrupt_file(path) -> None:
    """Overwrite an audio file with bytes no decoder reads (a corrupt download).

    Arguments
    ---------
    path : path
        The file.
    """
    Path(path).write_bytes(b"\x00garbage, not audio\xff" * 64)


def drop_tsv_column(path, column: str) -> None:
    """Remove a column (header and fields) from a Common Voice TSV.

    Arguments
    ---------
    path : path
        A TSV with a header.
    column : str
        The column's name.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    index = lines[0].split("\t").index(column)
    kept = [
        "\t".join(f for i, f in enumerate(line.split("\t")) if i != index)
        for line in lines
    ]
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")


def tree_snapshot(folder) -> dict:
    """Return ``{relative path: (kind, size, mtime_ns)}`` of a folder's tree.

    Folders are included (a file created or removed in one changes its
    mtime), so two equal snapshots mean nothing was written.

    Arguments
    ---------
    folder : path
        The folder.

    Returns
    -------
    dict
        One entry per file and folder below ``folder``, and ``"."``.
    """
    folder = Path(folder)
    snapshot = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        status = os.lstat(path)
        kind = "dir" if path.is_dir() else "file"
        size = 0 if kind == "dir" else status.st_size
        snapshot[str(path.relative_to(folder))] = (kind, size, status.st_mtime_ns)
    return snapshot


# ------------------------------------------------ reading what a recipe wrote
MANIFEST_SPLITS = ("train", "dev", "test")


def read_rows(path) -> list:
    """The rows of a manifest, checking its header."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        assert reader.fieldnames == ["ID", "duration", "wav", "spk_id", "lang", "wrd"]
        return list(reader)


def manifests(folder) -> dict:
    """The rows of the three manifests of a save folder."""
    return {s: read_rows(Path(folder, f"{s}.csv")) for s in MANIFEST_SPLITS}


def manifest_bytes(folder) -> dict:
    """The bytes of the manifests and ``corpus.json`` of a save folder."""
    names = [f"{split}.csv" for split in MANIFEST_SPLITS] + ["corpus.json"]
    return {name: Path(folder, name).read_bytes() for name in names}


def record(folder) -> dict:
    """The ``corpus.json`` of a save folder."""
    return json.loads(Path(folder, "corpus.json").read_text(encoding="utf-8"))

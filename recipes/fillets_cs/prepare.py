"""Prepares the Czech speech of Fish Fillets NG: real recordings of voice actors.

The Debian package ``fillets-ng-data-cs`` holds the Czech dubbing of the game
(Ogg Vorbis, 22 kHz, ``sound/<level>/cs/<id>.ogg``); the transcript of a clip is
the Czech ``dialogStr`` of dialogue ``<id>`` in ``script/<level>/dialogs_cs.lua``
of ``fillets-ng-data``, and the speaker is the character whose font the
dialogue uses (``big`` and ``small``, the two fish, speak most lines; the other
characters each have a voice; the generic colour fonts are counted per level).

Clips are kept when their line has no ``%1``-style placeholder, no digit or
spoken symbol, a non-empty transcript after normalisation and at least 0.3 s of
audio. They are converted to 16 kHz mono 16-bit wavs and split by line: clips
with the same normalised sentence go to the same split (no sentence is shared),
about 70 % train, 10 % dev, 20 % test of the clips. Splitting by speaker is not
feasible: the two fish say 86 % of the lines, so every split has both of them.

Outputs (same format as the embedded corpus): ``<data_folder>/wav/cs/<ID>.wav``,
``<save_folder>/{train,dev,test}.csv`` (``ID,duration,wav,spk_id,lang,wrd``,
``lang`` = ``cs``) and ``<save_folder>/corpus.json``.

The recipe writes only into folders it owns (see :mod:`recipes.manifest`):
``data_folder`` and ``save_folder`` must each be missing, empty, or hold a
``corpus.json`` of this recipe (``"recipe": "fillets_cs"``, or a record of an
earlier version with the same option keys). A folder with anything else in
it, such as a user's own manifests or an embedded corpus, raises
:class:`recipes.manifest.FolderNotOwnedError` before anything is written (pass
``--skip_prep True`` to train on those manifests, or choose another folder).
Before the first download or wav, ``corpus.json`` marks the build as in
progress; the complete record is written last. A rerun with the same options
returns at once; an interrupted run is completed by a rerun.

Command line (from the repository root)::

    python -m recipes.fillets_cs.prepare --data_folder data/fillets_cs

Example
-------
>>> manifests = prepare_fillets_cs("data/fillets_cs", max_clips=40)  # doctest: +SKIP
>>> sorted(manifests)  # doctest: +SKIP
['dev', 'test', 'train']
"""

import logging
import os
import random
import re
import subprocess
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import NamedTuple, Optional

import soundfile
from tqdm import tqdm

from recipes.debian_sources import fetch_package
from recipes.executables import require_executables
from recipes.fillets_dialogs import DIALOG_ROOT, DialogLine, read_dialogs
from recipes.manifest import (
    claim_folders,
    is_prepared,
    manifest_paths,
    wav_duration,
    write_manifest,
    write_record,
)
from recipes.preparation import preparation_parser, run_preparation, sox_wav_command
from speechbrain_meta.text import is_clean, normalize_text

__all__ = [
    "RECIPE",
    "Clip",
    "find_clips",
    "prepare_fillets_cs",
    "split_clips",
    "speaker_of",
]

RECIPE = "fillets_cs"

logger = logging.getLogger(__name__)

SPEECH_PACKAGE = "fillets-ng-data-cs"
TEXT_PACKAGE = "fillets-ng-data"
SPLIT_FRACTIONS = {"train": 0.7, "dev": 0.1, "test": 0.2}
MIN_DURATION = 0.3
# Fonts that name a colour, not a character: different levels use them for
# different characters, so their speaker is "<level>-<colour>".
_COLOUR_FONTS = {
    "brown",
    "cyan",
    "darkgrey",
    "green",
    "lightgrey",
    "magenta",
    "orange",
    "pink",
    "white",
    "yellow",
}
_PLACEHOLDER = re.compile(r"%\d")


class Clip(NamedTuple):
    """One recorded line and where its wav goes."""

    utt_id: str
    spk_id: str
    words: str
    ogg: str
    wav: str


def speaker_of(line: DialogLine) -> str:
    """Return the speaker ID of a dialogue line, from the font of its character.

    Arguments
    ---------
    line : DialogLine
        A Czech dialogue line.

    Returns
    -------
    str
        ``cs_<character>``, or ``cs_<level>-<colour>`` for the colour fonts.

    Example
    -------
    >>> speaker_of(DialogLine("barrel", "bar-v-co", "font_big", "A co?"))
    'cs_big'
    >>> speaker_of(DialogLine("captain", "c-x-1", "font_lightgrey", "Ahoj."))
    'cs_captain-lightgrey'
    """
    name = line.font.removeprefix("font_") or "unknown"
    if name in _COLOUR_FONTS or name == "unknown":
        name = f"{line.level}-{name}"
    return f"cs_{name}"


def find_clips(text_root: Path, speech_root: Path, data_folder: str) -> list[Clip]:
    """Match the Czech recordings with their lines and keep the clean ones.

    Arguments
    ---------
    text_root : pathlib.Path
        Unpacked ``fillets-ng-data`` (dialogue scripts).
    speech_root : pathlib.Path
        Unpacked ``fillets-ng-data-cs`` (recordings).
    data_folder : str
        Where the wavs will go (``wav/cs/<ID>.wav``).

    Returns
    -------
    list of Clip
        Clean clips sorted by ID.
    """
    lines = {}
    for line in read_dialogs(text_root, "cs"):
        key = (line.level, line.dialog_id)
        if key not in lines or not lines[key].text.strip():  # a translated one wins
            lines[key] = line
    clips = []
    sound = Path(speech_root) / DIALOG_ROOT / "sound"
    for ogg in sorted(sound.glob("*/cs/*.ogg")):
        line = lines.get((ogg.parent.parent.name, ogg.stem))
        if line is None or _PLACEHOLDER.search(line.text) or not is_clean(line.text):
            continue
        words = normalize_text(line.text)
        if not words or soundfile.info(str(ogg)).duration < MIN_DURATION:
            continue
        utt_id = f"{line.level}-{line.dialog_id}"
        wav = os.path.join(data_folder, "wav", "cs", f"{utt_id}.wav")
        clips.append(Clip(utt_id, speaker_of(line), words, str(ogg), wav))
    return sorted(clips)


def split_clips(clips: list[Clip], seed: int) -> dict[str, list[Clip]]:
    """Split clips into train, dev and test with no normalised sentence shared.

    Sentences (with all their clips) are shuffled with ``seed`` and dealt to
    test, then dev, until each holds its fraction of the clips; the rest is
    train.

    Arguments
    ---------
    clips : list of Clip
        The clips.
    seed : int
        Random seed.

    Returns
    -------
    dict
        ``{"train": clips, "dev": clips, "test": clips}``, each sorted by ID.

    Example
    -------
    >>> clips = [Clip(f"c{i}", "cs_big", f"věta {i % 5}", "", "") for i in range(10)]
    >>> splits = split_clips(clips, seed=1)
    >>> {split: len(c) for split, c in splits.items()}
    {'train': 6, 'dev': 2, 'test': 2}
    """
    groups = {}
    for clip in clips:
        groups.setdefault(clip.words, []).append(clip)
    order = sorted(groups)
    random.Random(f"{seed}:fillets_cs").shuffle(order)
    splits = {split: [] for split in SPLIT_FRACTIONS}
    for words in order:
        for split in ("test", "dev", "train"):
            quota = SPLIT_FRACTIONS[split] * len(clips)
            if split == "train" or len(splits[split]) < quota:
                splits[split].extend(groups[words])
                break
    return {split: sorted(chosen) for split, chosen in splits.items()}


def _convert(clip: Clip) -> None:
    if os.path.isfile(clip.wav):
        return
    tmp = f"{clip.wav}.{os.getpid()}.tmp"
    subprocess.run(sox_wav_command([clip.ogg], tmp), check=True)
    os.replace(tmp, clip.wav)


def prepare_fillets_cs(
    data_folder: str,
    save_folder: Optional[str] = None,
    seed: int = 1234,
    max_clips: Optional[int] = None,
    download_folder: Optional[str] = None,
    num_workers: int = 2,
) -> dict[str, str]:
    """Download, convert, clean and split the Czech Fish Fillets NG recordings.

    Arguments
    ---------
    data_folder : str
        Where the wavs go (``wav/cs/<ID>.wav``); the manifests refer to it as
        ``$data_root``.
    save_folder : str, optional
        Where the manifests and ``corpus.json`` go; default: ``data_folder``.
    seed : int
        Seed of the split (and of the subset drawn with ``max_clips``).
    max_clips : int, optional
        Keep only this many clean clips, drawn at random (for quick tests).
    download_folder : str, optional
        Cache of the Debian packages; default: ``<data_folder>/downloads``.
    num_workers : int
        Number of concurrent sox conversions.

    Returns
    -------
    dict
        ``{"train": path, "dev": path, "test": path}`` of the CSV manifests.

    Raises
    ------
    recipes.manifest.FolderNotOwnedError
        When ``data_folder`` or ``save_folder`` holds files that this recipe
        did not make (nothing is written then).
    recipes.executables.MissingExecutableError
        When ``sox`` (or, to download, ``apt-get``) is not installed.
    recipes.debian_sources.PackageDownloadError
        When a package cannot be downloaded.
    """
    save_folder = save_folder or data_folder
    download_folder = download_folder or os.path.join(data_folder, "downloads")
    options = {
        "seed": seed,
        "max_clips": max_clips,
        "split_fractions": SPLIT_FRACTIONS,
        "min_duration": MIN_DURATION,
    }
    paths = manifest_paths(save_folder, list(SPLIT_FRACTIONS))
    if is_prepared(save_folder, list(SPLIT_FRACTIONS), options, RECIPE):
        logger.info("Czech Fish Fillets NG is prepared in %s, skipping.", save_folder)
        return paths
    require_executables({"sox": "sox"})
    described = {"languages": ["cs"], "targets": ["cs"], "seed": seed}
    # Before anything is written (the default download cache is in data_folder).
    folders = claim_folders(
        [data_folder, save_folder], RECIPE, options, download_folder, **described
    )

    text_root = fetch_package(TEXT_PACKAGE, download_folder)
    speech_root = fetch_package(SPEECH_PACKAGE, download_folder)
    clips = find_clips(text_root, speech_root, data_folder)
    if max_clips is not None:
        draw = random.Random(f"{seed}:max_clips")
        clips = sorted(draw.sample(clips, min(max_clips, len(clips))))
    os.makedirs(os.path.join(data_folder, "wav", "cs"), exist_ok=True)
    with ThreadPool(max(1, num_workers)) as pool:
        jobs = pool.imap_unordered(_convert, clips, chunksize=4)
        for _ in tqdm(jobs, total=len(clips), desc="ogg -> wav", unit="clip"):
            pass

    rows = {}
    for split, chosen in split_clips(clips, seed).items():
        rows[split] = [
            {
                "ID": clip.utt_id,
                "duration": wav_duration(clip.wav),
                "wav": f"$data_root/wav/cs/{clip.utt_id}.wav",
                "spk_id": clip.spk_id,
                "lang": "cs",
                "wrd": clip.words,
            }
            for clip in chosen
        ]
        write_manifest(paths[split], rows[split])
    speakers = {split: sorted({r["spk_id"] for r in rows[split]}) for split in rows}
    write_record(folders, RECIPE, options, rows, **described, speakers=speakers)
    logger.info("Czech Fish Fillets NG manifests written to %s.", save_folder)
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    """Command-line entry point (see ``--help``).

    Arguments
    ---------
    argv : list of str, optional
        Arguments; default: ``sys.argv[1:]``.
    """
    parser = preparation_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max_clips", type=int, help="keep this many clips only")
    run_preparation(prepare_fillets_cs, parser, argv)


if __name__ == "__main__":
    main()

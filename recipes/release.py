"""What the recipes of downloaded corpora (Common Voice, FLEURS) share.

A recipe reads a corpus that the user downloaded (a *release*, never written
into) and lists its recordings as :class:`Clip` objects, each with its split,
language, speaker, raw sentence and audio file; :func:`build_manifests` turns
them into the SpeechBrain manifests of a ``save_folder``:

1. the sentence is normalised with
   :func:`speechbrain_meta.text.normalize_text` in the clip's language;
   sentences with digits or spoken symbols
   (:func:`speechbrain_meta.text.is_clean`) or empty after normalisation are
   skipped;
2. every audio file is checked to exist (``os.stat``, in a thread pool); a clip
   without a duration from the release's metadata has its header read
   (``soundfile.info``), in parallel with a progress bar;
3. clips of zero duration, or longer than ``max_duration``, are skipped;
4. the caps (:func:`apply_caps`: hours per speaker, then per language) are
   applied to the ``capped_splits``, in an order drawn with the seed;
5. the header of every kept clip not read yet is read, and an unreadable clip
   (a corrupt file) is skipped (after the caps: its share of a cap stays
   unused);
6. optionally (``convert_to_wav``), each kept clip is converted to a 16 kHz
   mono 16-bit wav, ``<save_folder>/wav/<lang>/<ID>.wav``, in parallel, each
   written to a temporary file and then renamed;
7. the manifests are written (atomically), then ``corpus.json`` with the
   counts of the skipped clips per language, split and reason
   (:data:`SKIP_REASONS`).

``wav`` is the absolute path of the release's file, or
``$data_root/wav/<lang>/<ID>.wav`` for a converted clip (``$data_root`` is the
``save_folder``, which ``train.py --data_folder`` names).

Example
-------
>>> clips = [
...     Clip(f"de_{i}", "train", "de", f"de_s{i % 2}", "Guten Tag!", "de", f"{i}.mp3",
...          duration=2.0)
...     for i in range(6)
... ]
>>> kept, dropped = apply_caps(clips, seed=1, max_hours_per_speaker=4.5 / 3600)
>>> len(kept), sorted({reason for _, reason in dropped})
(4, ['over_speaker_cap'])
"""

import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import soundfile
from tqdm import tqdm

from recipes.manifest import (
    RECORD_NAME,
    claim_folders,
    manifest_paths,
    wav_duration,
    write_manifest,
    write_record,
)
from recipes.preparation import SAMPLE_RATE, preparation_parser
from speechbrain_meta.audio import file_problem
from speechbrain_meta.errors import SetupError
from speechbrain_meta.text import is_clean, normalize_text

__all__ = [
    "SKIP_REASONS",
    "SPLITS",
    "Clip",
    "SkipCounts",
    "apply_caps",
    "build_manifests",
    "check_save_folder",
    "convert_clip",
    "drop_wavs_of_another_release",
    "probe_audio",
    "release_parser",
    "short_ids",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
# Why a clip is left out, in the order they are checked.
SKIP_REASONS = (
    "duplicate",  # the same clip listed twice (the first one is kept)
    "in_dev_or_test",  # Common Voice use_validated: speaker or sentence of dev/test
    "not_clean",  # digits or spoken symbols: transcript and speech differ
    "empty_text",  # nothing left after normalisation
    "missing",  # no audio file (or not a regular file)
    "unreadable",  # an audio file that soundfile cannot read (corrupt, empty)
    "empty_audio",  # zero duration
    "too_long",  # longer than max_duration
    "over_speaker_cap",  # beyond max_hours_per_speaker
    "over_language_cap",  # beyond max_hours_per_language
)
_CHUNK = 64  # files per task of the thread pools


@dataclass(frozen=True)
class Clip:
    """One recording of a release, before it is checked.

    Arguments
    ---------
    utt_id : str
        The manifest ID, unique in the corpus (e.g. ``fr_12345``).
    split : str
        ``train``, ``dev`` or ``test``.
    lang : str
        The manifest's ``lang`` (the task).
    spk_id : str
        The manifest's ``spk_id``.
    sentence : str
        The raw sentence, normalised later.
    text_language : str
        The language of the sentence, for :func:`normalize_text`.
    audio : str
        The absolute path of the audio file in the release.
    duration : float, optional
        Seconds, from the release's metadata; None: read from the header.
    """

    utt_id: str
    split: str
    lang: str
    spk_id: str
    sentence: str
    text_language: str
    audio: str
    duration: Optional[float] = None


class SkipCounts:
    """The clips left out, counted per language, split and reason.

    Example
    -------
    >>> skips = SkipCounts()
    >>> skips.add("fr", "train", "missing")
    >>> skips.add("fr", "train", "missing")
    >>> skips.add("de", "test", "too_long")
    >>> skips.as_dict()
    {'de': {'test': {'too_long': 1}}, 'fr': {'train': {'missing': 2}}}
    >>> skips.total()
    3
    """

    def __init__(self) -> None:
        self._counts = Counter()

    def add(self, lang: str, split: str, reason: str, count: int = 1) -> None:
        """Count ``count`` clips of ``lang`` and ``split`` left out for ``reason``.

        Arguments
        ---------
        lang : str
            The manifest language.
        split : str
            The split.
        reason : str
            One of :data:`SKIP_REASONS`.
        count : int
            How many.
        """
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self._counts[(lang, split, reason)] += count

    def as_dict(self) -> dict:
        """Return ``{lang: {split: {reason: count}}}``, sorted, without zeros."""
        result = {}
        order = {reason: rank for rank, reason in enumerate(SKIP_REASONS)}
        keys = sorted(
            self._counts, key=lambda k: (k[0], SPLITS.index(k[1]), order[k[2]])
        )
        for lang, split, reason in keys:
            if self._counts[(lang, split, reason)]:
                result.setdefault(lang, {}).setdefault(split, {})[reason] = (
                    self._counts[(lang, split, reason)]
                )
        return result

    def total(self) -> int:
        """Return the number of clips left out."""
        return sum(self._counts.values())

    def log(self) -> None:
        """Log one line per language and split that lost clips."""
        for lang, splits in self.as_dict().items():
            for split, reasons in splits.items():
                shown = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
                logger.info("%s %s: skipped %s.", lang, split, shown)


def short_ids(values: Iterable[str], prefix: str, length: int = 12) -> dict:
    """Map long identifiers to ``<prefix>_<hex>``, short, unique and stable.

    The hex digits are the first ``length`` of the SHA-256 of the value; if
    two values share them, all of them get 4 more digits, until none do.

    Arguments
    ---------
    values : iterable of str
        The identifiers (e.g. Common Voice ``client_id`` hashes).
    prefix : str
        Prepended with ``_`` (e.g. the locale).
    length : int
        The number of hex digits.

    Returns
    -------
    dict
        ``{value: short id}``.

    Example
    -------
    >>> short_ids(["client-1", "client-2"], "fr")
    {'client-1': 'fr_5704de18fc60', 'client-2': 'fr_66c4d728fb28'}
    """
    digests = {v: hashlib.sha256(v.encode("utf-8")).hexdigest() for v in values}
    while True:
        shown = {value: digest[:length] for value, digest in digests.items()}
        if len(set(shown.values())) == len(shown) or length >= 64:
            return {value: f"{prefix}_{short}" for value, short in shown.items()}
        length += 4


def check_save_folder(save_folder: Optional[str], release: str, option: str) -> str:
    """Refuse a missing ``save_folder``, or one inside the release (read only).

    Arguments
    ---------
    save_folder : str or None
        Where the manifests would go.
    release : str
        The user's download.
    option : str
        The name of the release's option, for the message (``--data_folder``).

    Returns
    -------
    str
        ``save_folder``.

    Raises
    ------
    SetupError
        If ``save_folder`` is None, the release, or inside it.
    """
    if not save_folder:
        raise SetupError(
            f"--save_folder is required: the release in {option} {release} is "
            "read only, so the manifests need a folder of their own."
        )
    saved = Path(os.path.realpath(save_folder))
    source = Path(os.path.realpath(release))
    if saved == source or source in saved.parents:
        raise SetupError(
            f"--save_folder {save_folder} is inside the release {release}, which "
            "is never written into: choose a --save_folder outside it."
        )
    return save_folder


def _stat_one(path: str) -> Optional[str]:
    problem = file_problem(path)
    if problem is None or problem == "empty file (0 bytes)":
        return None if problem is None else "unreadable"
    return "missing"


def _header_one(path: str) -> tuple:
    """``(duration, None)`` from the header of ``path``, or ``(None, reason)``."""
    problem = _stat_one(path)
    if problem is not None:
        return None, problem
    try:
        return wav_duration(path), None
    except Exception:  # libsndfile errors on a corrupt file
        return None, "unreadable"


def _parallel(
    function: Callable, items: Sequence, num_workers: int, desc: str, unit: str
) -> list:
    """``[function(item) for item in items]`` in a thread pool, with a bar."""
    if not items:
        return []
    with ThreadPool(max(1, num_workers)) as pool:
        jobs = pool.imap(function, items, chunksize=_CHUNK)
        bar = tqdm(jobs, total=len(items), desc=desc, unit=unit, leave=False)
        return list(bar)


def probe_audio(
    paths: Sequence[str], num_workers: int = 2, header: bool = True
) -> dict:
    """Check audio files in parallel: do they exist, and how long are they.

    Arguments
    ---------
    paths : sequence of str
        Audio files.
    num_workers : int
        Threads.
    header : bool
        If True, read each header (``soundfile.info``); if False, only
        ``os.stat`` each file (fast).

    Returns
    -------
    dict
        ``{path: (duration or None, reason or None)}``; ``reason`` is
        ``"missing"`` or ``"unreadable"`` (also a file of 0 bytes).

    Example
    -------
    >>> probe_audio(["/nonexistent.mp3"])
    {'/nonexistent.mp3': (None, 'missing')}
    """
    paths = list(dict.fromkeys(paths))
    if header:
        results = _parallel(_header_one, paths, num_workers, "Audio headers", "file")
    else:
        found = _parallel(_stat_one, paths, num_workers, "Audio files", "file")
        results = [(None, problem) for problem in found]
    return dict(zip(paths, results))


def apply_caps(
    clips: Sequence[Clip],
    seed: int,
    max_hours_per_language: Optional[float] = None,
    max_hours_per_speaker: Optional[float] = None,
    capped_splits: Sequence[str] = ("train",),
) -> tuple:
    """Keep at most so many hours per speaker and per language, drawn with ``seed``.

    The clips of each language and split in ``capped_splits`` are shuffled
    (sorted by ID first, then shuffled with ``seed``, the language and the
    split) and taken in that order: a clip is left out if its speaker would
    exceed ``max_hours_per_speaker``, else if its language would exceed
    ``max_hours_per_language`` (in that split). The other splits are kept
    whole. Every clip needs a ``duration``.

    Arguments
    ---------
    clips : sequence of Clip
        The clips, with durations.
    seed : int
        The seed of the order.
    max_hours_per_language : float, optional
        Hours per language and split; None: no cap.
    max_hours_per_speaker : float, optional
        Hours per speaker and split; None: no cap.
    capped_splits : sequence of str
        The splits capped.

    Returns
    -------
    tuple
        ``(kept, dropped)``: the kept clips in their input order, and
        ``[(clip, reason)]`` with reason ``over_speaker_cap`` or
        ``over_language_cap``.
    """
    if max_hours_per_language is None and max_hours_per_speaker is None:
        return list(clips), []
    groups = defaultdict(list)
    for clip in clips:
        if clip.split in capped_splits:
            groups[(clip.lang, clip.split)].append(clip)
    # In seconds, with a margin for the rounding of the sums.
    speaker_limit = _seconds(max_hours_per_speaker)
    language_limit = _seconds(max_hours_per_language)
    dropped = {}
    for (lang, split), group in sorted(groups.items()):
        order = sorted(group, key=lambda c: c.utt_id)
        random.Random(f"{seed}:{lang}:{split}").shuffle(order)
        language_seconds = 0.0
        speaker_seconds = Counter()
        for clip in order:
            if speaker_seconds[clip.spk_id] + clip.duration > speaker_limit:
                dropped[clip.utt_id] = "over_speaker_cap"
            elif language_seconds + clip.duration > language_limit:
                dropped[clip.utt_id] = "over_language_cap"
            else:
                speaker_seconds[clip.spk_id] += clip.duration
                language_seconds += clip.duration
    kept = [clip for clip in clips if clip.utt_id not in dropped]
    removed = [(clip, dropped[clip.utt_id]) for clip in clips if clip.utt_id in dropped]
    return kept, removed


def _seconds(hours: Optional[float]) -> float:
    return float("inf") if hours is None else hours * 3600 + 1e-6


def convert_clip(source: str, wav: str) -> Optional[str]:
    """Write ``source`` as a 16 kHz mono 16-bit wav, unless ``wav`` exists.

    The audio is read with soundfile (mp3, wav, flac, ogg...), down-mixed to
    mono, resampled with ``torchaudio.functional.resample`` and written to a
    temporary file in the folder of ``wav``, then renamed.

    Arguments
    ---------
    source : str
        The audio file.
    wav : str
        The wav file to write.

    Returns
    -------
    str or None
        None when ``wav`` is there, else ``"unreadable"``.
    """
    if os.path.isfile(wav):
        return None
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception:
        return "unreadable"
    samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional

        resampled = torchaudio.functional.resample(
            torch.from_numpy(np.ascontiguousarray(samples)), rate, SAMPLE_RATE
        )
        samples = resampled.numpy()
    samples = np.clip(samples, -1.0, 1.0)
    folder, name = os.path.split(wav)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    soundfile.write(tmp, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, wav)
    return None


def _convert_job(job: tuple) -> Optional[str]:
    return convert_clip(*job)


def _prune_wavs(save_folder: str, keep: set) -> None:
    """Remove the recipe's own wavs (and temporary files) that no row uses."""
    root = Path(save_folder, "wav")
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in folder.iterdir():
            own = path.suffix == ".wav" or path.name.endswith(".tmp")
            if path.is_file() and own and str(path) not in keep:
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def _shared_speakers(rows: dict) -> dict:
    """``{lang: number of spk_id values found in more than one split}``."""
    splits_of = defaultdict(set)
    for split, split_rows in rows.items():
        for row in split_rows:
            splits_of[(row["lang"], row["spk_id"])].add(split)
    shared = Counter(lang for (lang, _), found in splits_of.items() if len(found) > 1)
    return dict(sorted(shared.items()))


def drop_wavs_of_another_release(save_folder: str, recipe: str, release: str) -> None:
    """Remove the converted wavs of a save folder built from another release.

    Converted wavs are reused by a rebuild (an interrupted conversion
    resumes), which is right only for the same release: call this after
    :func:`recipes.manifest.check_folder` and before
    :func:`recipes.manifest.claim_folders` (which replaces the record).

    Arguments
    ---------
    save_folder : str
        The recipe's save folder.
    recipe : str
        The recipe's name.
    release : str
        The real path of the release about to be prepared (``options["release"]``).
    """
    try:
        with open(os.path.join(save_folder, RECORD_NAME), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or record.get("recipe") != recipe:
        return
    previous = (record.get("options") or {}).get("release")
    wav = os.path.join(save_folder, "wav")
    if previous != release and os.path.isdir(wav):
        logger.info("%s was built from %s: removing its wavs.", save_folder, previous)
        shutil.rmtree(wav)


def release_parser(description: str):
    """The command line of a recipe that reads a download it never writes into.

    A :func:`recipes.preparation.preparation_parser` with ``--save_folder``
    required and the options of :func:`build_manifests` (the caps,
    ``--capped_splits``, ``--max_duration``, ``--convert_to_wav``); the
    recipe adds its own.

    Arguments
    ---------
    description : str
        What the recipe builds.

    Returns
    -------
    argparse.ArgumentParser
        The parser.

    Example
    -------
    >>> args = release_parser("Build.").parse_args(
    ...     ["--data_folder", "cv", "--save_folder", "out", "--max_duration", "20"]
    ... )
    >>> args.max_duration, args.capped_splits, args.convert_to_wav
    (20.0, ['train'], False)
    """
    parser = preparation_parser(description)
    for action in parser._actions:
        if "--save_folder" in action.option_strings:
            action.required = True
            action.help = "manifest folder (not inside --data_folder)"
    parser.add_argument("--max_hours_per_language", type=float)
    parser.add_argument("--max_hours_per_speaker", type=float)
    parser.add_argument("--capped_splits", nargs="+", default=["train"])
    parser.add_argument("--max_duration", type=float, default=30.0)
    parser.add_argument(
        "--convert_to_wav", action="store_true", help="16 kHz wavs in save_folder"
    )
    return parser


def _check_texts(clips: Sequence[Clip], skips: SkipCounts) -> list:
    """Normalise each sentence; count duplicates and bad sentences."""
    seen = set()
    result = []
    for clip in clips:
        if clip.utt_id in seen:
            skips.add(clip.lang, clip.split, "duplicate")
            continue
        seen.add(clip.utt_id)
        if not is_clean(clip.sentence):
            skips.add(clip.lang, clip.split, "not_clean")
            continue
        words = normalize_text(clip.sentence, clip.text_language)
        if not words:
            skips.add(clip.lang, clip.split, "empty_text")
            continue
        result.append((clip, words))
    return result


def _keep_audio(
    clips: Sequence[Clip], skips: SkipCounts, max_duration: Optional[float], workers
) -> tuple:
    """Check existence and durations; return the usable clips and the read ones."""
    exists = probe_audio([c.audio for c in clips], workers, header=False)
    present = []
    for clip in clips:
        problem = exists[clip.audio][1]
        if problem is not None:
            skips.add(clip.lang, clip.split, problem)
        else:
            present.append(clip)
    unknown = [c.audio for c in present if c.duration is None]
    headers = probe_audio(unknown, workers, header=True)
    usable = []
    for clip in present:
        if clip.duration is None:
            duration, problem = headers[clip.audio]
            if problem is not None:
                skips.add(clip.lang, clip.split, problem)
                continue
            clip = replace(clip, duration=duration)
        if clip.duration <= 0:
            skips.add(clip.lang, clip.split, "empty_audio")
        elif max_duration is not None and clip.duration > max_duration:
            skips.add(clip.lang, clip.split, "too_long")
        else:
            usable.append(clip)
    return usable, set(headers)


def build_manifests(
    clips: Sequence[Clip],
    skips: SkipCounts,
    save_folder: str,
    recipe: str,
    options: dict,
    described: dict,
    num_workers: int = 2,
) -> dict:
    """Claim the save folder; check, cap, optionally convert; write manifests.

    See the module's documentation for the steps. The save folder is claimed
    (:func:`recipes.manifest.claim_folders`) after the wavs of another
    release are dropped (:func:`drop_wavs_of_another_release`).

    Arguments
    ---------
    clips : sequence of Clip
        Every clip of the release that the recipe read, in a stable order.
    skips : SkipCounts
        The clips the recipe left out already; the others are added.
    save_folder : str
        Where the manifests (and ``wav/``) go.
    recipe : str
        The recipe's name.
    options : dict
        The recipe's options, recorded (a rerun with equal ones is skipped)
        and read: ``release``, ``seed`` (of the caps), ``max_duration``
        (seconds; longer clips are skipped), ``max_hours_per_language`` and
        ``max_hours_per_speaker`` (:func:`apply_caps`), ``capped_splits``,
        ``convert_to_wav`` (16 kHz mono wavs in ``<save_folder>/wav/<lang>/``).
    described : dict
        Further fields of ``corpus.json`` (languages, targets...).
    num_workers : int
        Threads that read headers and convert.

    Returns
    -------
    dict
        ``{split: manifest path}``.
    """
    drop_wavs_of_another_release(save_folder, recipe, options["release"])
    folders = claim_folders([save_folder], recipe, options, **described)
    seed, max_duration = options["seed"], options["max_duration"]
    max_hours_per_language = options["max_hours_per_language"]
    max_hours_per_speaker = options["max_hours_per_speaker"]
    capped_splits, convert_to_wav = options["capped_splits"], options["convert_to_wav"]
    checked = _check_texts(clips, skips)
    words = {clip.utt_id: text for clip, text in checked}
    usable, read = _keep_audio(
        [c for c, _ in checked], skips, max_duration, num_workers
    )
    kept, dropped = apply_caps(
        usable, seed, max_hours_per_language, max_hours_per_speaker, capped_splits
    )
    for clip, reason in dropped:
        skips.add(clip.lang, clip.split, reason)
    unread = [c.audio for c in kept if c.audio not in read]
    headers = probe_audio(unread, num_workers, header=True)
    readable = []
    for clip in kept:
        problem = headers[clip.audio][1] if clip.audio in headers else None
        if problem is not None:
            skips.add(clip.lang, clip.split, problem)
        else:
            readable.append(clip)

    wavs = {}
    if convert_to_wav:
        for lang in sorted({clip.lang for clip in readable}):
            os.makedirs(os.path.join(save_folder, "wav", lang), exist_ok=True)
        jobs = [
            (
                clip.audio,
                os.path.join(save_folder, "wav", clip.lang, f"{clip.utt_id}.wav"),
            )
            for clip in readable
        ]
        results = _parallel(_convert_job, jobs, num_workers, "To 16 kHz wav", "clip")
        converted = []
        for clip, (_, wav), problem in zip(readable, jobs, results):
            if problem is not None:
                skips.add(clip.lang, clip.split, problem)
            else:
                wavs[clip.utt_id] = wav
                converted.append(clip)
        readable = converted
    _prune_wavs(save_folder, set(wavs.values()))

    splits = sorted({clip.split for clip in clips} | set(SPLITS), key=SPLITS.index)
    rows = {split: [] for split in splits}
    for clip in sorted(readable, key=lambda c: c.utt_id):
        if clip.utt_id in wavs:
            wav = f"$data_root/wav/{clip.lang}/{clip.utt_id}.wav"
            duration = wav_duration(wavs[clip.utt_id])
        else:
            wav, duration = clip.audio, round(clip.duration, 4)
        rows[clip.split].append(
            {
                "ID": clip.utt_id,
                "duration": duration,
                "wav": wav,
                "spk_id": clip.spk_id,
                "lang": clip.lang,
                "wrd": words[clip.utt_id],
            }
        )
    paths = manifest_paths(save_folder, splits)
    for split in splits:
        write_manifest(paths[split], rows[split])
    skips.log()
    speakers = {
        split: {
            lang: len({r["spk_id"] for r in rows[split] if r["lang"] == lang})
            for lang in sorted({r["lang"] for r in rows[split]})
        }
        for split in splits
    }
    shared = _shared_speakers(rows)
    for lang, count in shared.items():
        logger.warning(
            "%s: %d spk_id values are in more than one split (the release's "
            "splits are not speaker-disjoint).",
            lang,
            count,
        )
    write_record(
        folders,
        recipe,
        options,
        rows,
        **described,
        speakers=speakers,
        shared_speakers=shared,
        skipped=skips.as_dict(),
        skipped_total=skips.total(),
    )
    logger.info(
        "%s manifests written to %s (%s clips, %d skipped).",
        recipe,
        save_folder,
        sum(map(len, rows.values())),
        skips.total(),
    )
    return paths

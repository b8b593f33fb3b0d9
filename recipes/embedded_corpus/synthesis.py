"""Reads sentences aloud with espeak-ng and writes 16 kHz mono 16-bit wav files.

Each utterance is planned first (:func:`plan_split`): a speaker (an espeak-ng
voice variant with a base pitch and rate) and a per-utterance pitch, rate and
gain jitter, all drawn from a seeded generator, so that a seed determines the
whole corpus. Its ID hashes everything that shapes the audio, so an existing
wav is always the right one and is reused.

Synthesis runs ``espeak-ng`` then ``sox`` in subprocesses; a thread pool keeps
``num_workers`` of them busy (the work happens outside Python). Each wav is
written to a temporary file and renamed, so an interrupted run never leaves a
truncated wav behind.

Example
-------
>>> speakers = [{"variant": "m1", "pitch": 45, "rate": 165},
...             {"variant": "f1", "pitch": 55, "rate": 165}]
>>> jitter = {"pitch": 6, "rate": 0.08, "volume": [0.5, 1.0]}
>>> plan = plan_split("de", "de", "train", ["Guten Tag.", "Wie geht es?"],
...                   speakers, jitter, seed=1, wav_folder="/data/wav")
>>> [(u.spk_id, u.words) for u in plan]
[('de_m1', 'guten tag'), ('de_f1', 'wie geht es')]
>>> plan[0].wav  # doctest: +ELLIPSIS
'/data/wav/de/de_m1_....wav'
"""

import hashlib
import os
import random
import subprocess
from multiprocessing.pool import ThreadPool
from typing import NamedTuple

from tqdm import tqdm

from recipes.preparation import sox_wav_command
from speechbrain_meta.text import normalize_text

__all__ = [
    "SynthesisError",
    "Utterance",
    "espeak_voices",
    "plan_split",
    "synthesize",
    "synthesize_all",
]


class SynthesisError(RuntimeError):
    """espeak-ng or sox failed on an utterance."""


class Utterance(NamedTuple):
    """Everything needed to synthesise one utterance and list it in a manifest."""

    utt_id: str
    lang: str
    spk_id: str
    voice: str
    pitch: int
    rate: int
    volume: float
    text: str
    words: str
    wav: str


def plan_split(
    lang: str,
    voice: str,
    split: str,
    sentences: list[str],
    speakers: list[dict],
    jitter: dict,
    seed: int,
    wav_folder: str,
) -> list[Utterance]:
    """Assign speakers and prosody to the sentences of one language and split.

    Speakers take turns (so they have equal shares); pitch, rate and gain are
    jittered around the speaker's base with a generator seeded by ``seed``,
    ``lang`` and ``split``.

    Arguments
    ---------
    lang : str
        Language code, prefix of the speaker IDs.
    voice : str
        espeak-ng voice of the language (``de``, ``pt-br``...).
    split : str
        Split name (seeds the jitter).
    sentences : list of str
        Raw sentences to read.
    speakers : list of dict
        ``variant`` (espeak-ng voice variant), ``pitch`` (0-99), ``rate`` (words
        per minute) of each speaker of the split.
    jitter : dict
        ``pitch`` (maximum offset), ``rate`` (maximum relative change) and
        ``volume`` (range of the gain).
    seed : int
        Random seed.
    wav_folder : str
        Folder of the wavs; utterances go to ``<wav_folder>/<lang>/<ID>.wav``.

    Returns
    -------
    list of Utterance
        One per sentence, in order.
    """
    rng = random.Random(f"{seed}:{lang}:{split}")
    plan = []
    for index, text in enumerate(sentences):
        speaker = speakers[index % len(speakers)]
        pitch = speaker["pitch"] + rng.randint(-jitter["pitch"], jitter["pitch"])
        pitch = min(99, max(0, pitch))
        rate_factor = rng.uniform(1 - jitter["rate"], 1 + jitter["rate"])
        rate = round(speaker["rate"] * rate_factor)
        volume = round(rng.uniform(*jitter["volume"]), 2)
        variant_voice = f"{voice}+{speaker['variant']}"
        spk_id = f"{lang}_{speaker['variant']}"
        key = f"{variant_voice}|{pitch}|{rate}|{volume}|{text}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
        utt_id = f"{spk_id}_{digest}"
        wav = os.path.join(wav_folder, lang, f"{utt_id}.wav")
        plan.append(
            Utterance(
                utt_id,
                lang,
                spk_id,
                variant_voice,
                pitch,
                rate,
                volume,
                text,
                normalize_text(text),
                wav,
            )
        )
    return plan


def espeak_voices() -> set[str]:
    """Return the language voices of espeak-ng (``de``, ``en-us``, ``pt-br``...).

    Returns
    -------
    set of str
        The codes of the "Language" column of ``espeak-ng --voices``.
    """
    listing = subprocess.run(
        ["espeak-ng", "--voices"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[1] for line in listing.splitlines()[1:] if line.strip()}


def synthesize(utterance: Utterance) -> str:
    """Write the wav of an utterance unless it exists already.

    Arguments
    ---------
    utterance : Utterance
        The planned utterance.

    Returns
    -------
    str
        The wav path.

    Raises
    ------
    SynthesisError
        When espeak-ng or sox fails.
    """
    if os.path.isfile(utterance.wav):
        return utterance.wav
    os.makedirs(os.path.dirname(utterance.wav), exist_ok=True)
    espeak = subprocess.run(
        [
            "espeak-ng",
            "-v",
            utterance.voice,
            "-p",
            str(utterance.pitch),
            "-s",
            str(utterance.rate),
            "--stdout",
        ],
        input=utterance.text.encode("utf-8"),
        capture_output=True,
    )
    if espeak.returncode != 0 or not espeak.stdout:
        raise SynthesisError(
            f"espeak-ng failed on {utterance.utt_id}: {espeak.stderr.decode().strip()}"
        )
    tmp = f"{utterance.wav}.{os.getpid()}.tmp"
    sox = subprocess.run(
        sox_wav_command(["-t", "wav", "-"], tmp, ["vol", str(utterance.volume)]),
        input=espeak.stdout,
        capture_output=True,
    )
    if sox.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SynthesisError(
            f"sox failed on {utterance.utt_id}: {sox.stderr.decode().strip()}"
        )
    os.replace(tmp, utterance.wav)
    return utterance.wav


def synthesize_all(utterances: list[Utterance], num_workers: int = 2) -> None:
    """Synthesise utterances in parallel, with a progress bar.

    Arguments
    ---------
    utterances : list of Utterance
        What to synthesise; existing wavs are kept.
    num_workers : int
        Number of concurrent espeak-ng | sox jobs.
    """
    todo = [u for u in utterances if not os.path.isfile(u.wav)]
    with ThreadPool(max(1, num_workers)) as pool:
        jobs = pool.imap_unordered(synthesize, todo, chunksize=4)
        for _ in tqdm(jobs, total=len(todo), desc="espeak-ng", unit="utt"):
            pass

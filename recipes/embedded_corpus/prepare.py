"""Builds the embedded multilingual corpus: SpeechBrain manifests and 16 kHz wavs.

Natural sentences from Debian text packages (fortunes, klavaro, Fish Fillets NG
dialogues) are read by espeak-ng with several voice variants per language. The
languages, held-out targets, sentence sources, voices and sizes are set in
``corpus.yaml``; see docs/corpora.md.

Outputs:

* ``<data_folder>/wav/<lang>/<ID>.wav``: 16 kHz mono 16-bit audio;
* ``<save_folder>/{train,dev,test}.csv``: manifests with the columns
  ``ID,duration,wav,spk_id,lang,wrd`` (``wav`` starts with ``$data_root``);
  every language is in every manifest, with its ``lang``;
* ``<save_folder>/corpus.json``: options, languages, targets and per-split,
  per-language utterance counts and hours.

Speakers and sentences are disjoint between splits. A rerun with the same
options returns at once; an interrupted run is completed by a rerun (existing
wavs are reused).

The recipe writes only into folders it owns (see :mod:`recipes.manifest`):
``data_folder`` and ``save_folder`` must each be missing, empty, or hold a
``corpus.json`` of this recipe (``"recipe": "embedded_corpus"``, or a record of
an earlier version with the same option keys). A folder with anything else in
it, such as a user's own manifests or a Czech Fish Fillets folder, raises
:class:`recipes.manifest.FolderNotOwnedError` before anything is written (pass
``--skip_prep True`` to train on those manifests, or choose another folder).
Before the first download or wav, ``corpus.json`` marks the build as in
progress; the complete record is written last.

Command line (from the repository root)::

    python -m recipes.embedded_corpus.prepare --data_folder data/embedded --size demo

Example
-------
>>> from speechbrain.utils.distributed import run_on_main
>>> manifests = run_on_main(
...     prepare_embedded_corpus,
...     kwargs={"data_folder": "data/embedded", "size": "tiny"},
... )  # doctest: +SKIP
>>> sorted(manifests)  # doctest: +SKIP
['dev', 'test', 'train']
"""

import logging
import os
import random
from typing import Optional

from recipes.embedded_corpus.config import (
    SPLITS,
    UnknownLanguageError,
    config_digest,
    load_config,
    resolve_build,
)
from recipes.embedded_corpus.sentences import NotEnoughTextError, language_sentences
from recipes.embedded_corpus.synthesis import (
    Utterance,
    espeak_voices,
    plan_split,
    synthesize_all,
)
from recipes.executables import require_executables
from recipes.manifest import (
    claim_folders,
    is_prepared,
    manifest_paths,
    wav_duration,
    write_manifest,
    write_record,
)
from recipes.preparation import preparation_parser, run_preparation

__all__ = ["RECIPE", "prepare_embedded_corpus"]

RECIPE = "embedded_corpus"

logger = logging.getLogger(__name__)


def _manifest_row(utterance: Utterance) -> dict:
    return {
        "ID": utterance.utt_id,
        "duration": wav_duration(utterance.wav),
        "wav": f"$data_root/wav/{utterance.lang}/{utterance.utt_id}.wav",
        "spk_id": utterance.spk_id,
        "lang": utterance.lang,
        "wrd": utterance.words,
    }


def prepare_embedded_corpus(
    data_folder: str,
    save_folder: Optional[str] = None,
    size: str = "demo",
    languages: Optional[list[str]] = None,
    targets: Optional[list[str]] = None,
    seed: int = 1234,
    num_workers: int = 2,
    download_folder: Optional[str] = None,
) -> dict[str, str]:
    """Build (or complete, or reuse) the embedded corpus.

    Arguments
    ---------
    data_folder : str
        Where the audio goes (``wav/<lang>/<ID>.wav``); the manifests refer to
        it as ``$data_root``.
    save_folder : str, optional
        Where the manifests and ``corpus.json`` go; default: ``data_folder``.
    size : str
        ``tiny`` (tests), ``demo`` (default) or ``full``; see ``corpus.yaml``.
    languages : list of str, optional
        Languages to build; default: all those of ``corpus.yaml``.
    targets : list of str, optional
        Held-out target languages (built too); default: the configured targets
        among ``languages``.
    seed : int
        Seed of the sentence, speaker and prosody draws: the same seed gives
        the same manifests.
    num_workers : int
        Number of concurrent synthesis jobs.
    download_folder : str, optional
        Cache of the Debian text packages; default: ``<data_folder>/downloads``.

    Returns
    -------
    dict
        ``{"train": path, "dev": path, "test": path}`` of the CSV manifests.

    Raises
    ------
    recipes.manifest.FolderNotOwnedError
        When ``data_folder`` or ``save_folder`` holds files that this recipe
        did not make (nothing is written then).
    recipes.embedded_corpus.config.UnknownSizeError
        When ``size`` is not defined in ``corpus.yaml``.
    recipes.embedded_corpus.config.UnknownLanguageError
        When a language is not in ``corpus.yaml`` or espeak-ng lacks its voice.
    recipes.executables.MissingExecutableError
        When ``espeak-ng`` or ``sox`` is not installed.
    recipes.embedded_corpus.sentences.NotEnoughTextError
        When a sentence source has no usable text or a language has fewer
        sentences than the size needs.
    recipes.debian_sources.PackageDownloadError
        When a Debian text package cannot be downloaded.
    """
    save_folder = save_folder or data_folder
    download_folder = download_folder or os.path.join(data_folder, "downloads")
    config = load_config()
    plan = resolve_build(config, languages, targets, size)
    options = {
        "size": plan.size,
        "languages": plan.languages,
        "targets": plan.targets,
        "seed": seed,
        "config": config_digest(config),
    }
    paths = manifest_paths(save_folder, SPLITS)
    if is_prepared(save_folder, SPLITS, options, RECIPE):
        logger.info("Embedded corpus already prepared in %s, skipping.", save_folder)
        return paths
    require_executables({"espeak-ng": "espeak-ng", "sox": "sox"})
    settings = config["language_settings"]
    voices = espeak_voices()
    for lang in plan.languages:
        if settings[lang]["voice"] not in voices:
            raise UnknownLanguageError(
                f"espeak-ng has no voice '{settings[lang]['voice']}' for language "
                f"'{lang}'."
            )
    described = {
        "languages": plan.languages,
        "targets": plan.targets,
        "size": plan.size,
        "seed": seed,
    }
    # Before anything is written (the default download cache is in data_folder).
    folders = claim_folders(
        [data_folder, save_folder], RECIPE, options, download_folder, **described
    )

    utterances = {split: [] for split in SPLITS}
    wav_folder = os.path.join(data_folder, "wav")
    for lang in plan.languages:
        sentences = language_sentences(
            lang, settings[lang], config["sentences"], download_folder
        )
        counts = plan.counts[lang]
        if len(sentences) < sum(counts.values()):
            raise NotEnoughTextError(
                f"Language '{lang}' has {len(sentences)} usable sentences but the "
                f"'{size}' size needs {sum(counts.values())}."
            )
        random.Random(f"{seed}:{lang}").shuffle(sentences)
        start = 0
        for split in SPLITS:
            chosen = sentences[start : start + counts[split]]
            start += counts[split]
            utterances[split] += plan_split(
                lang,
                settings[lang]["voice"],
                split,
                chosen,
                config["speakers"][split],
                config["jitter"],
                seed,
                wav_folder,
            )
    logger.info(
        "Synthesising %d utterances in %d languages.",
        sum(map(len, utterances.values())),
        len(plan.languages),
    )
    synthesize_all([u for split in SPLITS for u in utterances[split]], num_workers)

    rows = {}
    for split in SPLITS:
        rows[split] = [_manifest_row(u) for u in utterances[split]]
        write_manifest(paths[split], rows[split])
    write_record(folders, RECIPE, options, rows, **described)
    logger.info("Embedded corpus manifests written to %s.", save_folder)
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    """Command-line entry point (see ``--help``).

    Arguments
    ---------
    argv : list of str, optional
        Arguments; default: ``sys.argv[1:]``.
    """
    parser = preparation_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="demo", help="tiny, demo or full")
    parser.add_argument("--languages", nargs="+", help="languages to build")
    parser.add_argument("--targets", nargs="+", help="held-out target languages")
    run_preparation(prepare_embedded_corpus, parser, argv)


if __name__ == "__main__":
    main()

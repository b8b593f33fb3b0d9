"""Tests of the embedded corpus recipe (recipes/embedded_corpus)."""

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from recipes.debian_sources import fetch_package
from recipes.embedded_corpus import config as corpus_config
from recipes.embedded_corpus.config import (
    SPLITS,
    UnknownLanguageError,
    UnknownSizeError,
    load_config,
)
from recipes.embedded_corpus.prepare import main, prepare_embedded_corpus
from recipes.embedded_corpus.sentences import NotEnoughTextError
from recipes.executables import MissingExecutableError
from recipes.fillets_dialogs import read_dialogs
from speechbrain_meta.text import normalize_text

SMALL = {"size": "tiny", "languages": ["nl"], "targets": ["pt"]}


@pytest.fixture(scope="module")
def rows(tiny_corpus, load_manifest):
    return {
        split: load_manifest(tiny_corpus[split], tiny_corpus["data_folder"])
        for split in SPLITS
    }


def manifest_bytes(folder) -> dict:
    return {split: Path(folder, f"{split}.csv").read_bytes() for split in SPLITS}


def use_config(monkeypatch, tmp_path, edit) -> None:
    """Make the recipe read a copy of corpus.yaml changed by ``edit(config)``."""
    config = load_config()
    edit(config)
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(corpus_config, "CONFIG_FILE", path)


def test_manifests_and_audio(rows, tiny_corpus):
    # load_manifest parsed each manifest with SpeechBrain and checked each wav.
    sizes = load_config()["sizes"]["tiny"]
    for split in SPLITS:
        per_lang = defaultdict(int)
        for row in rows[split]:
            per_lang[row["lang"]] += 1
            assert row["wav"] == f"$data_root/wav/{row['lang']}/{row['ID']}.wav"
            assert row["wrd"] == normalize_text(row["wrd"])
        for lang in tiny_corpus["languages"]:
            role = "target" if lang in tiny_corpus["targets"] else "source"
            assert per_lang[lang] == sizes[role][split]


def test_speakers_disjoint_between_splits(rows):
    speakers = {split: {row["spk_id"] for row in rows[split]} for split in SPLITS}
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    for split in SPLITS:
        for row in rows[split]:
            assert row["spk_id"].startswith(f"{row['lang']}_")
            assert row["ID"].startswith(f"{row['spk_id']}_")
        per_lang = defaultdict(set)
        for row in rows[split]:
            per_lang[row["lang"]].add(row["spk_id"])
        assert min(map(len, per_lang.values())) >= 2


def test_sentences_disjoint_between_splits(rows):
    sentences = {
        split: [(row["lang"], row["wrd"]) for row in rows[split]] for split in SPLITS
    }
    everything = [pair for split in SPLITS for pair in sentences[split]]
    assert len(everything) == len(set(everything))


def test_targets_recorded(rows, tiny_corpus):
    record = json.loads(Path(tiny_corpus["save_folder"], "corpus.json").read_text())
    assert record["targets"] == ["cs", "pt"]
    assert len(record["languages"]) >= 10
    assert record["size"] == "tiny" and record["seed"] == 1234
    for split in SPLITS:
        assert {row["lang"] for row in rows[split]} == set(record["languages"])
        for lang, stats in record["splits"][split].items():
            count = sum(row["lang"] == lang for row in rows[split])
            assert stats["utterances"] == count and stats["hours"] > 0


def test_czech_game_lines_never_used_as_text(rows, download_folder):
    fillets = fetch_package("fillets-ng-data", download_folder)
    game_lines = {normalize_text(line.text) for line in read_dialogs(fillets, "cs")}
    czech = [
        row["wrd"] for split in SPLITS for row in rows[split] if row["lang"] == "cs"
    ]
    assert czech and not set(czech) & game_lines


def test_rerun_is_skipped_without_tools(tiny_corpus, monkeypatch):
    before = {s: os.stat(tiny_corpus[s]).st_mtime_ns for s in SPLITS}
    monkeypatch.setattr(shutil, "which", lambda name: None)
    paths = prepare_embedded_corpus(tiny_corpus["data_folder"], size="tiny")
    assert paths == {s: tiny_corpus[s] for s in SPLITS}
    assert before == {s: os.stat(tiny_corpus[s]).st_mtime_ns for s in SPLITS}


def test_same_seed_same_manifests(tiny_corpus, tmp_path, download_folder):
    same = prepare_embedded_corpus(
        str(tmp_path / "same"), size="tiny", download_folder=download_folder
    )
    assert manifest_bytes(tmp_path / "same") == manifest_bytes(
        tiny_corpus["save_folder"]
    )
    other = prepare_embedded_corpus(
        str(tmp_path / "other"), size="tiny", seed=4321, download_folder=download_folder
    )
    for split in SPLITS:
        assert Path(same[split]).read_bytes() != Path(other[split]).read_bytes()


def test_interrupted_run_is_completed(tmp_path, download_folder):
    folder = tmp_path / "corpus"
    main(
        [
            "--data_folder",
            str(folder),
            "--size",
            "tiny",
            "--languages",
            "nl",
            "--targets",
            "pt",
            "--download_folder",
            download_folder,
        ]
    )
    complete = manifest_bytes(folder)
    wavs = sorted(folder.glob("wav/*/*.wav"))
    assert len(wavs) == 24
    wavs[3].unlink()
    for split in SPLITS:
        Path(folder, f"{split}.csv").unlink()
    prepare_embedded_corpus(str(folder), download_folder=download_folder, **SMALL)
    assert wavs[3].is_file()
    assert manifest_bytes(folder) == complete
    assert not list(folder.glob("**/*.tmp"))


def test_missing_espeak(tmp_path, monkeypatch, download_folder):
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda n: None if n == "espeak-ng" else which(n)
    )
    with pytest.raises(MissingExecutableError, match="espeak-ng"):
        prepare_embedded_corpus(str(tmp_path), download_folder=download_folder, **SMALL)


def test_unknown_language(tmp_path, download_folder):
    with pytest.raises(UnknownLanguageError, match="'xx'"):
        prepare_embedded_corpus(
            str(tmp_path),
            size="tiny",
            languages=["de", "xx"],
            download_folder=download_folder,
        )


def test_language_without_espeak_voice(tmp_path, monkeypatch, download_folder):
    use_config(
        monkeypatch,
        tmp_path,
        lambda c: c["language_settings"]["nl"].update(voice="no-such-voice"),
    )
    with pytest.raises(UnknownLanguageError, match="no-such-voice"):
        prepare_embedded_corpus(str(tmp_path), download_folder=download_folder, **SMALL)


def test_unknown_size(tmp_path):
    with pytest.raises(UnknownSizeError, match="huge"):
        prepare_embedded_corpus(str(tmp_path), size="huge")


# tmp_path holds the test's corpus.yaml, so these build into tmp_path / "corpus":
# the recipe does not write into a folder with files it did not make.
def test_source_without_text(tmp_path, monkeypatch, download_folder):
    # klavaro's word lists have one word a line: no sentence of two words or more
    words = {
        "format": "paragraphs",
        "package": "klavaro",
        "files": ["usr/share/klavaro/nl.words"],
    }
    use_config(
        monkeypatch,
        tmp_path,
        lambda c: c["language_settings"]["nl"]["sources"].append(words),
    )
    folder = str(tmp_path / "corpus")
    with pytest.raises(NotEnoughTextError, match="nl.words"):
        prepare_embedded_corpus(folder, download_folder=download_folder, **SMALL)


def test_missing_source_file(tmp_path, monkeypatch, download_folder):
    missing = {"format": "fortune", "package": "klavaro", "files": ["no/such/file"]}
    use_config(
        monkeypatch,
        tmp_path,
        lambda c: c["language_settings"]["nl"].update(sources=[missing]),
    )
    folder = str(tmp_path / "corpus")
    with pytest.raises(NotEnoughTextError, match="no/such/file"):
        prepare_embedded_corpus(folder, download_folder=download_folder, **SMALL)


def test_too_little_text(tmp_path, monkeypatch, download_folder):
    def klavaro_only(config):
        nl = config["language_settings"]["nl"]
        nl["sources"] = [s for s in nl["sources"] if s["package"] == "klavaro"]

    use_config(monkeypatch, tmp_path, klavaro_only)
    with pytest.raises(NotEnoughTextError, match="'demo' size needs"):
        prepare_embedded_corpus(
            str(tmp_path / "corpus"),
            size="demo",
            languages=["nl"],
            targets=[],
            download_folder=download_folder,
        )

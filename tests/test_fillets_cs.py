"""Tests of the Czech Fish Fillets NG recipe (recipes/fillets_cs)."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from recipes.debian_sources import PackageDownloadError, download_package, fetch_package
from recipes.executables import MissingExecutableError
from recipes.fillets_cs.prepare import (
    SPEECH_PACKAGE,
    TEXT_PACKAGE,
    find_clips,
    main,
    prepare_fillets_cs,
    split_clips,
)
from recipes.fillets_dialogs import read_dialogs

SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def rows(fillets_cs_corpus, load_manifest):
    return {
        split: load_manifest(fillets_cs_corpus[split], fillets_cs_corpus["data_folder"])
        for split in SPLITS
    }


@pytest.fixture(scope="module")
def all_clips(download_folder, tmp_path_factory):
    text = fetch_package(TEXT_PACKAGE, download_folder)
    speech = fetch_package(SPEECH_PACKAGE, download_folder)
    return find_clips(text, speech, str(tmp_path_factory.mktemp("unused")))


def manifest_bytes(folder) -> dict:
    return {split: Path(folder, f"{split}.csv").read_bytes() for split in SPLITS}


def test_manifests_and_audio(rows, fillets_cs_corpus):
    # load_manifest parsed each manifest with SpeechBrain and checked each wav.
    assert sum(map(len, rows.values())) == 40
    for split in SPLITS:
        for row in rows[split]:
            assert row["lang"] == "cs" and row["spk_id"].startswith("cs_")
            assert row["wav"] == f"$data_root/wav/cs/{row['ID']}.wav"
            assert float(row["duration"]) >= 0.3
    record = json.loads(
        Path(fillets_cs_corpus["save_folder"], "corpus.json").read_text()
    )
    assert record["options"]["max_clips"] == 40
    assert record["splits"]["test"]["cs"]["utterances"] == len(rows["test"])


def test_no_sentence_shared_between_splits(rows):
    sentences = {split: {row["wrd"] for row in rows[split]} for split in SPLITS}
    assert not sentences["test"] & sentences["train"]
    assert not sentences["dev"] & sentences["train"]
    assert not sentences["dev"] & sentences["test"]


def test_full_set_clean_and_split(all_clips):
    # the whole set, without converting it: ~1,680 clips of 95 minutes
    assert 1600 < len(all_clips) < 1800
    assert len({clip.utt_id for clip in all_clips}) == len(all_clips)
    speakers = Counter(clip.spk_id for clip in all_clips)
    assert speakers["cs_big"] + speakers["cs_small"] > 0.8 * len(all_clips)
    assert len(speakers) > 30
    splits = split_clips(all_clips, seed=1234)
    fractions = {s: len(c) / len(all_clips) for s, c in splits.items()}
    assert fractions["test"] == pytest.approx(0.2, abs=0.01)
    assert fractions["dev"] == pytest.approx(0.1, abs=0.01)
    words = {split: {clip.words for clip in clips} for split, clips in splits.items()}
    assert not words["train"] & words["test"] and not words["train"] & words["dev"]
    assert not words["dev"] & words["test"]
    for clips in splits.values():  # both fish are heard in every split
        assert {"cs_big", "cs_small"} <= {clip.spk_id for clip in clips}


def test_placeholders_and_digits_dropped(all_clips, download_folder):
    dropped = {
        f"{line.level}-{line.dialog_id}"
        for line in read_dialogs(fetch_package(TEXT_PACKAGE, download_folder), "cs")
        if "%" in line.text or any(c.isdigit() for c in line.text)
    }
    assert dropped and not dropped & {clip.utt_id for clip in all_clips}


def test_same_seed_same_manifests(fillets_cs_corpus, tmp_path, download_folder):
    main(
        [
            "--data_folder",
            str(tmp_path / "same"),
            "--max_clips",
            "40",
            "--download_folder",
            download_folder,
        ]
    )
    assert manifest_bytes(tmp_path / "same") == manifest_bytes(
        fillets_cs_corpus["save_folder"]
    )
    prepare_fillets_cs(
        str(tmp_path / "other"), seed=7, max_clips=40, download_folder=download_folder
    )
    assert manifest_bytes(tmp_path / "other") != manifest_bytes(tmp_path / "same")


def test_interrupted_run_is_completed(fillets_cs_corpus, tmp_path, download_folder):
    folder = tmp_path / "copy"
    shutil.copytree(fillets_cs_corpus["data_folder"], folder)
    complete = manifest_bytes(folder)
    wav = sorted(folder.glob("wav/cs/*.wav"))[5]
    wav.unlink()
    for split in SPLITS:
        Path(folder, f"{split}.csv").unlink()
    prepare_fillets_cs(str(folder), max_clips=40, download_folder=download_folder)
    assert wav.is_file()
    assert manifest_bytes(folder) == complete


def test_rerun_is_skipped_without_tools(fillets_cs_corpus, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    paths = prepare_fillets_cs(fillets_cs_corpus["data_folder"], max_clips=40)
    assert paths == {split: fillets_cs_corpus[split] for split in SPLITS}


def test_missing_sox(tmp_path, monkeypatch, download_folder):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n: None if n == "sox" else which(n))
    with pytest.raises(MissingExecutableError, match="'sox'"):
        prepare_fillets_cs(str(tmp_path), max_clips=5, download_folder=download_folder)


def test_unknown_debian_package(tmp_path):
    with pytest.raises(PackageDownloadError, match="no-such-package-xyz"):
        download_package("no-such-package-xyz", str(tmp_path))
    assert not list(tmp_path.iterdir())  # no partial download left behind

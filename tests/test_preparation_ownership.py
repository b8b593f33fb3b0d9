"""Data preparation writes only into folders it owns (recipes/manifest.py).

A folder holding a user's own manifests, an unrelated file, or the other
recipe's corpus is refused with FolderNotOwnedError and left byte-for-byte and
mtime-for-mtime as it was; empty, missing and own folders (also interrupted
ones and those of the previous version, without a "recipe" field) are built,
completed or reused.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from recipes.embedded_corpus.prepare import main as embedded_main
from recipes.embedded_corpus.prepare import prepare_embedded_corpus
from recipes.fillets_cs.prepare import main as fillets_main
from recipes.fillets_cs.prepare import prepare_fillets_cs
from recipes.manifest import (
    RECORD_NAME,
    FolderNotOwnedError,
    check_folder,
    claim_folders,
    is_prepared,
)
from speechbrain_meta.errors import SetupError

SPLITS = ("train", "dev", "test")
RECIPES = ("embedded_corpus", "fillets_cs")
OPTIONS = {
    "embedded_corpus": {"size": "tiny", "languages": ["nl"], "targets": ["pt"]},
    "fillets_cs": {"max_clips": 8},
}
MAINS = {"embedded_corpus": embedded_main, "fillets_cs": fillets_main}


@pytest.fixture(scope="module")
def prepare(download_folder):
    """``prepare(recipe, data_folder, **options)``: a small build of a recipe."""

    def run(recipe: str, data_folder, **options) -> dict:
        function = {
            "embedded_corpus": prepare_embedded_corpus,
            "fillets_cs": prepare_fillets_cs,
        }[recipe]
        options = {**OPTIONS[recipe], "download_folder": download_folder, **options}
        return function(str(data_folder), **options)

    return run


@pytest.fixture(scope="module")
def built(prepare, tmp_path_factory) -> dict:
    """``{recipe: folder}``: each recipe built into a folder that did not exist."""
    folders = {}
    for recipe in RECIPES:
        folder = tmp_path_factory.mktemp(recipe) / "corpus"
        prepare(recipe, folder)
        folders[recipe] = folder
    return folders


def snapshot(folder) -> dict:
    """SHA-256 and mtime of every file, and mtime of every folder, under folder."""
    state = {}
    for root, _dirs, files in os.walk(folder):
        state[os.path.relpath(root, folder)] = ("dir", os.stat(root).st_mtime_ns)
        for name in files:
            path = os.path.join(root, name)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            state[os.path.relpath(path, folder)] = (digest, os.stat(path).st_mtime_ns)
    return state


def read_record(folder) -> dict:
    return json.loads(Path(folder, RECORD_NAME).read_text(encoding="utf-8"))


def write_record(folder, record: dict) -> None:
    Path(folder, RECORD_NAME).write_text(json.dumps(record), encoding="utf-8")


def manifest_bytes(folder) -> dict:
    return {split: Path(folder, f"{split}.csv").read_bytes() for split in SPLITS}


def user_corpus(folder: Path) -> Path:
    """A user's own SpeechBrain corpus: three manifests and a wav."""
    (folder / "audio").mkdir(parents=True)
    tone = 0.3 * np.sin(np.linspace(0, 2000 * np.pi, 16000))
    soundfile.write(folder / "audio" / "a.wav", tone, 16000, subtype="PCM_16")
    for split in SPLITS:
        (folder / f"{split}.csv").write_text(
            "ID,duration,wav,spk_id,lang,wrd\n"
            f"{split}_0,1.0,$data_root/audio/a.wav,s1,en,hello world\n",
            encoding="utf-8",
        )
    return folder


def copy_of(folder, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def assert_refused(call, folder, *names) -> FolderNotOwnedError:
    """Run ``call``; check it raises FolderNotOwnedError and leaves folder as it was."""
    before = snapshot(folder)
    with pytest.raises(FolderNotOwnedError) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, SetupError)
    assert "\n" not in message
    assert f"'{folder}'" in message
    assert "--skip_prep True" in message and "another --data_folder" in message
    for name in names:
        assert name in message
    assert snapshot(folder) == before
    return caught.value


@pytest.mark.parametrize("recipe", RECIPES)
def test_user_manifests_are_refused_and_untouched(recipe, prepare, tmp_path):
    folder = user_corpus(tmp_path / "mine")
    error = assert_refused(
        lambda: prepare(recipe, folder), folder, "dev.csv", "test.csv", "train.csv"
    )
    assert error.recipe == recipe and error.owner is None
    assert "1 more" in str(error)  # audio/ is the fourth entry


@pytest.mark.parametrize("recipe", RECIPES)
def test_unrelated_file_is_refused_and_untouched(recipe, prepare, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes", encoding="utf-8")
    assert_refused(lambda: prepare(recipe, folder), folder, "notes.txt")


@pytest.mark.parametrize("recipe", RECIPES)
def test_command_line_names_both_folder_options(
    recipe, download_folder, tmp_path, capsys
):
    folder = user_corpus(tmp_path / "mine")
    before = snapshot(folder)
    argv = ["--data_folder", str(folder), "--download_folder", download_folder]
    with pytest.raises(SystemExit) as caught:
        MAINS[recipe](argv)
    assert caught.value.code == 2
    assert snapshot(folder) == before
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(folder) in lines[0]
    assert "--skip_prep True" in lines[0]
    assert "another --data_folder/--save_folder" in lines[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_missing_and_empty_folders_are_built(recipe, built, prepare, tmp_path):
    record = read_record(built[recipe])  # built into a folder that did not exist
    assert record["recipe"] == recipe and record["complete"] is True
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = prepare(recipe, empty)
    assert all(Path(path).is_file() for path in paths.values())
    assert manifest_bytes(empty) == manifest_bytes(built[recipe])
    assert read_record(empty)["recipe"] == recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_own_folder_is_reused(recipe, built, prepare, monkeypatch):
    before = snapshot(built[recipe])
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no tool is needed
    paths = prepare(recipe, built[recipe])
    assert paths == {s: os.path.join(built[recipe], f"{s}.csv") for s in SPLITS}
    assert snapshot(built[recipe]) == before


@pytest.mark.parametrize("recipe", RECIPES)
def test_interrupted_build_is_completed(recipe, built, prepare, tmp_path):
    folder = copy_of(built[recipe], tmp_path)
    complete = manifest_bytes(folder)
    options = read_record(folder)["options"]
    # Interrupted after writing some wavs and a manifest: the in-progress record
    # that claim_folders writes first is all there is of the record.
    write_record(folder, {"recipe": recipe, "complete": False, "options": options})
    Path(folder, "test.csv").unlink()
    wav = sorted(folder.glob("wav/*/*.wav"))[2]
    wav.unlink()
    assert not is_prepared(str(folder), list(SPLITS), options, recipe)
    prepare(recipe, folder)
    assert wav.is_file()
    assert manifest_bytes(folder) == complete
    assert read_record(folder)["complete"] is True
    assert not list(folder.glob("**/*.tmp"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_in_progress_record_is_not_prepared(recipe, built, prepare, tmp_path):
    # Every manifest is there, but the record says the build did not finish.
    folder = copy_of(built[recipe], tmp_path)
    record = read_record(folder)
    write_record(folder, {**record, "complete": False})
    assert not is_prepared(str(folder), list(SPLITS), record["options"], recipe)
    prepare(recipe, folder)
    assert read_record(folder) == record


@pytest.mark.parametrize("recipe", RECIPES)
def test_previous_version_record_is_reused(
    recipe, built, prepare, monkeypatch, tmp_path
):
    folder = copy_of(built[recipe], tmp_path)
    legacy = read_record(folder)
    del legacy["recipe"], legacy["complete"]
    write_record(folder, legacy)
    before = snapshot(folder)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    prepare(recipe, folder)
    assert snapshot(folder) == before  # reused as it is, not rebuilt
    monkeypatch.undo()
    prepare(recipe, folder, seed=99)  # other options: still its own, rebuilt
    assert read_record(folder)["recipe"] == recipe
    assert read_record(folder)["options"]["seed"] == 99


@pytest.mark.parametrize("legacy", [False, True], ids=["record", "legacy_record"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_other_recipes_folder_is_refused(recipe, legacy, built, prepare, tmp_path):
    other = {"embedded_corpus": "fillets_cs", "fillets_cs": "embedded_corpus"}[recipe]
    folder = copy_of(built[other], tmp_path)
    if legacy:
        record = read_record(folder)
        del record["recipe"], record["complete"]
        write_record(folder, record)
    error = assert_refused(lambda: prepare(recipe, folder), folder, "train.csv")
    if not legacy:
        assert error.owner == other and other in str(error)


@pytest.mark.parametrize("recipe", RECIPES)
def test_save_folder_is_claimed_too(recipe, prepare, tmp_path):
    data_folder, save_folder = tmp_path / "audio", tmp_path / "manifests"
    user_corpus(save_folder)
    assert_refused(
        lambda: prepare(recipe, data_folder, save_folder=str(save_folder)),
        save_folder,
        "train.csv",
    )
    assert not data_folder.exists()  # nothing written before the refusal


@pytest.mark.parametrize("recipe", RECIPES)
def test_data_folder_is_claimed_when_save_folder_differs(recipe, prepare, tmp_path):
    data_folder, save_folder = tmp_path / "audio", tmp_path / "manifests"
    user_corpus(data_folder)
    assert_refused(
        lambda: prepare(recipe, data_folder, save_folder=str(save_folder)),
        data_folder,
        "train.csv",
    )
    assert not save_folder.exists()


@pytest.mark.parametrize("recipe", RECIPES)
def test_separate_folders_both_recorded(recipe, built, prepare, tmp_path, monkeypatch):
    data_folder, save_folder = tmp_path / "audio", tmp_path / "manifests"
    prepare(recipe, data_folder, save_folder=str(save_folder))
    assert manifest_bytes(save_folder) == manifest_bytes(built[recipe])
    assert read_record(data_folder) == read_record(save_folder)
    assert read_record(save_folder)["recipe"] == recipe
    assert not list(data_folder.glob("*.csv"))
    before = snapshot(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    prepare(recipe, data_folder, save_folder=str(save_folder))
    assert snapshot(tmp_path) == before


def test_download_cache_in_data_folder_counts_as_empty(
    prepare, download_folder, tmp_path
):
    # <data_folder>/downloads filled by hand (here: linked to the test cache)
    # before the first build: the folder holds nothing else, so it is free.
    folder = tmp_path / "corpus"
    folder.mkdir()
    cache = folder / "downloads"
    cache.symlink_to(os.path.abspath(download_folder), target_is_directory=True)
    prepare("fillets_cs", folder, download_folder=str(cache))
    assert read_record(folder)["recipe"] == "fillets_cs"


def test_check_folder_rules(tmp_path):
    keys = ["seed"]
    check_folder(str(tmp_path / "missing"), "demo", keys)
    check_folder(str(tmp_path), "demo", keys)  # empty
    (tmp_path / "downloads").mkdir()
    check_folder(str(tmp_path), "demo", keys, cache=str(tmp_path / "downloads"))
    with pytest.raises(FolderNotOwnedError, match="downloads/"):
        check_folder(str(tmp_path), "demo", keys)
    write_record(tmp_path, {"options": {"seed": 1}})  # a previous version's
    check_folder(str(tmp_path), "demo", keys)
    with pytest.raises(FolderNotOwnedError, match="corpus.json"):
        check_folder(str(tmp_path), "demo", ["seed", "size"])
    write_record(tmp_path, {"recipe": "other", "options": {"seed": 1}})
    with pytest.raises(FolderNotOwnedError, match="of the other recipe"):
        check_folder(str(tmp_path), "demo", keys)
    Path(tmp_path, RECORD_NAME).write_text("not json", encoding="utf-8")
    with pytest.raises(FolderNotOwnedError):
        check_folder(str(tmp_path), "demo", keys)
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(FolderNotOwnedError, match="not a folder"):
        check_folder(str(a_file), "demo", keys)


def test_claim_checks_every_folder_before_writing(tmp_path):
    free, mine = tmp_path / "free", user_corpus(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(FolderNotOwnedError):
        claim_folders([str(free), str(mine)], "demo", {"seed": 1})
    assert not free.exists() and snapshot(mine) == before
    folders = claim_folders([str(free), str(free) + "/"], "demo", {"seed": 1})
    assert folders == [str(free)]
    assert read_record(free) == {
        "recipe": "demo",
        "complete": False,
        "options": {"seed": 1},
    }

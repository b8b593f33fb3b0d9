"""Tests of the FLEURS recipe (recipes/fleurs) on a fake download.

The download (tests/release_fixtures.py) has the layout and TSV format of the
Hugging Face ``google/fleurs`` data folder, with the tiny embedded corpus's
16 kHz wavs.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from release_fixtures import (
    build_fleurs_folder,
    corrupt_file,
    manifest_bytes,
    manifests,
    record,
    tree_snapshot,
)

from recipes.fleurs.prepare import main, manifest_names, prepare_fleurs
from speechbrain_meta.errors import SetupError

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test")
LANGUAGES = ["en_us", "fr_fr", "cs_cz", "pt_br"]


@pytest.fixture(scope="module")
def fleurs(tiny_corpus, tmp_path_factory):
    return build_fleurs_folder(
        tmp_path_factory.mktemp("fleurs") / "fleurs", tiny_corpus, LANGUAGES
    )


@pytest.fixture(scope="module")
def built(fleurs, tmp_path_factory):
    before = tree_snapshot(fleurs.folder)
    save = tmp_path_factory.mktemp("fleurs_prepared") / "fleurs"
    paths = prepare_fleurs(
        str(fleurs.folder), str(save), LANGUAGES, ["cs_cz"], lang_names="short"
    )
    return {"save": save, "paths": paths, "before": before}


def test_manifests_parse_and_durations(built, fleurs):
    from speechbrain.dataio.dataset import DynamicItemDataset

    rows = manifests(built["save"])
    for split in SPLITS:
        dataset = DynamicItemDataset.from_csv(built["paths"][split])
        assert len(dataset) == len(rows[split]) > 0
        for row in rows[split]:
            assert row["lang"] in {"en", "fr", "cs", "pt"}
            code = {"en": "en_us", "fr": "fr_fr", "cs": "cs_cz", "pt": "pt_br"}
            folder = fleurs.language_folder(code[row["lang"]]) / "audio" / split
            assert Path(row["wav"]) == folder / f"{row['ID'].split('_', 1)[1]}.wav"
            info = soundfile.info(row["wav"])
            assert abs(float(row["duration"]) - info.frames / info.samplerate) < 1e-3
            assert re.fullmatch(rf"{row['lang']}_sentence\d+", row["spk_id"])
    # every clip of every TSV is in a manifest, but the two with digits in en
    # and fr (a sentence read twice)
    counts = {
        lang: [sum(r["lang"] == lang for r in rows[s]) for s in SPLITS]
        for lang in ("en", "fr", "cs", "pt")
    }
    assert counts == {
        "en": [6, 2, 2],
        "fr": [6, 2, 2],
        "cs": [8, 2, 2],
        "pt": [8, 2, 2],
    }


def test_sentences_and_groups(built, fleurs):
    rows = manifests(built["save"])
    by_name = {Path(r["wav"]).name: r for split in SPLITS for r in rows[split]}
    for (_, name), words in fleurs.words.items():
        if words is None:
            assert name not in by_name
        else:
            assert by_name[name]["wrd"] == words
    fr = {r["wrd"] for r in rows["train"] if r["lang"] == "fr"}
    assert "l'été déjà" in fr
    cs = {r["wrd"] for r in rows["train"] if r["lang"] == "cs"}
    assert "příliš žluťoučký kůň úpěl" in cs
    # the recordings of one FLEURS sentence share their spk_id
    for code in LANGUAGES:
        train = fleurs.rows[code]["train"]
        for first, second in zip(train[::2], train[1::2]):
            assert first["id"] == second["id"]
            if first["file_name"] in by_name:
                assert (
                    by_name[first["file_name"]]["spk_id"]
                    == by_name[second["file_name"]]["spk_id"]
                )
    data = record(built["save"])
    assert data["languages"] == ["en", "fr", "cs", "pt"] and data["targets"] == ["cs"]
    assert data["skipped"] == {
        "en": {"train": {"not_clean": 2}},
        "fr": {"train": {"not_clean": 2}},
    }


def test_download_untouched_and_same_inputs_same_manifests(built, fleurs, tmp_path):
    prepare_fleurs(
        str(fleurs.folder), str(tmp_path / "again"), LANGUAGES, "cs", lang_names="short"
    )
    assert manifest_bytes(tmp_path / "again") == manifest_bytes(built["save"])
    before = {p.name: p.stat().st_mtime_ns for p in built["save"].iterdir()}
    prepare_fleurs(
        str(fleurs.folder), str(built["save"]), LANGUAGES, "cs", lang_names="short"
    )
    assert {p.name: p.stat().st_mtime_ns for p in built["save"].iterdir()} == before
    assert tree_snapshot(fleurs.folder) == built["before"]


def test_codes_as_lang_and_transcription_column(fleurs, tmp_path):
    save = tmp_path / "codes"
    prepare_fleurs(
        str(fleurs.folder), str(save), ["fr_fr", "pt_br"], text_column="transcription"
    )
    rows = manifests(save)
    assert {r["lang"] for r in rows["train"]} == {"fr_fr", "pt_br"}
    fr = {r["wrd"] for r in rows["train"] if r["lang"] == "fr_fr"}
    assert "l été déjà" in fr  # FLEURS's own transcription lost the apostrophe
    assert record(save)["targets"] == []
    with pytest.raises(SetupError, match="would both be 'pt'"):
        manifest_names(["pt_br", "pt_pt"], "short")


def test_hf_layout_nested_audio_and_conversion(tiny_corpus, tmp_path, load_manifest):
    download = build_fleurs_folder(
        tmp_path / "hf", tiny_corpus, ["cs_cz"], hf_layout=True, nested_audio=True
    )
    before = tree_snapshot(download.folder)
    save = tmp_path / "cs"
    paths = prepare_fleurs(
        str(download.folder), str(save), ["cs_cz"], lang_names={"cs_cz": "cs"},
        convert_to_wav=True, max_hours_per_speaker=6 / 3600,
    )  # fmt: skip
    rows = {split: load_manifest(paths[split], str(save)) for split in SPLITS}
    assert all(r["wav"].startswith("$data_root/wav/cs/") for r in rows["train"])
    totals = {}
    for row in rows["train"]:
        totals[row["spk_id"]] = totals.get(row["spk_id"], 0) + float(row["duration"])
    assert max(totals.values()) <= 6 + 1e-3
    assert 0 < len(rows["train"]) < 8
    assert tree_snapshot(download.folder) == before


def test_bad_downloads(fleurs, tmp_path):
    with pytest.raises(SetupError, match=r"xx_yy .*: it has cs_cz en_us fr_fr pt_br"):
        prepare_fleurs(str(fleurs.folder), str(tmp_path / "a"), ["cs_cz", "xx_yy"])
    with pytest.raises(SetupError, match="--save_folder is required"):
        prepare_fleurs(str(fleurs.folder), None, ["cs_cz"])
    with pytest.raises(SetupError, match="inside the release"):
        prepare_fleurs(str(fleurs.folder), str(fleurs.folder / "out"), ["cs_cz"])
    copy = tmp_path / "copy"
    shutil.copytree(fleurs.folder, copy)
    tsv = copy / "cs_cz" / "dev.tsv"
    tsv.write_text(tsv.read_text().replace("\tFEMALE", ""), encoding="utf-8")
    with pytest.raises(SetupError, match=r"dev\.tsv:\d+ has 6 tab-separated columns"):
        prepare_fleurs(str(copy), str(tmp_path / "b"), ["cs_cz"])
    shutil.rmtree(copy / "pt_br" / "audio" / "test")
    (copy / "pt_br" / "audio" / "test.tar.gz").write_bytes(b"not extracted")
    with pytest.raises(SetupError, match=r"test\.tar\.gz is not extracted: run tar"):
        prepare_fleurs(str(copy), str(tmp_path / "c"), ["pt_br"])
    assert not any((tmp_path / name).exists() for name in "abc")


def test_missing_and_corrupt_wavs_are_counted(fleurs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fleurs.folder, copy)
    test = fleurs.rows["pt_br"]["test"]
    (copy / "pt_br" / "audio" / "test" / test[0]["file_name"]).unlink()
    corrupt_file(copy / "pt_br" / "audio" / "test" / test[1]["file_name"])
    save = tmp_path / "pt"
    prepare_fleurs(str(copy), str(save), ["pt_br", "cs_cz"])
    rows = manifests(save)
    assert not [r for r in rows["test"] if r["lang"] == "pt_br"]
    assert len(rows["train"]) == 16 and len(rows["test"]) == 2
    assert record(save)["skipped"] == {
        "pt_br": {"test": {"missing": 1, "unreadable": 1}}
    }


def test_command_line(fleurs, tmp_path, capsys):
    main(
        [
            "--data_folder", str(fleurs.folder), "--save_folder", str(tmp_path / "f"),
            "--languages", "cs_cz", "pt_br", "--lang_names", "cs_cz=cs",
            "--target_languages", "cs",
        ]
    )  # fmt: skip
    assert "train: " in capsys.readouterr().out
    data = record(tmp_path / "f")
    assert data["languages"] == ["cs", "pt_br"] and data["targets"] == ["cs"]
    result = subprocess.run(
        [
            sys.executable, "-m", "recipes.fleurs.prepare",
            "--data_folder", str(fleurs.folder), "--save_folder", str(tmp_path / "x"),
            "--languages", "de_de",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: Language(s) de_de not in" in lines[0]


def test_train_py_runs_on_the_manifests(built, tmp_path):
    command = [
        sys.executable, "train.py", "hparams/maml_ctc.yaml", "--debug",
        "--skip_prep", "True", "--data_folder", str(built["save"]),
        "--output_folder", str(tmp_path / "out"), "--target_tasks", "[cs]",
        "--tasks_per_batch", "2", "--support_size", "3", "--query_size", "3",
        "--eval_support_size", "1", "--eval_query_size", "1",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "wer.txt").is_file()

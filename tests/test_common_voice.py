"""Tests of the Common Voice recipe (recipes/common_voice) on a fake release.

The release (tests/release_fixtures.py) has the layout and TSV format of a real
one, with the tiny embedded corpus's audio as 48 kHz mp3. Also here: the
language-aware text normalisation the recipes use (speechbrain_meta/text.py).
"""

import re
import shutil
import subprocess
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile
from release_fixtures import (
    build_common_voice_release,
    corrupt_file,
    drop_tsv_column,
    manifest_bytes,
    manifests,
    read_rows,
    record,
    tree_snapshot,
)

import recipes.release
from recipes.common_voice.prepare import main, prepare_common_voice, read_tsv
from recipes.manifest import FolderNotOwnedError
from recipes.release import Clip, apply_caps
from speechbrain_meta.errors import SetupError
from speechbrain_meta.text import (
    APOSTROPHE_LANGUAGES,
    APOSTROPHES,
    IN_WORD_MARKS,
    normalize_text,
)

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test")
LOCALES = ["en", "fr", "sv-SE", "cs"]


@pytest.fixture(scope="module")
def release(tiny_corpus, tmp_path_factory):
    return build_common_voice_release(
        tmp_path_factory.mktemp("cv_release"), tiny_corpus, LOCALES
    )


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
    """The release prepared once, with the snapshot of the release before."""
    before = tree_snapshot(release.folder)
    save = tmp_path_factory.mktemp("cv_prepared") / "cv"
    paths = prepare_common_voice(
        str(release.folder), str(save), LOCALES, target_locales=["cs"]
    )
    return {"save": save, "paths": paths, "before": before}


def copy_release(release, tmp_path):
    """A copy of the release (its folder), to break."""
    copy = tmp_path / "copy" / release.folder.name
    shutil.copytree(release.folder, copy)
    return copy


# --- The manifests --------------------------------------------------------------


def test_manifests_parse_with_speechbrain(built, release):
    from speechbrain.dataio.dataset import DynamicItemDataset

    rows = manifests(built["save"])
    for split in SPLITS:
        dataset = DynamicItemDataset.from_csv(
            built["paths"][split], replacements={"data_root": str(built["save"])}
        )
        assert len(dataset) == len(rows[split])
    # The tiny corpus has 8 train, 2 dev and 2 test utterances per language.
    for locale in LOCALES:
        counts = [sum(r["lang"] == locale for r in rows[s]) for s in SPLITS]
        assert counts == [8, 2, 2], locale
    for split in SPLITS:
        ids = [row["ID"] for row in rows[split]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for row in rows[split]:
            clip = Path(row["wav"])
            assert clip.is_absolute() and clip.parent == (
                release.folder / row["lang"] / "clips"
            )
            number = clip.stem.rsplit("_", 1)[1]
            assert row["ID"] == f"{row['lang']}_{number}"
            assert re.fullmatch(
                rf"{re.escape(row['lang'])}_[0-9a-f]{{12}}", row["spk_id"]
            )
    assert {r["path"] for r in release.rows["fr"]["dev"]} == {
        Path(r["wav"]).name for r in rows["dev"] if r["lang"] == "fr"
    }


def test_durations_match_the_audio(built):
    for rows in manifests(built["save"]).values():
        for row in rows:
            info = soundfile.info(row["wav"])
            assert info.samplerate == 48000
            assert abs(float(row["duration"]) - info.frames / 48000) < 0.002, row


def test_speakers_disjoint_between_splits(built, release):
    rows = manifests(built["save"])
    for locale in LOCALES:
        speakers = {
            s: {r["spk_id"] for r in rows[s] if r["lang"] == locale} for s in SPLITS
        }
        assert [len(speakers[s]) for s in SPLITS] == [4, 2, 2]
        assert not speakers["train"] & (speakers["dev"] | speakers["test"])
        assert not speakers["dev"] & speakers["test"]
    # one client_id, one spk_id
    by_client = defaultdict(set)
    for locale in LOCALES:
        for split in SPLITS:
            names = {r["path"]: r["client_id"] for r in release.rows[locale][split]}
            for row in rows[split]:
                name = Path(row["wav"]).name
                if name in names:
                    by_client[names[name]].add(row["spk_id"])
    assert all(len(ids) == 1 for ids in by_client.values())
    assert len({next(iter(ids)) for ids in by_client.values()}) == len(by_client)


def test_sentences_are_normalised(built, release):
    rows = manifests(built["save"])
    words = {Path(r["wav"]).name: r["wrd"] for split in SPLITS for r in rows[split]}
    for name, expected in words.items():
        assert expected == release.words[name], name
    fr = {r["wrd"] for r in rows["train"] if r["lang"] == "fr"}
    assert "l'été déjà" in fr and "aujourd'hui c'est l'heure" in fr
    en = {r["wrd"] for r in rows["train"] if r["lang"] == "en"}
    assert "don't stop she said" in en  # a quoted TSV field, ’ unified
    assert "rock n roll bob's band" in en  # quotes around 'n' are not letters
    cs = {r["wrd"] for r in rows["train"] if r["lang"] == "cs"}
    assert "příliš žluťoučký kůň úpěl" in cs  # no apostrophe kept in Czech
    for split in SPLITS:
        for row in rows[split]:
            assert row["wrd"] == row["wrd"].strip() and "  " not in row["wrd"]
            assert not re.search(r"[^\w' ]", row["wrd"]), row["wrd"]


def test_corpus_record(built):
    data = record(built["save"])
    assert data["complete"] is True and data["recipe"] == "common_voice"
    assert data["languages"] == LOCALES and data["targets"] == ["cs"]
    assert data["skipped"] == {} and data["skipped_total"] == 0
    assert data["shared_speakers"] == {}
    assert data["splits"]["train"]["fr"]["utterances"] == 8
    assert data["speakers"]["train"]["sv-SE"] == 4


def test_release_is_untouched(built, release):
    assert tree_snapshot(release.folder) == built["before"]


def test_same_inputs_same_manifests(built, release, tmp_path):
    prepare_common_voice(
        str(release.folder), str(tmp_path / "again"), LOCALES, target_locales=["cs"]
    )
    assert manifest_bytes(tmp_path / "again") == manifest_bytes(built["save"])


def test_rerun_is_skipped_and_other_options_rebuild(built, release, monkeypatch):
    save = built["save"]
    before = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a prepared folder was rebuilt")

    monkeypatch.setattr(recipes.release, "probe_audio", fail)
    prepare_common_voice(str(release.folder), str(save), LOCALES, ["cs"])
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == before
    monkeypatch.undo()
    reference = manifest_bytes(save)
    prepare_common_voice(str(release.folder), str(save), LOCALES, ["cs"], seed=7)
    assert record(save)["options"]["seed"] == 7
    assert manifest_bytes(save) != reference
    # back to the first options: the first manifests again
    prepare_common_voice(str(release.folder), str(save), LOCALES, ["cs"])
    assert manifest_bytes(save) == reference
    assert tree_snapshot(release.folder) == built["before"]


def test_interrupted_build_is_completed(built, release, tmp_path, monkeypatch):
    from recipes.manifest import write_manifest

    def fail_on_dev(path, rows):
        if path.endswith("dev.csv"):
            raise KeyboardInterrupt
        write_manifest(path, rows)

    monkeypatch.setattr(recipes.release, "write_manifest", fail_on_dev)
    save = tmp_path / "cv"
    with pytest.raises(KeyboardInterrupt):
        prepare_common_voice(str(release.folder), str(save), LOCALES, ["cs"])
    assert record(save)["complete"] is False and not (save / "dev.csv").exists()
    monkeypatch.undo()
    prepare_common_voice(str(release.folder), str(save), LOCALES, ["cs"])
    assert manifest_bytes(save) == manifest_bytes(built["save"])


def test_convert_to_wav(release, tmp_path, load_manifest):
    before = tree_snapshot(release.folder)
    save = tmp_path / "cv_wav"
    paths = prepare_common_voice(
        str(release.folder), str(save), ["fr", "sv-SE"], convert_to_wav=True
    )
    for split in SPLITS:
        # 16 kHz mono 16-bit, not silent, the duration of the wav
        rows = load_manifest(paths[split], str(save))
        for row in rows:
            assert row["wav"] == f"$data_root/wav/{row['lang']}/{row['ID']}.wav"
    assert len(list((save / "wav" / "fr").glob("*.wav"))) == 12
    assert not list(save.rglob("*.tmp"))
    assert tree_snapshot(release.folder) == before
    # a wav already there is reused (an interrupted conversion resumes) ...
    wav = sorted((save / "wav" / "fr").glob("*.wav"))[0]
    soundfile.write(wav, [0.0] * 1600, 16000, subtype="PCM_16")
    prepare_common_voice(
        str(release.folder), str(save), ["fr", "sv-SE"], convert_to_wav=True, seed=5
    )
    assert soundfile.info(str(wav)).frames == 1600
    # ... but not after another release: the wavs are made again
    copy = copy_release(release, tmp_path)
    paths = prepare_common_voice(
        str(copy), str(save), ["fr", "sv-SE"], convert_to_wav=True
    )
    assert soundfile.info(str(wav)).frames > 1600
    load_manifest(paths["train"], str(save))
    # without conversion again: the wavs of the folder are removed
    prepare_common_voice(str(release.folder), str(save), ["fr", "sv-SE"])
    assert not (save / "wav").exists()


# --- Caps ------------------------------------------------------------------------


def hours(rows, key) -> dict:
    total = defaultdict(float)
    for row in rows:
        total[row[key]] += float(row["duration"]) / 3600
    return total


def test_caps_are_respected(built, release, tmp_path):
    speaker_cap, language_cap = 4.0 / 3600, 12.0 / 3600
    save = tmp_path / "capped"
    prepare_common_voice(
        str(release.folder),
        str(save),
        LOCALES,
        max_hours_per_language=language_cap,
        max_hours_per_speaker=speaker_cap,
    )
    rows, full = manifests(save), manifests(built["save"])
    assert max(hours(rows["train"], "spk_id").values()) <= speaker_cap + 1e-9
    assert max(hours(rows["train"], "lang").values()) <= language_cap + 1e-9
    assert rows["dev"] == full["dev"] and rows["test"] == full["test"]  # not capped
    skipped = record(save)["skipped"]
    for locale in LOCALES:
        kept = sum(r["lang"] == locale for r in rows["train"])
        reasons = skipped[locale]["train"]
        assert set(reasons) <= {"over_speaker_cap", "over_language_cap"}
        assert kept + sum(reasons.values()) == 8 and kept > 0
    # deterministic: the same selection again, another one with another seed
    prepare_common_voice(
        str(release.folder),
        str(tmp_path / "again"),
        LOCALES,
        max_hours_per_language=language_cap,
        max_hours_per_speaker=speaker_cap,
    )
    assert manifest_bytes(tmp_path / "again") == manifest_bytes(save)


def test_caps_on_dev_too(release, tmp_path):
    save = tmp_path / "capped"
    prepare_common_voice(
        str(release.folder),
        str(save),
        ["fr"],
        max_hours_per_language=1.0 / 3600,
        capped_splits=["train", "dev"],
    )
    rows = manifests(save)
    assert not rows["train"] and not rows["dev"] and len(rows["test"]) == 2


def test_apply_caps_draws_with_the_seed():
    clips = [
        Clip(f"de_{i:03d}", "train", "de", f"de_s{i % 10}", "Hallo.", "de", "", 1.0)
        for i in range(200)
    ]
    first, dropped = apply_caps(clips, 1, max_hours_per_language=50 / 3600)
    again, _ = apply_caps(clips, 1, max_hours_per_language=50 / 3600)
    other, _ = apply_caps(clips, 2, max_hours_per_language=50 / 3600)
    assert len(first) == 50 and first == again and first != other
    assert {reason for _, reason in dropped} == {"over_language_cap"}
    kept, _ = apply_caps(clips, 1, max_hours_per_speaker=3 / 3600)
    assert len(kept) == 30  # 10 speakers, 3 s each
    test = [Clip("x", "test", "de", "s", "Hallo.", "de", "", 9.0)]
    assert apply_caps(test, 1, max_hours_per_language=1 / 3600)[0] == test


# --- Bad input -----------------------------------------------------------------


@pytest.mark.parametrize("durations", ["clip_durations.tsv", "headers"])
def test_missing_and_corrupt_clips_are_counted(release, tmp_path, durations):
    copy = copy_release(release, tmp_path)
    if durations == "headers":  # a release without clip_durations.tsv
        for locale in LOCALES:
            (copy / locale / "clip_durations.tsv").unlink()
    train = release.rows["fr"]["train"]
    (copy / "fr" / "clips" / train[2]["path"]).unlink()  # still in clip_durations
    corrupt_file(copy / "fr" / "clips" / train[5]["path"])
    durations = {
        r["path"]: soundfile.info(str(release.clip("fr", r["path"]))).duration
        for i, r in enumerate(train)
        if i not in (2, 5)
    }
    max_duration = round(max(durations.values()) - 0.01, 2)  # the longest is skipped
    long = [name for name, seconds in durations.items() if seconds > max_duration]
    before = tree_snapshot(copy)
    save = tmp_path / "cv"
    prepare_common_voice(str(copy), str(save), LOCALES, max_duration=max_duration)
    rows = manifests(save)
    names = {Path(r["wav"]).name for r in rows["train"]}
    assert train[2]["path"] not in names and train[5]["path"] not in names
    assert len(long) == 1 and long[0] not in names
    assert sum(r["lang"] == "fr" for r in rows["train"]) == 8 - 2 - len(long)
    skipped = record(save)["skipped"]
    assert skipped["fr"]["train"] == {
        "missing": 1,
        "unreadable": 1,
        "too_long": len(long),
    }
    assert sum(len(r) for r in rows.values()) + record(save)["skipped_total"] == 48
    for split in SPLITS:
        for row in rows[split]:
            duration = float(row["duration"])
            assert 0 < duration <= max_duration
            assert abs(duration - soundfile.info(row["wav"]).duration) < 2e-3
    assert tree_snapshot(copy) == before


def test_missing_locale(release, tmp_path):
    with pytest.raises(SetupError, match=r"xx .*: it has cs en fr sv-SE"):
        prepare_common_voice(str(release.folder), str(tmp_path / "cv"), ["fr", "xx"])
    assert not (tmp_path / "cv").exists()


def test_tsv_without_a_needed_column(release, tmp_path):
    copy = copy_release(release, tmp_path)
    drop_tsv_column(copy / "fr" / "train.tsv", "sentence")
    with pytest.raises(SetupError, match=r"fr/train\.tsv has no column 'sentence'"):
        prepare_common_voice(str(copy), str(tmp_path / "cv"), ["en", "fr"])
    assert not (tmp_path / "cv").exists()


def test_save_folder_required_and_outside_the_release(release, tmp_path):
    before = tree_snapshot(release.folder)
    with pytest.raises(SetupError, match="--save_folder is required"):
        prepare_common_voice(str(release.folder), None, ["fr"])
    with pytest.raises(SetupError, match="inside the release"):
        prepare_common_voice(str(release.folder), str(release.folder / "out"), ["fr"])
    with pytest.raises(SetupError, match="target_locales de not among"):
        prepare_common_voice(str(release.folder), str(tmp_path / "cv"), ["fr"], "de")
    assert tree_snapshot(release.folder) == before


def test_users_folder_is_refused(release, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.csv").write_text("my own manifest\n")
    with pytest.raises(FolderNotOwnedError):
        prepare_common_voice(str(release.folder), str(tmp_path / "mine"), ["fr"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["train.csv"]


def test_speaker_shared_between_splits_is_reported(release, tmp_path, caplog):
    copy = copy_release(release, tmp_path)
    dev = copy / "fr" / "dev.tsv"
    train_speaker = release.rows["fr"]["train"][0]["client_id"]
    dev_speaker = release.rows["fr"]["dev"][0]["client_id"]
    dev.write_text(dev.read_text().replace(dev_speaker, train_speaker))
    prepare_common_voice(str(copy), str(tmp_path / "cv"), ["fr", "cs"])
    assert record(tmp_path / "cv")["shared_speakers"] == {"fr": 1}
    assert "fr: 1 spk_id values are in more than one split" in caplog.text


def test_use_validated(release, tmp_path):
    save = tmp_path / "validated"
    prepare_common_voice(str(release.folder), str(save), ["fr"], use_validated=True)
    rows = manifests(save)
    # train.tsv's 8 clips, and the same sentence recorded again by a train
    # speaker; not the dev and test clips, nor the test speaker's extra clip
    assert len(rows["train"]) == 9 and len(rows["dev"]) == len(rows["test"]) == 2
    assert record(save)["skipped"]["fr"]["train"] == {"in_dev_or_test": 5}
    speakers = {s: {r["spk_id"] for r in rows[s]} for s in SPLITS}
    assert not speakers["train"] & (speakers["dev"] | speakers["test"])


def test_read_tsv_survives_unmatched_quotes(tmp_path):
    path = tmp_path / "other.tsv"
    path.write_text(
        "client_id\tpath\tsentence\n"
        'a\t1.mp3\t"Unclosed quote here.\n'
        'b\t2.mp3\t"""Quoted,"" she said."\n'
        "c\t3.mp3\tshort\n",
        encoding="utf-8",
    )
    columns, rows = read_tsv(str(path))
    assert columns == ["client_id", "path", "sentence"]
    assert [r["sentence"] for r in rows] == [
        '"Unclosed quote here.',
        '"Quoted," she said.',
        "short",
    ]


# --- Command line and training ----------------------------------------------------


def test_command_line(release, tmp_path, capsys):
    main(
        [
            "--data_folder", str(release.folder), "--save_folder", str(tmp_path / "cv"),
            "--locales", "fr", "cs", "--target_locales", "cs",
            "--download_folder", str(tmp_path / "unused"), "--seed", "3",
        ]
    )  # fmt: skip
    assert "train: " in capsys.readouterr().out
    assert record(tmp_path / "cv")["targets"] == ["cs"]
    assert not (tmp_path / "unused").exists()
    result = subprocess.run(
        [
            sys.executable, "-m", "recipes.common_voice.prepare",
            "--data_folder", str(release.folder), "--save_folder", str(tmp_path / "x"),
            "--locales", "de",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: Locale(s) de not in" in lines[0]
    assert "cs en fr sv-SE" in lines[0] and "Traceback" not in result.stderr


def test_run_on_main_and_save_folder_option(release, tmp_path):
    from speechbrain.utils.distributed import run_on_main

    paths = run_on_main(
        prepare_common_voice,
        kwargs={
            "data_folder": str(release.folder),
            "save_folder": str(tmp_path / "cv"),
            "locales": ["cs"],
        },
    )
    assert sorted(paths) == ["dev", "test", "train"]
    assert len(read_rows(paths["train"])) == 8
    with pytest.raises(SystemExit) as caught:
        main(["--data_folder", str(release.folder), "--locales", "cs"])
    assert caught.value.code == 2


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


# --- Text normalisation with a language ---------------------------------------------


def legacy_normalize(text: str) -> str:
    """normalize_text as it was before languages (the published form)."""
    text = unicodedata.normalize("NFC", text).casefold()
    kept = "".join(
        c
        if unicodedata.category(c).startswith("L")
        or unicodedata.category(c) in ("Mn", "Mc")
        else " "
        for c in text
    )
    return re.sub(r"\s+", " ", kept).strip()


def test_normalize_text_without_language_is_unchanged():
    samples = [
        "L'été, déjà ?",
        "L’été ʼ ‘x´y`z",
        "Don't stop — “quoted”, «guillemets» … 3.5%",
        "Straße İstanbul ΣΊΣΥΦΟΣ",
        "col·lecció l·l ŀl",
        "मनुष्य  हिन्दी ภาษาไทย",
        "Мʼясо, м'ясо; o‘zbek oʻzbek",
        "\u0065\u0301te\u0301",  # decomposed accents: NFC
        "",
        "   ",
        "tab\there\nnewline",
    ]
    for text in samples:
        assert normalize_text(text) == legacy_normalize(text), text
        assert normalize_text(text, None) == legacy_normalize(text), text


def test_apostrophe_kept_inside_words_of_its_languages():
    assert {"en", "fr", "it", "ca", "pt", "br", "uk", "be"} <= set(APOSTROPHE_LANGUAGES)
    for language, marks in IN_WORD_MARKS.items():
        for word in marks.values():
            assert normalize_text(word, language) == word, (language, word)
            assert normalize_text(word.upper(), language) == word.casefold()
    for char in APOSTROPHES:
        assert normalize_text(f"L{char}été", "fr") == "l'été"
        assert normalize_text(f"L{char}été", "es-MX") == "l été"
    assert normalize_text("'Quoted' words' end", "en") == "quoted words end"
    assert normalize_text("l' été", "fr") == "l été"
    assert normalize_text("Geht's", "de") == "geht's"
    assert normalize_text("Geht's", "cs") == "geht s"
    assert normalize_text("col·lecció", "ca") == "col·lecció"
    assert normalize_text("col·lecció", "fr") == "col lecció"
    assert normalize_text("Ünïcödé? ¡Sí! Ελληνικά.", "es") == "ünïcödé sí ελληνικά"
    assert normalize_text("C'hoant am eus", "br") == "c'hoant am eus"

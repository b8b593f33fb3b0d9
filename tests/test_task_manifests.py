"""Per-task manifests as SpeechBrain writes them, user text, and warm-start letters.

The per-language CSVs are built the way SpeechBrain's CommonVoice recipe writes
them (``ID, duration, wav, spk_id, wrd``, absolute audio paths, one folder per
language, no task column) from the tiny embedded corpus.
"""

import ast
import csv
import json
import re
from pathlib import Path

import pytest
import torch
from test_recipe import run_train

import adapt
from speechbrain_meta.asr import read_manifests
from speechbrain_meta.errors import SetupError
from speechbrain_meta.hparams import load_hparams
from speechbrain_meta.manifest_check import ManifestError
from speechbrain_meta.task_manifests import task_manifests

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "hparams" / "fomaml_ctc.yaml"
SPEECHBRAIN_COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]


def _rows(path: str) -> list:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _write(path: Path, rows: list, columns: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def speechbrain_folders(corpus: dict, root: Path, languages, edit=None) -> dict:
    """``<root>/<lang>/{train,dev,test}.csv`` without a task column.

    Returns ``{split: {lang: path}}``; ``edit(row)`` may change a row first.
    """
    folders = {}
    for split in ("train", "dev", "test"):
        for row in _rows(corpus[split]):
            if row["lang"] not in languages:
                continue
            row["wav"] = row["wav"].replace("$data_root", corpus["data_folder"])
            if edit is not None:
                edit(row)
            folders.setdefault(split, {}).setdefault(row["lang"], []).append(row)
    return {
        split: {
            lang: _write(root / lang / f"{split}.csv", rows, SPEECHBRAIN_COLUMNS)
            for lang, rows in by_lang.items()
        }
        for split, by_lang in folders.items()
    }


def _hparams(corpus: dict, tmp_path: Path, **overrides) -> dict:
    return load_hparams(
        str(YAML),
        {
            "data_folder": corpus["data_folder"],
            "output_folder": str(tmp_path / "run"),
            **overrides,
        },
    )


def _as_data(dataset) -> dict:
    return {i: dict(dataset.data[i]) for i in dataset.data_ids}


# ---------------------------------------------------------------- the value


def test_value_forms_and_errors():
    assert [(m.path, m.task) for m in task_manifests("a.csv", "train_csv")] == [
        ("a.csv", None)
    ]
    entries = task_manifests(["a.csv", {"cs": "cs.csv", "pt": "pt.csv"}], "x")
    assert [(m.path, m.task) for m in entries] == [
        ("a.csv", None),
        ("cs.csv", "cs"),
        ("pt.csv", "pt"),
    ]
    for bad, says in ((3, "must be a CSV path"), ([], "empty list"), ({}, "empty")):
        with pytest.raises(SetupError, match=says):
            task_manifests(bad, "train_csv")
    with pytest.raises(SetupError, match="not a task name and a CSV path"):
        task_manifests({"cs": ["a.csv"]}, "train_csv")


# ---------------------------------------------------------------- loading


def test_per_language_folders_load_as_the_multilingual_manifest(tiny_corpus, tmp_path):
    """A mapping of SpeechBrain per-language CSVs gives the same data."""
    languages = tiny_corpus["languages"]
    folders = speechbrain_folders(tiny_corpus, tmp_path / "cv", languages)
    assert "lang" not in _rows(folders["train"]["de"])[0]
    merged = read_manifests(_hparams(tiny_corpus, tmp_path))
    mapped = read_manifests(
        _hparams(
            tiny_corpus,
            tmp_path,
            train_csv=folders["train"],
            valid_csv=folders["dev"],
            test_csv=folders["test"],
        )
    )
    for split in ("train", "valid", "test"):
        assert _as_data(mapped[split]) == _as_data(merged[split]), split
    # The files are read, never written.
    assert "lang" not in _rows(folders["train"]["de"])[0]


def test_list_of_a_multilingual_csv_and_a_mapping(tiny_corpus, tmp_path):
    folders = speechbrain_folders(tiny_corpus, tmp_path / "cv", ["cs"])
    others = [r for r in _rows(tiny_corpus["train"]) if r["lang"] != "cs"]
    columns = list(others[0])
    rest = _write(tmp_path / "rest.csv", others, columns)
    hparams = _hparams(
        tiny_corpus, tmp_path, train_csv=[rest, {"cs": folders["train"]["cs"]}]
    )
    data = _as_data(read_manifests(hparams)["train"])
    expected = _as_data(read_manifests(_hparams(tiny_corpus, tmp_path))["train"])
    assert data == expected


def test_a_given_task_that_contradicts_the_file(tiny_corpus, tmp_path):
    hparams = _hparams(tiny_corpus, tmp_path, train_csv={"cs": tiny_corpus["train"]})
    with pytest.raises(SetupError, match=r"given as task 'cs' but its 'lang' column"):
        read_manifests(hparams)


def test_ids_shared_by_two_files_are_refused(tiny_corpus, tmp_path):
    folders = speechbrain_folders(tiny_corpus, tmp_path / "cv", ["de"])
    twin = tmp_path / "twin.csv"
    twin.write_text(Path(folders["train"]["de"]).read_text())
    hparams = _hparams(
        tiny_corpus, tmp_path, train_csv={"de": folders["train"]["de"], "nl": str(twin)}
    )
    with pytest.raises(SetupError, match="are in both"):
        read_manifests(hparams)


def test_a_missing_per_language_file_is_named(tiny_corpus, tmp_path):
    missing = str(tmp_path / "nowhere" / "train.csv")
    hparams = _hparams(tiny_corpus, tmp_path, train_csv={"de": missing})
    with pytest.raises(ManifestError, match=re.escape(missing)):
        read_manifests(hparams)


# ---------------------------------------------------------------- text


def _shout(row: dict) -> None:
    """Write a transcript as a user's manifest might have it."""
    if row["lang"] == "fr":
        row["wrd"] = "« " + row["wrd"].upper() + " », L’AMI !"
    else:
        row["wrd"] = row["wrd"].capitalize() + "."


def test_user_text_is_normalised_per_language(tiny_corpus, tmp_path):
    folders = speechbrain_folders(tiny_corpus, tmp_path / "cv", ["de", "fr"], _shout)
    hparams = _hparams(tiny_corpus, tmp_path, train_csv=folders["train"])
    data = _as_data(read_manifests(hparams)["train"])
    clean = {r["ID"]: r["wrd"] for r in _rows(tiny_corpus["train"])}
    for utt_id, row in data.items():
        if row["lang"] == "fr":
            # French keeps its word-internal apostrophe, typographic or not.
            assert row["wrd"] == f"{clean[utt_id]} l'ami", utt_id
        else:
            assert row["wrd"] == clean[utt_id], utt_id
    verbatim = _hparams(
        tiny_corpus, tmp_path, train_csv=folders["train"], keep_text_verbatim=True
    )
    data = _as_data(read_manifests(verbatim)["train"])
    assert all(row["wrd"].endswith((".", "!")) for row in data.values())


def test_a_transcript_of_only_punctuation(tiny_corpus, tmp_path):
    def punctuation(row):
        if row["ID"] == first:
            row["wrd"] = "... ?!"

    first = next(r["ID"] for r in _rows(tiny_corpus["train"]) if r["lang"] == "de")
    folders = speechbrain_folders(tiny_corpus, tmp_path / "cv", ["de"], punctuation)
    hparams = _hparams(tiny_corpus, tmp_path, train_csv=folders["train"])
    with pytest.raises(SetupError, match=f"transcripts of {first} are empty"):
        read_manifests(hparams)
    hparams["skip_bad_rows"] = True
    data = _as_data(read_manifests(hparams)["train"])
    assert first not in data and len(data) == 7


# ---------------------------------------------------------------- end to end


def test_train_py_on_speechbrain_per_language_manifests(tiny_corpus, tmp_path):
    """The command line a user of SpeechBrain's CommonVoice recipe types."""
    folders = speechbrain_folders(
        tiny_corpus, tmp_path / "cv", ["de", "fr", "es", "it", "cs"], _shout
    )

    def mapping(split):
        return "{" + ", ".join(f"{k}: {v}" for k, v in folders[split].items()) + "}"

    log = run_train(
        REPO / "hparams" / "maml_ctc.yaml", tiny_corpus, tmp_path / "run",
        "--number_of_epochs", "1", "--episodes_per_epoch", "2",
        "--train_csv", mapping("train"), "--valid_csv", mapping("dev"),
        "--test_csv", mapping("test"), "--target_tasks", "[cs]",
    )  # fmt: skip
    assert "Source tasks: ['de', 'es', 'fr', 'it']; held-out targets: ['cs']" in log
    assert "transcripts normalised" in log
    assert (tmp_path / "run" / "cer.txt").is_file()
    # adapt.py on the held-out language's own files.
    argv = [
        str(REPO / "hparams" / "adapt_ctc.yaml"), "--noprogressbar",
        "--output_folder", str(tmp_path / "adapted"),
        "--init_checkpoint", str(tmp_path / "run"), "--target", "cs",
        "--train_csv", f"{{cs: {folders['train']['cs']}}}",
        "--test_csv", f"{{cs: {folders['test']['cs']}}}",
        "--budget", "4", "--budget_unit", "utterances", "--curve_steps", "[0, 2]",
    ]  # fmt: skip
    curve = adapt.main(argv)
    assert [point["step"] for point in curve] == [0, 2]


def test_warm_start_onto_new_letters_extends_the_vocabulary(tiny_corpus, tmp_path):
    """A French run from an English and German one: é, è, ... get labels.

    The base run's output layer has no spare rows, so the warm run's grows;
    its rerun resumes from its own checkpoint with the grown layer.
    """
    rows = _rows(tiny_corpus["train"])
    base_letters = {c for r in rows if r["lang"] in ("en", "de") for c in r["wrd"]}
    french = {c for r in rows if r["lang"] == "fr" for c in r["wrd"]}
    new = sorted(french - base_letters)
    assert new, "the tiny corpus' French has letters that English and German lack"
    neurons = str(len(base_letters) + 4)  # and <blank>, <bos>, <eos>, <unk>
    base, warm = tmp_path / "base", tmp_path / "warm"
    short = ["--number_of_epochs", "1", "--episodes_per_epoch", "2"]
    short += ["--output_neurons", neurons, "--tasks_per_batch", "2"]
    run_train(YAML, tiny_corpus, base, *short, "--source_tasks", "[en, de]")
    assert len(_labels(base)) == int(neurons)
    options = [*short, "--init_from", str(base), "--source_tasks", "[fr, es]"]
    log = run_train(YAML, tiny_corpus, warm, *options)
    assert "The warm start's label encoder has no label for" in log
    labels = _labels(warm)
    assert set(new) <= set(labels) and set(_labels(base)) <= set(labels)
    record = json.loads((warm / "save" / "label_encoder.json").read_text())
    assert set(new) <= set(record["added_labels"])
    (checkpoint,) = (warm / "save").glob("CKPT+*/model.ckpt")
    assert torch.load(checkpoint)["1.w.weight"].shape[0] == len(labels)
    # A rerun (one more epoch) resumes from the run's own checkpoint.
    options[1] = "2"
    again = run_train(YAML, tiny_corpus, warm, *options)
    assert "The warm start's label encoder has no label for" not in again
    assert "Going into epoch 2" in again


def _labels(run: Path) -> list:
    """The labels of a run's label_encoder.txt."""
    text = (run / "save" / "label_encoder.txt").read_text(encoding="utf-8")
    lines = text.split("================")[0].splitlines()
    return [ast.literal_eval(line.rsplit(" => ", 1)[0]) for line in lines if line]

"""Inference folders: SpeechBrain interfaces that give the evaluation's hypotheses."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.inference.ASR import EncoderASR
from test_recipe import run_train

import adapt
import transcribe
from speechbrain_meta.audio import read_audio
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import run_script
from speechbrain_meta.inference import CTCASR, AttentionASR, load_asr, main, pieces
from speechbrain_meta.ngram import task_sentences, write_arpa

REPO = Path(__file__).resolve().parents[1]
# name: (train.py YAML and options, adapt.py YAML and options, inference class)
FAMILIES = {
    "ctc": (["maml_ctc.yaml"], ["adapt_ctc.yaml"], CTCASR),
    "lora": (["maml_lora_ctc.yaml"], ["adapt_lora_ctc.yaml"], CTCASR),
    "transformer": (
        ["multitask_attention.yaml"],
        ["adapt_attention.yaml"],
        AttentionASR,
    ),
    "rnn": (
        ["multitask_attention.yaml", "--decoder_type", "rnn"],
        ["adapt_attention.yaml", "--decoder_type", "rnn"],
        AttentionASR,
    ),
}


def scored(folder: Path) -> dict:
    """The hypothesis of every utterance in a run's wer.txt, words joined by a space."""
    hypotheses = {}
    for block in (folder / "wer.txt").read_text().split("=" * 80 + "\n"):
        lines = block.splitlines()
        if len(lines) >= 4 and ", %WER" in lines[0]:
            words = [w.strip() for w in lines[3].split(";")]
            hypotheses[lines[0].split(",")[0]] = " ".join(
                w for w in words if w != "<eps>"
            )
    return hypotheses


def target_files(corpus: dict, lang: str) -> dict:
    """The test utterances of ``lang``, by id, shortest first (as adapt.py sorts)."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        corpus["test"], replacements={"data_root": corpus["data_folder"]}
    ).filtered_sorted(key_test={"lang": lambda x: x == lang}, sort_key="duration")
    return {i: data.data[i]["wav"] for i in data.data_ids}


def evaluate(corpus, init, out, yaml, target, batch_size, steps="[0]", *options):
    """adapt.py's scores of ``target`` after ``steps``: the hypotheses of wer.txt."""
    argv = [
        str(REPO / "hparams" / yaml[0]), *yaml[1:], "--noprogressbar",
        "--data_folder", corpus["data_folder"], "--output_folder", str(out),
        "--init_checkpoint", str(init), "--target", target,
        "--budget", "6", "--budget_unit", "utterances", "--curve_steps", steps,
        "--test_batch_size", str(batch_size), "--selection_fraction", "0", *options,
    ]  # fmt: skip
    adapt.main(argv)  # no selection: the model kept is that of the last step
    return scored(out)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """``trained(name)``: a short train.py run of a family, made once.

    Its learning rate is negligible: the model stays near its random
    initialisation and emits many labels (spare rows included), where a
    trained tiny model sits on CTC's all-blank plateau and every hypothesis
    would be empty.
    """
    runs = {}

    def train(name: str) -> dict:
        if name not in runs:
            train_yaml, adapt_yaml, cls = FAMILIES[name]
            root = tmp_path_factory.mktemp(name)
            run_train(
                REPO / "hparams" / train_yaml[0], tiny_corpus, root / "train",
                *train_yaml[1:],
                "--number_of_epochs", "1", "--episodes_per_epoch", "2",
                "--tasks_per_batch", "2", "--eval_episodes", "2",
                "--meta_lr", "1e-9",
            )  # fmt: skip
            runs[name] = {"root": root, "adapt_yaml": adapt_yaml, "cls": cls}
        return runs[name]

    return train


@pytest.fixture(params=sorted(FAMILIES))
def family(request, trained):
    return trained(request.param)


@pytest.fixture
def ctc(trained):
    return trained("ctc")


def check_folder(folder: Path, files: dict, hypotheses: dict, cls, savedir: Path):
    """transcribe_file gives every hypothesis of a batch-of-one evaluation."""
    assert {p.name for p in folder.iterdir()} >= {
        "hyperparams.yaml", "model.ckpt", "tokenizer.ckpt",
    }  # fmt: skip
    asr = load_asr(str(folder), savedir=str(savedir))
    assert type(asr) is cls
    assert set(hypotheses) == set(files)
    assert all(hypotheses.values()), hypotheses  # not trivially equal
    for utterance, wav in files.items():
        assert asr.transcribe_file(wav) == hypotheses[utterance], utterance
    return asr


def check_batch(asr, files: dict, hypotheses: dict):
    """transcribe_batch of the evaluation's padded batch gives its hypotheses."""
    rate = asr.hparams.sample_rate
    wavs, lens = PaddedBatch([{"sig": read_audio(w, rate)} for w in files.values()]).sig
    texts, words = asr.transcribe_batch(wavs, lens)
    assert texts == [hypotheses[u] for u in files]
    assert all(texts)
    assert words == [t.split() for t in texts]


def test_inference_gives_the_evaluations_hypotheses(family, tiny_corpus, tmp_path):
    """Before adaptation (train.py's folder) and after (adapt.py's), every test file."""
    root, cls, yaml = family["root"], family["cls"], family["adapt_yaml"]
    # Before: a source language (no new letters), scored by the initialisation.
    files = target_files(tiny_corpus, "de")
    alone = evaluate(tiny_corpus, root / "train", tmp_path / "de1", yaml, "de", 1)
    asr = check_folder(root / "train" / "inference", files, alone, cls, tmp_path / "a")
    batched = evaluate(tiny_corpus, root / "train", tmp_path / "de2", yaml, "de", 2)
    check_batch(asr, files, batched)

    # After: adapted to Czech (new letters), the weights of save/CKPT+adapted.
    files = target_files(tiny_corpus, "cs")
    adapted = tmp_path / "cs"
    # (A small learning rate: three steps at 1e-3 reach CTC's blank plateau.)
    after = evaluate(
        tiny_corpus, root / "train", adapted, yaml, "cs", 1, "[0, 3]", "--lr", "1e-5"
    )
    assert (adapted / "inference" / "model.ckpt").read_bytes() == (
        adapted / "save" / "CKPT+adapted" / "model.ckpt"
    ).read_bytes()
    asr = check_folder(adapted / "inference", files, after, cls, tmp_path / "b")
    batched = evaluate(tiny_corpus, adapted, tmp_path / "cs2", yaml, "cs", 2)
    check_batch(asr, files, batched)
    if cls is CTCASR:  # SpeechBrain's own class: the same words
        plain = EncoderASR.from_hparams(
            source=str(adapted / "inference"), savedir=str(tmp_path / "c")
        )
        for utterance, wav in files.items():
            assert plain.transcribe_file(wav).split() == after[utterance].split()


@pytest.mark.parametrize("kind", ["beam", "prefix_beam"])
def test_beam_search_with_an_lm_in_the_curve_and_the_folder(
    ctc, tiny_corpus, tmp_path, kind
):
    """adapt.py's curve and its inference folder decode with the same beam + LM."""
    pytest.importorskip("kenlm", reason="kenlm is not installed (pip install .[lm])")
    lm = tmp_path / "cs.arpa"
    write_arpa(task_sentences(tiny_corpus["train"], "cs"), str(lm), order=2)
    out = tmp_path / "lm"
    hypotheses = evaluate(
        tiny_corpus, ctc["root"] / "train", out, ["adapt_ctc_lm.yaml"], "cs", 1,
        "[0, 3]", "--lr", "1e-5", "--ctc_decoder", kind, "--kenlm_model_path", str(lm),
    )  # fmt: skip
    folder = out / "inference"
    assert (folder / "lm.arpa").read_text() == lm.read_text()
    moved = tmp_path / "moved"
    shutil.move(str(folder), str(moved))  # the folder finds its own LM
    asr = check_folder(
        moved, target_files(tiny_corpus, "cs"), hypotheses, CTCASR, tmp_path / "s"
    )
    assert asr.decoding_function.kind == kind
    assert asr.decoding_function.searcher.kenlm_model_path == str(moved / "lm.arpa")


def test_the_export_command_and_its_errors(family, tmp_path, capsys):
    run = family["root"] / "train"
    (checkpoint,) = (run / "save").glob("CKPT+*")
    folder = main(["export", str(checkpoint), str(tmp_path / "out")])
    assert f"Inference folder: {folder}" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "model.ckpt").read_bytes() == (checkpoint / "model.ckpt").read_bytes()
    encoder = (run / "save" / "label_encoder.txt").read_text()
    assert (out / "tokenizer.ckpt").read_text() == encoder
    with pytest.raises(SetupError, match="No checkpoint of 'model'"):
        main(["export", str(tmp_path), str(tmp_path / "none")])
    with pytest.raises(SetupError, match="is not a speechbrain-meta model folder"):
        load_asr(str(tmp_path))


@pytest.fixture
def ctc_folder(ctc):
    return ctc["root"] / "train" / "inference"


def test_transcribe_command_outputs(ctc_folder, tiny_corpus, tmp_path, capsys):
    files = list(target_files(tiny_corpus, "de").values())
    signal, rate = soundfile.read(files[0])
    stereo = tmp_path / "stereo.wav"  # two equal channels: the same mono mean
    soundfile.write(str(stereo), np.stack([signal, signal], axis=1), rate)
    low = tmp_path / "8k.flac"
    soundfile.write(str(low), signal[::2], rate // 2)
    paths = [*files, str(stereo), str(low)]
    rows = transcribe.main([str(ctc_folder), *paths])
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{r['path']}\t{r['text']}" for r in rows]
    assert "4/4" in err  # the progress bar
    asr = load_asr(str(ctc_folder), savedir=str(tmp_path / "s"))
    expected = [asr.transcribe_file(path) for path in files]
    assert [r["text"] for r in rows[:3]] == [*expected, expected[0]]
    assert rows[3]["text"] == asr.transcribe_file(str(low))
    for name in ("results.csv", "results.json"):
        transcribe.main([str(ctc_folder), *paths, "--output", str(tmp_path / name)])
    with open(tmp_path / "results.csv", encoding="utf-8") as stream:
        assert list(csv.DictReader(stream)) == rows
    assert json.loads((tmp_path / "results.json").read_text("utf-8")) == rows


def test_long_files_are_cut_in_their_pauses(ctc_folder, tiny_corpus, tmp_path):
    files = list(target_files(tiny_corpus, "de").values())
    first, second = (soundfile.read(f)[0] for f in files)
    pause = np.zeros(8000)
    long = np.concatenate([first, pause, second, pause, first])
    path = tmp_path / "long.wav"
    soundfile.write(str(path), long, 16000)
    seconds = (len(first) + 8000 + len(second) + 4000) / 16000
    cuts = pieces(torch.from_numpy(long).float(), 16000, seconds)
    assert len(cuts) >= 2 and cuts[0][0] == 0 and cuts[-1][1] == len(long)
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    pauses = [len(first), len(first) + 8000 + len(second)]
    for _, end in cuts[:-1]:  # every cut in a pause
        assert any(p <= end < p + 8000 for p in pauses), (end, pauses)
    argv = [str(ctc_folder), str(path), "--max_seconds", str(seconds)]
    (row,) = transcribe.main(argv)
    assert row["text"]
    (whole,) = transcribe.main([str(ctc_folder), str(path)])  # 30 s: one piece
    asr = load_asr(str(ctc_folder), savedir=str(tmp_path / "s"))
    assert whole["text"] == asr.transcribe_file(str(path))


@pytest.mark.parametrize("problem", ["not a model", "missing", "empty", "corrupt"])
def test_transcribe_command_errors(ctc_folder, tmp_path, capsys, problem):
    audio = tmp_path / "a.wav"
    model = str(tmp_path) if problem == "not a model" else str(ctc_folder)
    if problem == "not a model":
        soundfile.write(str(audio), np.full(1600, 0.1), 16000)
    elif problem != "missing":
        audio.write_bytes(b"" if problem == "empty" else b"not audio at all")
    with pytest.raises(SystemExit) as stop:
        run_script(transcribe.main, [model, str(audio)])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = {
        "not a model": "is not a speechbrain-meta model folder",
        "missing": "no such file",
        "empty": "empty file (0 bytes)",
        "corrupt": "Cannot read the audio file",
    }[problem]
    assert line.startswith("error: ") and expected in line

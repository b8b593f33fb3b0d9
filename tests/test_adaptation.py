"""Low-resource adaptation: adapt.py, vocabulary extension, protocol outputs."""

import json
import os
import shutil

import matplotlib.image
import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.encoder import CTCTextEncoder

import adapt
import evaluate_adaptation
from speechbrain_meta.adaptation import (
    extend_vocabulary,
    find_init_checkpoint,
    select_budget,
)
from speechbrain_meta.asr import dataio_prepare, warm_start
from speechbrain_meta.hparams import load_hparams
from speechbrain_meta.protocol import RESULT_FIELDS, read_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPT_YAML = os.path.join(REPO, "hparams", "adapt_ctc.yaml")
TRAIN_YAML = os.path.join(REPO, "hparams", "maml_ctc.yaml")


@pytest.fixture(scope="module")
def init_run(tiny_corpus, tmp_path_factory):
    """A train.py output folder: label encoder and two checkpoints (CER 90, 80).

    The best checkpoint's CTC layer favours the blank, so that it differs
    from the random initialisation of the adaptation YAML.
    """
    folder = str(tmp_path_factory.mktemp("init_run"))
    hparams = load_hparams(
        TRAIN_YAML, {"data_folder": tiny_corpus["data_folder"], "output_folder": folder}
    )
    dataio_prepare(hparams)
    hparams["checkpointer"].save_checkpoint(meta={"CER": 90.0})
    with torch.no_grad():
        hparams["ctc_lin"].w.bias[hparams["blank_index"]] += 5.0
    hparams["checkpointer"].save_checkpoint(meta={"CER": 80.0})
    return folder


def run_adapt(tiny_corpus, folder, **options):
    args = {
        "data_folder": tiny_corpus["data_folder"],
        "output_folder": str(folder),
        "target": "cs",
        "budget": 6,
        "budget_unit": "utterances",
        "curve_steps": "[0, 10]",
        **options,
    }
    argv = [ADAPT_YAML, "--noprogressbar"]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return adapt.main(argv)


def test_adaptation_from_checkpoint_lowers_the_target_loss(
    init_run, tiny_corpus, tmp_path
):
    curve = run_adapt(tiny_corpus, tmp_path / "maml", init_checkpoint=init_run)
    assert [point["step"] for point in curve] == [0, 10]
    assert curve[1]["test_loss"] < 0.9 * curve[0]["test_loss"]
    assert curve[1]["train_loss"] > 0

    # Step 0 is the best checkpoint (CER 80), not a random initialisation.
    encoder_file = os.path.join(init_run, "save", "label_encoder.txt")
    random = run_adapt(
        tiny_corpus,
        tmp_path / "random",
        init_checkpoint="null",
        label_encoder_file=encoder_file,
        curve_steps="[0]",
    )
    assert abs(random[0]["test_loss"] - curve[0]["test_loss"]) > 0.1

    out = tmp_path / "maml"
    rows = read_results(out / "curve.csv")
    assert [(r["init"], r["target"], r["budget"], r["step"]) for r in rows] == [
        ("maml", "cs", "6utt", 0),
        ("maml", "cs", "6utt", 10),
    ]
    assert rows[1]["cer"] == pytest.approx(curve[1]["cer"])
    for name in ("wer.txt", "cer.txt"):
        assert (out / name).read_text().startswith("%WER")

    # Czech letters were added after the characters of the sources.
    base = CTCTextEncoder.from_saved(encoder_file)
    extended = CTCTextEncoder.from_saved(str(out / "save" / "label_encoder.txt"))
    assert extended.lab2ind.items() >= base.lab2ind.items()
    assert "ř" in extended.lab2ind and "ř" not in base.lab2ind


def test_the_adapted_model_is_saved_and_warm_starts_a_training(
    init_run, tiny_corpus, tmp_path
):
    """adapt.py saves the weights after its last step; train.py reads them."""
    out = tmp_path / "adapted"
    curve = run_adapt(tiny_corpus, out, init_checkpoint=init_run)
    (paramfile,) = (out / "save").glob("CKPT+adapted/model.ckpt")
    adapted = torch.load(paramfile)
    initial = torch.load(find_init_checkpoint(init_run).paramfile)
    assert any(not torch.equal(adapted[k], initial[k]) for k in initial)
    meta = (out / "save" / "CKPT+adapted" / "CKPT.yaml").read_text()
    assert f"CER: {curve[-1]['cer']}" in meta

    warm = tmp_path / "warm"
    hparams = load_hparams(
        TRAIN_YAML,
        {
            "data_folder": tiny_corpus["data_folder"],
            "output_folder": str(warm),
            "init_from": str(out),
        },
    )
    warm_start(hparams)
    for name, value in hparams["model"].state_dict().items():
        assert torch.equal(value, adapted[name]), name
    assert (warm / "save" / "label_encoder.txt").read_text() == (
        out / "save" / "label_encoder.txt"
    ).read_text()


@pytest.mark.parametrize(
    ("patience", "message"),
    [(3, "Loss is not finite"), (10000, "adapted model is not finite")],
)
def test_a_diverged_adaptation_is_not_saved(
    init_run, tiny_corpus, tmp_path, patience, message
):
    """Stopped by SpeechBrain's nonfinite_patience, or else before saving.

    (Without the selection: it keeps the last step, which diverged.)
    """
    out = tmp_path / "diverged"
    with pytest.raises((RuntimeError, ValueError), match=message):
        run_adapt(
            tiny_corpus, out, init_checkpoint=init_run, adapt_optimizer="sgd", lr=1e30,
            nonfinite_patience=patience, selection_fraction=0,
        )  # fmt: skip
    assert not list(out.glob("save/CKPT+*"))


def test_the_selection_keeps_the_step_before_a_divergence(
    init_run, tiny_corpus, tmp_path
):
    out = tmp_path / "diverged"
    run_adapt(
        tiny_corpus, out, init_checkpoint=init_run, adapt_optimizer="sgd", lr=1e30,
        nonfinite_patience=10000,
    )  # fmt: skip
    assert json.loads((out / "selection.json").read_text())["step"] == 0
    # What is kept is the initialisation (with the target's new letters).
    start = tmp_path / "start"
    run_adapt(
        tiny_corpus, start, init_checkpoint=init_run, curve_steps="[0]",
        selection_fraction=0,
    )  # fmt: skip
    kept, initial = (
        torch.load(folder / "save" / "CKPT+adapted" / "model.ckpt")
        for folder in (out, start)
    )
    assert all(torch.equal(kept[k], initial[k]) for k in initial)


@pytest.mark.parametrize("rows", [128, None])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_vocabulary_extension_keeps_the_old_rows(rows, kind):
    encoder = CTCTextEncoder()
    encoder.update_from_iterable(["trava", "kos"], sequence_input=True)
    encoder.handle_special_labels(
        {"blank_label": 0, "bos_label": 1, "eos_label": 2, "unk_label": "<unk>"}
    )
    old = dict(encoder.lab2ind)
    size = rows or len(old)
    if kind == "linear":
        module = sb.nnet.linear.Linear(input_size=6, n_neurons=size)
        layer = module.w
    else:
        module = sb.nnet.embedding.Embedding(num_embeddings=size, embedding_dim=6)
        layer = module.Embedding
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone() if kind == "linear" else None

    new = extend_vocabulary(encoder, ["tráva", "řeka", "kos ß"], [module])

    assert new == {" ": "", "e": "", "ß": "", "á": "a", "ř": "r"}
    assert {k: encoder.lab2ind[k] for k in old} == old
    assert layer.weight.shape[0] == max(size, len(encoder))
    kept = list(old.values())
    assert torch.equal(layer.weight[kept], weight[kept])
    index = encoder.lab2ind
    assert torch.equal(layer.weight[index["ř"]], weight[index["r"]])
    assert torch.equal(layer.weight[index["á"]], weight[index["a"]])
    letters = [index[c] for c in "trvakos"]
    assert torch.allclose(layer.weight[index["ß"]], weight[letters].mean(0))
    if bias is not None:
        assert torch.equal(layer.bias[kept], bias[kept])
        assert layer.bias[index["ř"]] == bias[index["r"]]
        output = module(torch.zeros(1, 6))
        assert output.shape[-1] == layer.weight.shape[0]
    else:
        embedded = module(torch.tensor([[index["ř"], index["r"]]]))
        assert torch.equal(embedded[0, 0], embedded[0, 1])


def test_budget_in_minutes_is_a_deterministic_nested_prefix():
    durations = {f"u{i}": 5.0 + i % 7 for i in range(60)}
    two = select_budget(durations, 2, "minutes", seed=3)
    five = select_budget(durations, 5, "minutes", seed=3)
    assert five[: len(two)] == two
    assert 110 < sum(durations[i] for i in two) <= 120
    assert two == select_budget(durations, 2, "minutes", seed=3)
    assert two != select_budget(durations, 2, "minutes", seed=4)
    with pytest.raises(ValueError, match="more than the"):
        select_budget(durations, 10, "minutes", seed=3)


def test_best_checkpoint_is_chosen_by_validation_cer(init_run):
    found = find_init_checkpoint(init_run)
    state = torch.load(found.paramfile)
    bias = [v for k, v in state.items() if k.endswith("w.bias")][0]
    assert bias[0] > 4.0  # the CER 80 checkpoint (blank favoured)
    assert found.save_folder == os.path.join(init_run, "save")


def test_clear_errors(init_run, tiny_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="'no/such/run' does not exist"):
        run_adapt(tiny_corpus, tmp_path / "a", init_checkpoint="no/such/run")
    with pytest.raises(FileNotFoundError, match="No checkpoint of 'model'"):
        run_adapt(tiny_corpus, tmp_path / "b", init_checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="Target 'xx' has no utterances"):
        run_adapt(tiny_corpus, tmp_path / "c", init_checkpoint=init_run, target="xx")
    with pytest.raises(ValueError, match="does not fit the model"):
        run_adapt(tiny_corpus, tmp_path / "d", init_checkpoint=init_run, rnn_size=32)
    with pytest.raises(ValueError, match="budget of 50 utterances is more"):
        run_adapt(tiny_corpus, tmp_path / "e", init_checkpoint=init_run, budget=50)


PROTOCOL = """
seed: 1234
title: Test protocol
output_folder: {out}
data_preparation: []
inits:
    trained: {init}
    random: null
train_overrides: {{}}
targets:
    cs:
        data_folder: {data}
        task: cs
budgets: [3, 6]
budget_unit: utterances
curve_steps: [0, 2]
adapt_hparams: {adapt}
adapt_overrides:
    batch_size: 3
comparisons:
    - [trained, random]
"""


def test_protocol_writes_csv_report_and_plots(init_run, tiny_corpus, tmp_path):
    protocol = tmp_path / "protocol.yaml"
    out = tmp_path / "out"
    protocol.write_text(
        PROTOCOL.format(
            out=out, init=init_run, data=tiny_corpus["data_folder"], adapt=ADAPT_YAML
        )
    )
    outputs = evaluate_adaptation.main([str(protocol), "--noprogressbar"])

    rows = read_results(outputs["csv"])
    assert len(rows) == 2 * 2 * 2
    assert {(r["init"], r["budget"]) for r in rows} == {
        (init, budget) for init in ("trained", "random") for budget in ("3utt", "6utt")
    }
    assert all(0 <= r["cer"] and 0 <= r["wer"] for r in rows)
    with open(outputs["csv"], encoding="utf-8") as stream:
        assert stream.readline().strip() == ",".join(RESULT_FIELDS)
    # One seed: today's columns and layout, and a summary beside the CSV.
    assert not list(out.glob("seed_*")) and os.path.isfile(outputs["summary"])

    report = open(outputs["report"], encoding="utf-8").read()
    assert report.startswith("# Test protocol")
    assert "| cs | 3utt | trained |" in report
    assert "| trained < random |" in report

    assert outputs["plots"] == [str(out / "cer_cs.png")]
    image = matplotlib.image.imread(outputs["plots"][0])
    assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0

    # A rerun reuses every finished adaptation.
    csv_file = out / "adapt" / "cs" / "3utt" / "random" / "curve.csv"
    stamp = os.path.getmtime(csv_file)
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    assert os.path.getmtime(csv_file) == stamp
    assert read_results(outputs["csv"]) == rows


CONTINUED_PROTOCOL = """
seed: 1234
title: Continued training
output_folder: {out}
data_preparation: []
inits:
    base: {init}
    continued: {train}
train_overrides:
    data_folder: {data}
    skip_prep: True
init_overrides:
    continued:
        init_from: {init}
        number_of_epochs: 1
        episodes_per_epoch: 1
        tasks_per_batch: 2
        support_size: 2
        query_size: 2
        eval_support_size: 1
        eval_query_size: 1
        eval_episodes: 1
adapted_inits: [continued]
targets:
    cs:
        data_folder: {data}
        task: cs
budgets: [3]
budget_unit: utterances
curve_steps: {steps}
adapt_hparams: {adapt}
adapt_overrides:
    batch_size: 3
comparisons: []
"""


def test_protocol_trains_from_another_init_and_reruns_stale_stages(
    init_run, tiny_corpus, tmp_path
):
    """A training stage warm-started from another init, only the adapted inits
    adapted, and a stage whose settings changed run afresh."""
    protocol = tmp_path / "protocol.yaml"
    out = tmp_path / "out"

    def run(steps):
        protocol.write_text(
            CONTINUED_PROTOCOL.format(
                out=out,
                init=init_run,
                data=tiny_corpus["data_folder"],
                adapt=ADAPT_YAML,
                train=TRAIN_YAML,
                steps=steps,
            )  # fmt: skip
        )
        outputs = evaluate_adaptation.main([str(protocol), "--noprogressbar"])
        return read_results(outputs["csv"])

    rows = run("[0, 1]")
    assert {(r["init"], r["step"]) for r in rows} == {
        ("continued", 0),
        ("continued", 1),
    }
    log = (out / "train" / "continued" / "log.txt").read_text()
    assert "Warm start from" in log and init_run in log
    adapted = out / "adapt" / "cs" / "3utt" / "continued"
    (adapted / "stale").write_text("from the first run")
    rows = run("[0, 2]")
    assert {r["step"] for r in rows} == {0, 2}
    assert not (adapted / "stale").exists()
    # The finished stage is moved aside, not deleted.
    (aside,) = adapted.parent.glob("continued.replaced-*")
    assert (aside / "stale").read_text() == "from the first run"
    assert {r["step"] for r in read_results(aside / "curve.csv")} == {0, 1}


def test_an_init_added_in_front_reruns_no_other_adaptation(
    init_run, tiny_corpus, tmp_path
):
    """Each init is adapted with its own character encoder, a random one with
    the protocol's copy: adding an init before the others (whose encoder is
    the same file elsewhere) leaves their finished adaptations finished."""
    protocol = tmp_path / "protocol.yaml"
    out = tmp_path / "out"
    text = PROTOCOL.format(
        out=out, init=init_run, data=tiny_corpus["data_folder"], adapt=ADAPT_YAML
    ).replace("budgets: [3, 6]", "budgets: [3]")
    protocol.write_text(text)
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    copy = tmp_path / "copy"
    shutil.copytree(init_run, copy)
    protocol.write_text(text.replace("inits:\n", f"inits:\n    copy: {copy}\n"))
    outputs = evaluate_adaptation.main([str(protocol), "--noprogressbar"])

    assert not list((out / "adapt").rglob("*.replaced-*"))
    rows = read_results(outputs["csv"])
    assert {row["init"] for row in rows} == {"copy", "trained", "random"}
    adapted = out / "adapt" / "cs" / "3utt"
    encoder = {
        init: json.loads((adapted / init / "stage.json").read_text())["settings"][
            "inputs_sha256"
        ]
        for init in ("copy", "trained", "random")
    }
    assert str(copy / "save" / "label_encoder.txt") in encoder["copy"]
    assert os.path.join(init_run, "save", "label_encoder.txt") in encoder["trained"]
    assert str(out / "label_encoder.txt") in encoder["random"]


def test_protocol_rejects_unknown_adapted_inits(init_run, tiny_corpus, tmp_path):
    protocol = tmp_path / "protocol.yaml"
    text = PROTOCOL.format(
        out=tmp_path / "out", init=init_run, data=tiny_corpus["data_folder"],
        adapt=ADAPT_YAML,
    )  # fmt: skip
    protocol.write_text(text + "adapted_inits: [trained, nope]\n")
    with pytest.raises(ValueError, match=r"adapted_inits \['nope'\] are not in"):
        evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    assert not (tmp_path / "out" / "adapt").exists()

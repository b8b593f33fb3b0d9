"""The inner-loop variant configs through train.py and adapt.py: ANIL, LoRA,
learnt inner rates."""

import csv
import re
from pathlib import Path

import pytest
import torch
from test_recipe import run_train

import adapt
from speechbrain_meta.errors import SetupError
from speechbrain_meta.hparams import load_hparams

REPO = Path(__file__).resolve().parents[1]
HPARAMS = REPO / "hparams"
SHORT = [
    "--number_of_epochs", "1", "--episodes_per_epoch", "2", "--eval_episodes", "2",
    "--tasks_per_batch", "2", "--speed_perturb", "null",
]  # fmt: skip
SMALL_TRANSFORMER = ["--d_model", "32", "--d_ffn", "64", "--max_decode_ratio", "0.3"]


@pytest.mark.parametrize(
    ("yaml", "options"),
    [
        ("maml_anil_ctc.yaml", []),
        ("maml_lora_ctc.yaml", []),
        ("maml_lslr_ctc.yaml", []),
        ("maml_lora_attention.yaml", SMALL_TRANSFORMER),
        ("maml_anil_attention.yaml", SMALL_TRANSFORMER),
    ],
)
def test_variant_config_runs_debug_to_the_end(yaml, options, tiny_corpus, tmp_path):
    output = run_train(
        HPARAMS / yaml, tiny_corpus, tmp_path, "--debug", "--tasks_per_batch", "2",
        *options,
    )  # fmt: skip
    assert "Traceback" not in output
    assert re.search(r"%WER \d+\.\d+", (tmp_path / "wer.txt").read_text())
    log = (tmp_path / "train_log.txt").read_text()
    assert "epoch: 2" in log and "test CER" in log
    if "lslr" in yaml:
        assert re.search(r"train inner_lr_mean: [\d.e+-]+", log), log


def initial_weights(yaml: Path, tmp_path: Path) -> dict:
    """The model a run of ``yaml`` starts from (the seed fixes it)."""
    from speechbrain_meta.asr import insert_adapters

    hparams = load_hparams(str(yaml), {"output_folder": str(tmp_path / "initial")})
    insert_adapters(hparams)
    return {k: v.clone() for k, v in hparams["model"].state_dict().items()}


def test_lora_with_a_frozen_base_learns_only_the_adapters_and_head(
    tiny_corpus, tmp_path
):
    yaml = HPARAMS / "maml_lora_ctc.yaml"
    out = tmp_path / "run"
    run_train(yaml, tiny_corpus, out, *SHORT, "--meta_params", '["*adapter*", ctc_lin]')
    (checkpoint,) = out.glob("save/CKPT+*/model.ckpt")
    trained, initial = torch.load(checkpoint), initial_weights(yaml, tmp_path)
    assert list(trained) == list(initial)
    adapters = [k for k in trained if "adapter" in k]
    assert len(adapters) == 4  # down and up projections of the two convolutions
    for name, value in trained.items():
        learnt = "adapter" in name or name.startswith("1.")  # 1: ctc_lin
        assert torch.equal(value, initial[name]) != learnt, name


@pytest.fixture(scope="module")
def lslr_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lslr_run")
    run_train(HPARAMS / "maml_lslr_ctc.yaml", tiny_corpus, out, *SHORT)
    return out


def run_adapt(tiny_corpus, yaml, out, **options):
    options = {
        "data_folder": tiny_corpus["data_folder"], "output_folder": str(out),
        "target": "cs", "budget": 6, "budget_unit": "utterances",
        "curve_steps": "[0, 2]", "batch_size": 3, **options,
    }  # fmt: skip
    argv = [str(HPARAMS / yaml), "--noprogressbar"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return adapt.main(argv)


def test_adapt_with_the_learnt_rates_takes_their_steps(lslr_run, tiny_corpus, tmp_path):
    (rates_file,) = lslr_run.glob("save/CKPT+*/inner_rates.ckpt")
    curve = run_adapt(
        tiny_corpus, "adapt_ctc.yaml", tmp_path / "learnt",
        init_checkpoint=lslr_run, adapt_optimizer="learnt",
    )  # fmt: skip
    assert [point["step"] for point in curve] == [0, 2]
    assert curve[1]["test_loss"] != curve[0]["test_loss"]
    with open(tmp_path / "learnt" / "curve.csv", encoding="utf-8") as stream:
        assert len(list(csv.DictReader(stream))) == 2
    assert (tmp_path / "learnt" / "save" / "CKPT+adapted" / "model.ckpt").is_file()


def test_adapt_with_learnt_rates_needs_an_init_that_learnt_them(
    lslr_run, tiny_corpus, tmp_path
):
    with pytest.raises(SetupError, match="needs an init_checkpoint"):
        run_adapt(
            tiny_corpus, "adapt_ctc.yaml", tmp_path / "a", adapt_optimizer="learnt"
        )
    plain = tmp_path / "plain"
    run_train(HPARAMS / "fomaml_ctc.yaml", tiny_corpus, plain, *SHORT)
    with pytest.raises(SetupError, match="no learnt inner rates"):
        run_adapt(
            tiny_corpus, "adapt_ctc.yaml", tmp_path / "b",
            init_checkpoint=plain, adapt_optimizer="learnt",
        )  # fmt: skip


# The YAML and optimizer of each kind of adaptation below.
LORA = {"yaml": "adapt_lora_ctc.yaml"}
ANIL_HEAD = {"yaml": "adapt_ctc.yaml", "adapt_optimizer": "sgd", "lr": 0.05}


def wrapped_name(name: str, names) -> str:
    """A weight's name in a model whose layer an adapter wraps, if it is."""
    layer, _, weight = name.rpartition(".")
    inside = f"{layer}.pretrained_module.{weight}"
    return inside if inside in names else name


@pytest.mark.parametrize(
    ("init_yaml", "inner_params", "adapted", "adaptation"),
    [
        ("maml_lora_ctc.yaml", '["*adapter*"]', {"adapter"}, LORA),
        ("maml_lora_ctc.yaml", '["*adapter*", ctc_lin]', {"adapter", "1."}, LORA),
        # A checkpoint without adapters: they are inserted after it loads.
        ("multitask_ctc.yaml", '["*adapter*", ctc_lin]', {"adapter", "1."}, LORA),
        # ANIL's inner loop at test time: the output layer alone, by SGD.
        ("maml_anil_ctc.yaml", "[ctc_lin]", {"1."}, ANIL_HEAD),
    ],
)
def test_adapt_adapts_what_inner_params_select(
    init_yaml, inner_params, adapted, adaptation, tiny_corpus, tmp_path
):
    init = tmp_path / "init"
    run_train(HPARAMS / init_yaml, tiny_corpus, init, *SHORT)
    (checkpoint,) = init.glob("save/CKPT+*/model.ckpt")
    out = tmp_path / "adapted"
    run_adapt(  # a source language: no new characters, no new output rows
        tiny_corpus, out=out, init_checkpoint=init, inner_params=inner_params,
        target="de", selection_fraction=0, **adaptation,
    )  # fmt: skip
    before, after = (
        torch.load(checkpoint),
        torch.load(out / "save/CKPT+adapted/model.ckpt"),
    )
    # Wrapped layers keep their weights under the adapter's pretrained_module.
    before = {wrapped_name(name, after): value for name, value in before.items()}
    assert set(before) <= set(after)
    assert any("adapter" in name for name in after) == ("adapter" in adapted)
    for name, value in after.items():
        changed = name not in before or not torch.equal(value, before[name])
        selected = any(part in name if part == "adapter" else name.startswith(part)
                       for part in adapted)  # fmt: skip
        assert changed == selected, name

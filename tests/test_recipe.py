"""The generic recipe: every YAML loads, every CTC config trains end to end."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from speechbrain_meta.asr import warm_start
from speechbrain_meta.hparams import load_hparams
from speechbrain_meta.study import init_regimes

REPO = Path(__file__).resolve().parents[1]
# Every YAML that is a configuration on its own (the layers of hparams/models
# and hparams/algorithms, training.yaml and adaptation.yaml are loaded through
# them).
YAMLS = sorted((REPO / "hparams").glob("*.yaml"))
YAMLS = [p for p in YAMLS if p.name not in ("training.yaml", "adaptation.yaml")]
# The four algorithms' configs (the inner-loop variants: test_recipe_variants.py).
CTC_YAMLS = [
    REPO / "hparams" / f"{name}_ctc.yaml"
    for name in ("fomaml", "maml", "multitask", "reptile")
]
# The tiny corpus has 8 train and 2 dev/test utterances per language.
TINY = [
    "--support_size", "3", "--query_size", "3",
    "--eval_support_size", "1", "--eval_query_size", "1",
]  # fmt: skip


def run_train(yaml: Path, corpus: dict, output: Path, *options: str) -> str:
    command = [
        sys.executable, "train.py", str(yaml),
        "--data_folder", corpus["data_folder"], "--skip_prep", "True",
        "--output_folder", str(output), *TINY, *options,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("yaml", YAMLS, ids=lambda p: p.name)
def test_yaml_loads(yaml, tmp_path, monkeypatch):
    overrides = {"output_folder": str(tmp_path)}
    if "ssl_ctc" in yaml.name:  # a pretrained encoder: the tiny offline stand-in
        pytest.importorskip("transformers")
        from speechbrain_meta.tiny_ssl import build_tiny_ssl

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        overrides["ssl_source"] = build_tiny_ssl("wav2vec2", str(tmp_path / "ssl"))
    hparams = load_hparams(str(yaml), overrides)
    assert hparams
    if "inits" in hparams:  # a protocol: SetupError unless regimes and baselines agree
        init_regimes(hparams, hparams.get("adapted_inits") or list(hparams["inits"]))


@pytest.mark.parametrize("yaml", CTC_YAMLS, ids=lambda p: p.name)
def test_ctc_recipe_runs_debug_to_the_end(yaml, tiny_corpus, tmp_path):
    assert len(CTC_YAMLS) == 4
    run_train(yaml, tiny_corpus, tmp_path, "--debug")
    for name in ("wer.txt", "cer.txt"):
        text = (tmp_path / name).read_text()
        assert re.search(r"%WER \d+\.\d+", text), text[:200]
    log = (tmp_path / "train_log.txt").read_text()
    assert "epoch: 2" in log and "valid CER" in log and "test CER" in log
    encoder = (tmp_path / "save" / "label_encoder.txt").read_text()
    assert "'<blank>' => 0" in encoder
    # The held-out targets (cs, pt) never reach training: no Czech-only letters.
    assert "'ř'" not in encoder and "'ů'" not in encoder


def test_maml_loss_falls_on_tiny_speech(tiny_corpus, tmp_path):
    run_train(
        REPO / "hparams" / "maml_ctc.yaml", tiny_corpus, tmp_path,
        "--number_of_epochs", "3", "--episodes_per_epoch", "4",
        "--tasks_per_batch", "2", "--speed_perturb", "null",
    )  # fmt: skip
    losses = [
        float(m) for m in re.findall(
            r"train query_loss: ([\d.]+)", (tmp_path / "train_log.txt").read_text()
        )
    ]  # fmt: skip
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    checkpoints = list((tmp_path / "save").glob("CKPT+*/model.ckpt"))
    assert checkpoints


def test_source_tasks_restrict_training(tiny_corpus, tmp_path):
    """Only the named source tasks reach the model and its character set."""
    run_train(
        REPO / "hparams" / "fomaml_ctc.yaml", tiny_corpus, tmp_path, "--debug",
        "--source_tasks", "[de, fr]", "--tasks_per_batch", "2",
    )  # fmt: skip
    assert "Source tasks: ['de', 'fr']" in (tmp_path / "log.txt").read_text()
    with open(tiny_corpus["train"], encoding="utf-8") as f:
        characters = {
            char for row in csv.DictReader(f) if row["lang"] in ("de", "fr")
            for char in row["wrd"]
        }  # fmt: skip
    encoder = (tmp_path / "save" / "label_encoder.txt").read_text()
    labels = set(re.findall(r"^'(.)' => \d+$", encoder, flags=re.MULTILINE))
    assert labels == characters


def test_warm_start_loads_another_runs_best_parameters(tiny_corpus, tmp_path):
    """``init_from`` gives a run the base run's parameters and encoder."""
    import torch

    yaml = REPO / "hparams" / "fomaml_ctc.yaml"
    base, warm = tmp_path / "base", tmp_path / "warm"
    run_train(
        yaml, tiny_corpus, base, "--number_of_epochs", "1",
        "--episodes_per_epoch", "2", "--eval_episodes", "3",
    )  # fmt: skip
    hparams = load_hparams(
        str(yaml), {"output_folder": str(warm), "init_from": str(base)}
    )
    (checkpoint,) = (base / "save").glob("CKPT+*/model.ckpt")
    expected = torch.load(checkpoint)
    assert any(
        not torch.equal(value, expected[name])
        for name, value in hparams["model"].state_dict().items()
    )
    warm_start(hparams)
    for name, value in hparams["model"].state_dict().items():
        assert torch.equal(value, expected[name]), name
    encoder = (warm / "save" / "label_encoder.txt").read_text()
    assert encoder == (base / "save" / "label_encoder.txt").read_text()

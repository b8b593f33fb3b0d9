"""The layout: layered YAMLs that state only what differs, scripts that import
no other script and run from any folder."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_meta.errors import SetupError
from speechbrain_meta.hparams import load_hparams, resolve_hparams

REPO = Path(__file__).resolve().parents[1]
HPARAMS = REPO / "hparams"
SCRIPTS = ("train", "adapt", "evaluate_adaptation")


def is_scalar(value) -> bool:
    if isinstance(value, list):
        return all(map(is_scalar, value))
    return isinstance(value, (int, float, str, bool, type(None)))


def scalars(hparams: dict) -> dict:
    return {key: value for key, value in hparams.items() if is_scalar(value)}


@pytest.mark.parametrize("name", ["fomaml", "reptile", "multitask"])
def test_an_algorithm_yaml_changes_only_the_algorithm(name, tmp_path):
    folder = {"output_folder": str(tmp_path)}
    maml = scalars(load_hparams(str(HPARAMS / "maml_ctc.yaml"), folder))
    other = scalars(load_hparams(str(HPARAMS / f"{name}_ctc.yaml"), folder))
    changed = {key for key in set(maml) | set(other) if maml.get(key) != other.get(key)}
    algorithm_keys = {
        key
        for algorithm in (name, "maml")
        for key in load_hparams(str(HPARAMS / "algorithms" / f"{algorithm}.yaml"))
    }
    assert changed <= algorithm_keys
    assert "algorithm" in changed
    text = (HPARAMS / f"{name}_ctc.yaml").read_text()
    assert [line for line in text.splitlines() if line and line[0] not in "# "] == [
        f"base: [training.yaml, models/ctc.yaml, algorithms/{name}.yaml]"
    ]


def test_training_and_adaptation_build_the_same_model(tmp_path):
    folder = {"output_folder": str(tmp_path)}
    training = load_hparams(str(HPARAMS / "maml_ctc.yaml"), folder)
    adaptation = load_hparams(str(HPARAMS / "adapt_ctc.yaml"))
    trained, adapted = training["model"].state_dict(), adaptation["model"].state_dict()
    assert list(trained) == list(adapted)
    for name, value in trained.items():  # same seed: same initial weights too
        assert torch.equal(value, adapted[name]), name


@pytest.mark.parametrize(
    ("decoder_type", "modules", "absent"),
    [
        ("transformer", {"CNN", "Transformer", "ctc_lin", "seq_lin"}, "rnn_size"),
        ("rnn", {"encoder", "embedding", "decoder", "ctc_lin", "seq_lin"}, "d_model"),
    ],
)
def test_decoder_type_builds_only_its_family(decoder_type, modules, absent, tmp_path):
    overrides = {"decoder_type": decoder_type, "output_folder": str(tmp_path)}
    hparams = load_hparams(str(HPARAMS / "maml_attention.yaml"), overrides)
    assert set(hparams["modules"]) == modules
    assert absent not in hparams
    with pytest.raises(SetupError, match=f"Unknown key '{absent}'"):
        load_hparams(str(HPARAMS / "maml_attention.yaml"), {**overrides, absent: 8})


def test_layers_merge_in_order_and_name_keys_in_base_paths(tmp_path):
    (tmp_path / "first.yaml").write_text("a: 1\nb: 1\nkind: small\n")
    (tmp_path / "small.yaml").write_text("b: 2\nsize: 10\n")
    (tmp_path / "large.yaml").write_text("b: 3\nsize: 1000\n")
    (tmp_path / "run.yaml").write_text(
        "base: [first.yaml, <kind>.yaml]\na: 5\ntotal: !ref <a> + <size>\n"
    )
    run = str(tmp_path / "run.yaml")
    assert load_hparams(run) == {"a": 5, "b": 2, "kind": "small", "size": 10,
                                 "total": 15}  # fmt: skip
    assert load_hparams(run, "kind: large")["total"] == 1005
    flat = load_hyperpyyaml(resolve_hparams(run, "kind: large"))
    assert flat == load_hparams(run, "kind: large")
    with pytest.raises(SetupError, match="Unknown key 'sise'"):
        load_hparams(run, {"sise": 1})
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(SetupError, match="its own base"):
        load_hparams(str(tmp_path / "loop.yaml"))
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(SetupError, match="nowhere.yaml does not exist"):
        load_hparams(str(tmp_path / "missing.yaml"))


def imported_modules(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "path",
    [REPO / f"{s}.py" for s in SCRIPTS] + sorted((REPO / "benchmarks").glob("*.py")),
    ids=lambda p: p.name,
)
def test_no_script_imports_another_script(path):
    assert not imported_modules(path) & set(SCRIPTS)


def test_train_runs_from_another_working_directory(tiny_corpus, tmp_path):
    """As a SpeechBrain recipe: python /path/to/train.py /path/to/hparams.yaml."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            str(HPARAMS / "fomaml_ctc.yaml"),
            "--data_folder",
            tiny_corpus["data_folder"],
            "--skip_prep",
            "True",
            "--output_folder",
            str(elsewhere / "out"),
            "--debug",
            "--noprogressbar",
            "--support_size",
            "3",
            "--query_size",
            "3",
            "--eval_support_size",
            "1",
            "--eval_query_size",
            "1",
        ],  # fmt: skip
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = elsewhere / "out"
    assert (out / "cer.txt").is_file() and (out / "train.py").is_file()
    saved = load_hyperpyyaml((out / "hyperparams.yaml").read_text())
    assert saved["brain_class"].__name__ == "FOMAML"
    assert saved["data_folder"] == tiny_corpus["data_folder"]

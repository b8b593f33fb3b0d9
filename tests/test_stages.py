"""Protocol stages: subprocesses that are reused, resumed or set aside, never
deleted, and the protocol under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_adaptation import ADAPT_YAML, TRAIN_YAML

import evaluate_adaptation
from speechbrain_meta.protocol import read_results
from speechbrain_meta.stages import STAGE_RECORD, stage_status

REPO = Path(__file__).resolve().parents[1]

PROTOCOL = """
seed: 1234
title: Stages
output_folder: {out}
num_threads: 1
cpu_isa: avx2
data_preparation: []
inits:
    trained: {train}
    random: null
train_overrides:
    data_folder: {data}
    skip_prep: True
    number_of_epochs: 1
    episodes_per_epoch: 4
    tasks_per_batch: 2
    support_size: 2
    query_size: 2
    eval_support_size: 1
    eval_query_size: 1
    eval_episodes: 2
    speed_perturb: null
adapted_inits: [trained, random]
targets:
    cs:
        data_folder: {data}
        task: cs
budgets: [3]
budget_unit: utterances
curve_steps: [0, 1]
adapt_hparams: {adapt}
adapt_overrides:
    batch_size: 3
comparisons: []
"""


def write_protocol(tmp_path, tiny_corpus, adapt=ADAPT_YAML) -> Path:
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(
        PROTOCOL.format(
            out=tmp_path / "out",
            train=TRAIN_YAML,
            data=tiny_corpus["data_folder"],
            adapt=adapt,
        )
    )
    return protocol


def test_a_comment_in_a_yaml_does_not_rerun_a_finished_stage(tiny_corpus, tmp_path):
    shutil.copytree(Path(ADAPT_YAML).parent, tmp_path / "hparams")  # to edit
    adapt = tmp_path / "hparams" / "adapt_ctc.yaml"
    text = adapt.read_text()
    protocol = write_protocol(tmp_path, tiny_corpus, adapt=adapt)
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    stage = tmp_path / "out" / "adapt" / "cs" / "3utt" / "random"
    stamp = (stage / "curve.csv").stat().st_mtime_ns
    adapt.write_text("# A comment.\n" + text.replace("base: [", "base:  [ "))
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    assert (stage / "curve.csv").stat().st_mtime_ns == stamp
    assert not list(stage.parent.glob("random.replaced-*"))
    adapt.write_text(text + "lr: 0.002\n")  # a real change
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    (aside,) = stage.parent.glob("random.replaced-*")
    assert (stage / "curve.csv").stat().st_mtime_ns != stamp
    assert read_results(aside / "curve.csv")  # the finished run is kept


def test_an_interrupted_stage_with_other_settings_restarts_clean(tiny_corpus, tmp_path):
    protocol = write_protocol(tmp_path, tiny_corpus)
    stage = tmp_path / "out" / "train" / "trained"
    old_checkpoint = stage / "save" / "CKPT+from-other-settings"
    old_checkpoint.mkdir(parents=True)
    (old_checkpoint / "CKPT.yaml").write_text("end-of-epoch: true\n")
    record = {"settings": {"script": "train.py", "hparams_sha256": "other"}}
    (stage / STAGE_RECORD).write_text(json.dumps({**record, "finished": False}))
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    (aside,) = stage.parent.glob("trained.replaced-*")
    assert (aside / "save" / "CKPT+from-other-settings").is_dir()
    assert not (stage / "save" / "CKPT+from-other-settings").exists()
    finished = json.loads((stage / STAGE_RECORD).read_text())
    assert finished["finished"] is True
    assert stage_status(str(stage), finished["settings"]) == "finished"


def test_a_folder_without_record_is_moved_aside_not_overwritten(
    tiny_corpus, tmp_path, monkeypatch
):
    for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    protocol = write_protocol(tmp_path, tiny_corpus)
    stage = tmp_path / "out" / "adapt" / "cs" / "3utt" / "random"
    stage.mkdir(parents=True)
    (stage / "notes.txt").write_text("mine")
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    (aside,) = stage.parent.glob("random.replaced-*")
    assert (aside / "notes.txt").read_text() == "mine"
    assert (stage / "curve.csv").is_file()
    # The stages ran with the protocol's cpu_isa, which they inherit.
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_the_protocol_runs_under_torchrun(tiny_corpus, tmp_path):
    """Training stages on both ranks (DDP), adaptation and report on rank 0."""
    protocol = write_protocol(tmp_path, tiny_corpus)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", "2", str(REPO / "evaluate_adaptation.py"),
        str(protocol), "--noprogressbar", "--distributed_backend", "gloo",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    out = tmp_path / "out"
    log = (out / "train" / "trained" / "log.txt").read_text()
    assert "DDP on 2 ranks" in log
    rows = read_results(out / "adaptation.csv")
    assert {r["init"] for r in rows} == {"trained", "random"}

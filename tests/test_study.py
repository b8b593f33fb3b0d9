"""The seed-robust study: bootstrap intervals, summary, time budget, seeds."""

import csv
import itertools
import json
import os
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
from test_adaptation import ADAPT_YAML, init_run  # noqa: F401 (a fixture)
from test_brain_faults import Killed, dropout_brain, fit_until_killed
from test_meta_training import sine_tasks

import evaluate_adaptation
import speechbrain_meta.brain
from speechbrain_meta import MAML, MultiTask
from speechbrain_meta.compute_budget import read_training_record
from speechbrain_meta.errors import SetupError
from speechbrain_meta.protocol import SEEDED_FIELDS, read_results, write_results
from speechbrain_meta.study import (
    SELECTED,
    SUMMARY_FIELDS,
    bootstrap_difference,
    init_regimes,
    read_summary,
    read_utterances,
    selected_step,
    summary_rows,
    write_summary,
    write_utterances,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTITASK_YAML = os.path.join(REPO, "hparams", "multitask_ctc.yaml")


# ------------------------------------------------------------- bootstrap
def test_identical_inits_differ_by_zero_with_an_interval_holding_zero():
    rng = np.random.default_rng(0)
    errors = [rng.integers(0, 30, size) for size in (40, 35, 50)]
    lengths = [rng.integers(30, 60, len(e)) for e in errors]
    assert bootstrap_difference(errors, errors, lengths) == (0.0, 0.0, 0.0)


def test_a_noisy_shift_is_inside_a_narrow_interval():
    """Per utterance, b has 3 more edits on average in 40 characters: +7.5."""
    rng = np.random.default_rng(1)
    first, second, lengths = [], [], []
    for _ in range(3):
        base = rng.integers(5, 25, 60)
        first.append(base)
        second.append(base + 3 + rng.integers(-2, 3, 60))
        lengths.append(np.full(60, 40))
    diff, low, high = bootstrap_difference(second, first, lengths)
    assert low < 7.5 < high and high - low < 1.5
    assert low <= diff <= high
    # The same data, the same interval (the bootstrap has a fixed seed).
    assert bootstrap_difference(second, first, lengths) == (diff, low, high)


def test_seeds_that_disagree_widen_the_interval():
    """Two levels: the seeds' spread counts, not only the utterances'."""
    lengths = [np.full(50, 20)] * 3
    base = [np.full(50, 5)] * 3
    shifted = [np.full(50, 5) + shift for shift in (0, 2, 4)]  # 0, 10, 20 points
    diff, low, high = bootstrap_difference(shifted, base, lengths)
    assert diff == pytest.approx(10.0)
    assert low <= 5.0 and high >= 15.0
    one_seed = bootstrap_difference([shifted[1]], [base[1]], [lengths[1]])
    assert one_seed == pytest.approx((10.0, 10.0, 10.0))


# ------------------------------------------------------------------ summary
def test_summary_of_a_hand_made_protocol(tmp_path):
    """Two seeds, maml against multitask: the values by hand."""
    utterances = {  # (seed, init) -> step -> per-utterance char edits (10 chars)
        (1, "maml"): {0: [9, 9], 5: [2, 4]},
        (1, "multitask"): {0: [8, 8], 5: [5, 5]},
        (2, "maml"): {0: [9, 9], 5: [3, 3]},
        (2, "multitask"): {0: [8, 8], 5: [4, 6]},
    }
    rows, scores, selected = [], {}, {}
    for (seed, init), curve in utterances.items():
        folder = tmp_path / str(seed) / init
        folder.mkdir(parents=True)
        lines = []
        for step, edits in curve.items():
            cer = 100 * sum(edits) / 20
            rows.append(dict(seed=seed, init=init, target="cs", budget="2min",
                             step=step, cer=cer, wer=100.0))  # fmt: skip
            lines += [
                {"step": step, "ID": f"u{i}", "char_errors": e, "chars": 10,
                 "word_errors": 1, "words": 2}
                for i, e in enumerate(edits)
            ]  # fmt: skip
        write_utterances(lines, str(folder / "utterances.csv"))
        if (seed, init) == (2, "multitask"):  # its selection kept step 0
            (folder / "selection.json").write_text('{"step": 0}')
        key = (seed, "cs", "2min", init)
        scores[key] = read_utterances(str(folder))
        selected[key] = selected_step(str(folder), [0, 5])
    path = tmp_path / "adaptation.csv"
    write_results(rows, str(path), seeded=True)
    rows = read_results(str(path))
    assert list(rows[0]) == list(SEEDED_FIELDS) and rows[0]["seed"] == 1

    regimes = {"maml": "scratch", "multitask": "scratch"}
    summary = summary_rows(rows, scores, selected, regimes, {"scratch": "multitask"})
    write_summary(summary, str(tmp_path / "summary.csv"))
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as stream:
        assert tuple(next(csv.reader(stream))) == SUMMARY_FIELDS
    table = {(r["init"], r["step"]): r for r in read_summary(tmp_path / "summary.csv")}
    assert set(table) == {
        (init, step) for init in ("maml", "multitask") for step in ("0", "5", SELECTED)
    }

    at_5 = table[("maml", "5")]
    assert (at_5["regime"], at_5["seeds"], at_5["mean_cer"]) == ("scratch", 2, 30.0)
    assert at_5["sd_cer"] == 0.0  # 30 % for both seeds
    # Pooled: maml 12 edits, multitask 20, over 40 characters: -20 points.
    assert at_5["diff_vs_multitask"] == pytest.approx(-20.0)
    assert at_5["ci_low"] <= -20.0 <= at_5["ci_high"] < 0
    assert table[("maml", "0")]["diff_vs_multitask"] == pytest.approx(10.0)
    # The baseline is not compared with itself.
    assert table[("multitask", "5")]["diff_vs_multitask"] is None
    assert table[("multitask", "5")]["sd_cer"] == 0.0

    # Selected: multitask kept step 5 for seed 1 (its last) and step 0 for
    # seed 2 (its selection.json): CER 50 and 80.
    chosen = table[("multitask", SELECTED)]
    assert (chosen["mean_cer"], chosen["sd_cer"]) == (65.0, pytest.approx(21.2132))
    # maml at 5 for both: 6 + 6 edits against 10 + 16 over 40 characters.
    assert table[("maml", SELECTED)]["diff_vs_multitask"] == pytest.approx(-35.0)

    # A stage without utterances.csv: the difference of the means, no interval.
    scores[(2, "cs", "2min", "multitask")] = None
    summary = summary_rows(rows, scores, selected, regimes, {"scratch": "multitask"})
    row = next(r for r in summary if (r["init"], r["step"]) == ("maml", 5))
    assert row["diff_vs_multitask"] == pytest.approx(-20.0)
    assert row["ci_low"] is None and row["ci_high"] is None


def test_an_init_of_two_regimes_is_compared_with_both_baselines():
    """LoRA adapted as LoRA against multitask adapted in full and as LoRA."""
    cers = {"lora": (40.0, 50.0), "mt": (30.0, 30.0), "mt_lora": (60.0, 70.0)}
    rows = [
        dict(seed=seed, init=init, target="cs", budget="2min", step=5, cer=cer)
        for init, by_seed in cers.items()
        for seed, cer in zip((1, 2), by_seed)
    ]
    hparams = {
        "regimes": {"lora": ["full", "lora"], "mt": "full", "mt_lora": "lora"},
        "baselines": {"full": "mt", "lora": "mt_lora"},
    }
    regimes, baselines = init_regimes(hparams, list(cers))
    summary = summary_rows(rows, {}, {}, regimes, baselines)
    diffs = {(r["regime"], r["init"], r["step"]): r["diff_vs_multitask"]
             for r in summary}  # fmt: skip
    assert diffs == {
        ("full", "lora", 5): pytest.approx(15.0),
        ("full", "lora", SELECTED): pytest.approx(15.0),
        ("lora", "lora", 5): pytest.approx(-20.0),
        ("lora", "lora", SELECTED): pytest.approx(-20.0),
        ("full", "mt", 5): None,
        ("full", "mt", SELECTED): None,
        ("lora", "mt_lora", 5): None,
        ("lora", "mt_lora", SELECTED): None,
    }
    # A baseline must belong to the regime it is the baseline of.
    hparams["baselines"] = {"full": "mt", "lora": "mt"}
    with pytest.raises(SetupError, match="baseline of regime 'lora', 'mt'"):
        init_regimes(hparams, list(cers))


# ------------------------------------------------------------- time budget
def fake_clock(monkeypatch):
    """Every training batch lasts exactly one second."""
    ticks = itertools.count()
    clock = SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    monkeypatch.setattr(speechbrain_meta.brain, "time", clock)


@pytest.mark.parametrize("algorithm", [MAML, MultiTask])
def test_the_time_budget_stops_training_and_survives_a_resume(
    algorithm, tmp_path, monkeypatch
):
    """A budget of 2.5 s of 1 s batches: 3 meta-steps, also across a kill."""
    dataset = sine_tasks()

    def run(folder, kill_at=None):
        fake_clock(monkeypatch)
        brain = dropout_brain(algorithm, folder, train_time_budget_minutes=2.5 / 60)
        return fit_until_killed(brain, dataset, kill_at, kill_epoch=1)

    reference = run(tmp_path / "reference")
    # 10 episodes an epoch, 3 epochs: the budget ended the first epoch early.
    assert reference.optimizer_step == 3
    assert reference.training_clock.seconds == 3.0
    assert reference.hparams.epoch_counter.current == 1
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=2)
    resumed = run(tmp_path / "killed")
    assert resumed.optimizer_step == 3 and resumed.training_clock.seconds == 3.0
    torch.testing.assert_close(
        torch.nn.utils.parameters_to_vector(resumed.modules.parameters()),
        torch.nn.utils.parameters_to_vector(reference.modules.parameters()),
        rtol=0,
        atol=0,
    )


def test_a_bad_time_budget_is_refused():
    with pytest.raises(ValueError, match="train_time_budget_minutes must be"):
        dropout_brain(MAML, None, train_time_budget_minutes=0)


# ------------------------------------------------------------ two seeds
SEEDS_PROTOCOL = """
seed: 1234
seeds: [1234, 2]
title: Two seeds
output_folder: {out}
data_folder: {data}
data_preparation: []
inits:
    maml: {init}
    multitask: {multitask}
regimes: {{maml: scratch, multitask: scratch}}
baselines: {{scratch: multitask}}
train_time_budget_minutes: 0.000001
train_overrides:
    data_folder: !ref <data_folder>
    skip_prep: True
    seed: !ref <seed>
    number_of_epochs: 2
    episodes_per_epoch: 3
    tasks_per_batch: 2
    support_size: 2
    query_size: 2
    eval_support_size: 1
    eval_query_size: 1
    eval_episodes: 1
targets:
    cs:
        data_folder: !ref <data_folder>
        task: cs
budgets: [3]
budget_unit: utterances
curve_steps: [0, 2]
adapt_hparams: {adapt}
adapt_overrides:
    batch_size: 3
comparisons:
    - [maml, multitask]
"""


def test_a_target_with_its_own_budgets(monkeypatch, tmp_path):
    """A target's ``budgets`` replace the protocol's for that target only."""
    stages = []
    monkeypatch.setattr(
        evaluate_adaptation,
        "run_stage",
        lambda name, folder, *a, **k: stages.append(folder),
    )
    hparams = {
        "output_folder": str(tmp_path),
        "data_preparation": [],
        "inits": {"random": None},
        "targets": {
            "big": {"data_folder": "d", "task": "cs", "budgets": [2, 15]},
            "small": {"data_folder": "d", "task": "pt"},
        },
        "budgets": [2, 5],
        "budget_unit": "minutes",
        "curve_steps": [0],
        "seed": 1,
        "adapt_hparams": "adapt.yaml",
        "adapt_overrides": {},
    }
    folders = evaluate_adaptation.run_seed(hparams, {}, ["random"])["adapt"]
    assert list(folders) == [
        ("big", "2min", "random"),
        ("big", "15min", "random"),
        ("small", "2min", "random"),
        ("small", "5min", "random"),
    ]
    assert stages == list(folders.values())


def test_two_seeds_give_a_summary_bands_and_equal_compute(
    init_run,  # noqa: F811 (the fixture)
    tiny_corpus,
    tmp_path,
):
    """Every seed its own data folder and stages; summary.csv, report, plots."""
    for name in ("data", "data_2"):  # the first seed's data and the second's
        os.symlink(tiny_corpus["data_folder"], tmp_path / name)
    out = tmp_path / "out"
    protocol = tmp_path / "protocol.yaml"
    protocol.write_text(
        SEEDS_PROTOCOL.format(
            out=out,
            data=tmp_path / "data",
            init=init_run,
            multitask=MULTITASK_YAML,
            adapt=ADAPT_YAML,
        )
    )
    outputs = evaluate_adaptation.main([str(protocol), "--noprogressbar"])

    rows = read_results(outputs["csv"])
    assert list(rows[0]) == list(SEEDED_FIELDS)
    assert {(r["seed"], r["init"], r["step"]) for r in rows} == {
        (s, i, t) for s in (1234, 2) for i in ("maml", "multitask") for t in (0, 2)
    }
    # The first seed in the layout of a one-seed protocol, the second apart,
    # on its own data folder.
    first = out / "adapt" / "cs" / "3utt"
    second = out / "seed_2" / "adapt" / "cs" / "3utt"
    assert (first / "maml" / "curve.csv").exists()
    assert (second / "maml" / "curve.csv").exists()
    record = json.loads(
        (out / "seed_2" / "train" / "multitask" / "stage.json").read_text()
    )
    argv = record["settings"]["argv"]
    assert argv[argv.index("--data_folder") + 1] == json.dumps(str(tmp_path / "data_2"))
    assert argv[argv.index("--seed") + 1] == "2"

    # The per-utterance scores pool to the curve's CER.
    for seed, folder in ((1234, first), (2, second)):
        for init in ("maml", "multitask"):
            scores = read_utterances(str(folder / init))
            for row in rows:
                if (row["seed"], row["init"]) == (seed, init):
                    edits, chars = map(sum, zip(*scores[row["step"]].values()))
                    assert 100 * edits / chars == pytest.approx(row["cer"])

    # Equal compute: the budget stopped both trainings after one meta-step.
    for folder in (out / "train", out / "seed_2" / "train"):
        record = read_training_record(str(folder / "multitask"))
        assert record["stopped_by_budget"] and record["meta_steps"] == 1
        assert record["train_time_budget_minutes"] == 0.000001

    summary = read_summary(outputs["summary"])
    table = {(r["init"], r["step"]): r for r in summary}
    assert set(table) == {
        (i, s) for i in ("maml", "multitask") for s in ("0", "2", SELECTED)
    }
    for step in ("0", "2", SELECTED):
        row = table[("maml", step)]
        assert row["regime"] == "scratch" and row["seeds"] == 2
        assert row["ci_low"] <= row["diff_vs_multitask"] <= row["ci_high"]
        assert table[("multitask", step)]["diff_vs_multitask"] is None
    cers = [r["cer"] for r in rows if (r["init"], r["step"]) == ("maml", 2)]
    assert table[("maml", "2")]["mean_cer"] == pytest.approx(np.mean(cers), abs=1e-4)
    assert table[("maml", "2")]["sd_cer"] == pytest.approx(
        np.std(cers, ddof=1), abs=1e-4
    )

    report = open(outputs["report"], encoding="utf-8").read()
    assert report.startswith("# Two seeds (mean of 2 seeds: 1234, 2)")
    assert "| scratch | cs | 3utt | maml | selected | 2 |" in report
    assert "| multitask | 2 |" in report  # its training's compute, seed 2
    image = matplotlib.image.imread(outputs["plots"][0])
    assert image.shape[0] > 100 and image.std() > 0

    # A rerun reuses every stage of both seeds.
    stamps = {p: os.path.getmtime(p) for p in out.glob("**/curve.csv")}
    assert len(stamps) == 4
    evaluate_adaptation.main([str(protocol), "--noprogressbar"])
    assert {p: os.path.getmtime(p) for p in out.glob("**/curve.csv")} == stamps

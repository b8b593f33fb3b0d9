"""Choosing the number of updates on a held-out part of the budget."""

import json

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from test_adaptation import init_run, run_adapt  # noqa: F401 (a fixture)

from speechbrain_meta.errors import SetupError
from speechbrain_meta.selection import hold_out, select_updates


def _data(slope: float, n: int = 4) -> DynamicItemDataset:
    return DynamicItemDataset(
        {
            f"{slope}_{i}": {"x": torch.tensor([1.0]), "y": torch.tensor([slope])}
            for i in range(n)
        },
        output_keys=["id", "x", "y"],
    )


class Line(sb.Brain):
    """Fits y = w x from w = 0 with SGD; its test loss is its "CER"."""

    def compute_forward(self, batch, stage):
        return self.modules.lin(batch.x.data)

    def compute_objectives(self, predictions, batch, stage):
        return ((predictions - batch.y.data) ** 2).mean()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TEST:
            self.test_loss = stage_loss


def _comparable(curve: list) -> list:
    """The curve with NaN (the train loss of step 0) made equal to itself."""
    return [{k: repr(v) for k, v in point.items()} for point in curve]


OPTIONS = {
    "train_loader_kwargs": {"batch_size": 4},
    "test_loader_kwargs": {"batch_size": 4},
    "metrics": lambda brain: {"cer": brain.test_loss},
    "progressbar": False,
}


def test_hold_out_splits_the_budget():
    data = DynamicItemDataset({f"u{i}": {"duration": 1.0} for i in range(5)})
    fit, held = hold_out(data, 0.2, seed=3)
    assert (len(fit), len(held)) == (4, 1)
    assert set(fit.data_ids) | set(held.data_ids) == set(data.data_ids)
    assert hold_out(data, 0.2, seed=3)[1].data_ids == held.data_ids
    assert hold_out(data, 0.99, seed=3)[0].data_ids  # at least one to fit
    for fraction in (0, 1, -0.5):
        with pytest.raises(SetupError, match="selection_fraction"):
            hold_out(data, fraction, seed=3)
    with pytest.raises(SetupError, match="cannot be split"):
        hold_out(DynamicItemDataset({"u": {"duration": 1.0}}), 0.5, seed=3)


def test_the_step_and_rate_with_the_lowest_held_out_error():
    """Fit y = 2x, select on y = x: the best point is w = 1, halfway.

    From w = 0, SGD on (w - 2)^2 with lr 0.25 reaches w = 2 (1 - 0.5^k):
    w = 1 after exactly one update.
    """
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    brain = Line(
        {"lin": lin},
        opt_class=lambda params, lr=0.01: torch.optim.SGD(params, lr=lr),
        run_opts={"noprogressbar": True},
    )
    before = brain.modules.lin.weight.detach().clone()
    generator = torch.get_rng_state()
    selection = select_updates(
        brain, _data(2.0), _data(1.0), [0, 1, 2, 8], lrs=[0.01, 0.25], **OPTIONS
    )
    assert (selection.step, selection.lr) == (1, 0.25)
    assert len(selection.points) == 8
    best = [p for p in selection.points if p["lr"] == 0.25 and p["step"] == 1][0]
    assert best["cer"] == pytest.approx(0.0, abs=1e-10)
    # The Brain and the random generators are as they were.
    assert torch.equal(brain.modules.lin.weight, before)
    assert torch.equal(torch.get_rng_state(), generator)


def test_adapt_keeps_the_selected_weights_and_the_report(
    init_run,  # noqa: F811 (the fixture imported above)
    tiny_corpus,
    tmp_path,
):
    steps = "[0, 2, 4, 8]"
    options = {"init_checkpoint": init_run, "curve_steps": steps}
    selected = run_adapt(tiny_corpus, tmp_path / "selected", **options)
    plain = run_adapt(tiny_corpus, tmp_path / "plain", selection_fraction=0, **options)
    # The test-set curve is the same run with or without the selection.
    assert _comparable(selected) == _comparable(plain)
    record = json.loads((tmp_path / "selected" / "selection.json").read_text())
    assert record["step"] in (0, 2, 4, 8)
    assert record["held_out_utterances"] == 1 and record["fit_utterances"] == 5
    assert len(record["points"]) == 4
    # The kept weights are those of a run stopped at the selected step.
    shorter = [s for s in (0, 2, 4, 8) if s <= record["step"]]
    stopped = run_adapt(
        tiny_corpus, tmp_path / "stopped", selection_fraction=0,
        init_checkpoint=init_run, curve_steps=str(shorter),
    )  # fmt: skip
    assert _comparable(stopped) == _comparable(selected[: len(shorter)])
    kept = torch.load(tmp_path / "selected" / "save" / "CKPT+adapted" / "model.ckpt")
    again = torch.load(tmp_path / "stopped" / "save" / "CKPT+adapted" / "model.ckpt")
    assert kept.keys() == again.keys()
    assert all(torch.equal(kept[k], again[k]) for k in kept)
    meta = (tmp_path / "selected" / "save" / "CKPT+adapted" / "CKPT.yaml").read_text()
    assert f"step: {record['step']}" in meta


def test_a_budget_of_one_utterance_keeps_the_last_step(
    init_run,  # noqa: F811 (the fixture imported above)
    tiny_corpus,
    tmp_path,
):
    curve = run_adapt(
        tiny_corpus, tmp_path / "one", init_checkpoint=init_run, budget=1,
        curve_steps="[0, 2]",
    )  # fmt: skip
    assert [point["step"] for point in curve] == [0, 2]
    assert not (tmp_path / "one" / "selection.json").exists()
    meta = (tmp_path / "one" / "save" / "CKPT+adapted" / "CKPT.yaml").read_text()
    assert "step: 2" in meta

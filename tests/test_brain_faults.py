"""Faults the meta-learning Brains catch: bad settings, non-finite values,
broken checkpoints, plain loaders; exact resume and deterministic evaluation."""

import copy
import logging

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.checkpoints import Checkpointer
from test_algorithms import Regression, make_brain, regression_task
from test_meta_training import sampler, sine_tasks

from speechbrain_meta import FOMAML, MAML, MetaBatch, MultiTask, Reptile, Task
from speechbrain_meta.errors import SetupError
from speechbrain_meta.sampler import EpisodicDataset, collate_episode

ALGORITHMS = [MAML, FOMAML, Reptile, MultiTask]


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("hparams", "run_opts", "named"),
    [
        ({"inner_lr": -0.1}, {}, "inner_lr"),
        ({"inner_lr": 0.0}, {}, "inner_lr"),
        ({"adapt_lr": float("nan")}, {}, "adapt_lr"),
        ({"inner_steps": 0}, {}, "inner_steps"),
        ({"inner_steps": 1.5}, {}, "inner_steps"),
        ({"adapt_steps": -1}, {}, "adapt_steps"),
        ({}, {"max_grad_norm": -1.0}, "max_grad_norm"),
        ({}, {"max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bad_settings_are_refused_naming_the_key(algorithm, hparams, run_opts, named):
    with pytest.raises(SetupError, match=f"^{named} must be") as error:
        type("B", (Regression, algorithm), {})(
            {"net": torch.nn.Linear(1, 1)},
            hparams={"inner_lr": 0.1, **hparams},
            run_opts=run_opts,
        )
    assert f"--{named}" in str(error.value)


def test_infinite_max_grad_norm_means_no_clipping():
    task = regression_task(3)
    unclipped = make_brain(FOMAML)
    unclipped.max_grad_norm = float("inf")
    clipped = make_brain(FOMAML)
    clipped.max_grad_norm = 1e-3
    for brain in (unclipped, clipped):
        brain.fit_batch(MetaBatch([task]))
    reference = make_brain(FOMAML)  # max_grad_norm 1e9
    reference.fit_batch(MetaBatch([task]))
    for p, q, _ in zip(
        unclipped.modules.parameters(),
        reference.modules.parameters(),
        clipped.modules.parameters(),
    ):
        torch.testing.assert_close(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(
        reference.modules.parameters(), clipped.modules.parameters()
    ))  # fmt: skip


def test_fomaml_refuses_first_order_false():
    with pytest.raises(SetupError, match="speechbrain_meta.MAML"):
        make_brain(FOMAML, first_order=False)


def test_maml_with_first_order_true_warns_that_it_is_fomaml(caplog):
    with caplog.at_level(logging.WARNING):
        brain = make_brain(MAML, first_order=True)
    assert brain.first_order
    assert "first-order MAML (FOMAML)" in caplog.text


@pytest.mark.parametrize("stage", [sb.Stage.TRAIN, sb.Stage.VALID])
def test_a_plain_batch_says_to_use_a_task_sampler(stage):
    brain = make_brain(FOMAML)
    batch = PaddedBatch([{"id": "a", "x": torch.ones(2)}])
    with pytest.raises(TypeError, match="TaskSampler") as error:
        if stage == sb.Stage.TRAIN:
            brain.fit_batch(batch)
        else:
            brain.evaluate_batch(batch, stage)
    loader = "train" if stage == sb.Stage.TRAIN else "valid"
    assert f"{loader}_loader_kwargs" in str(error.value)


# ---------------------------------------------------------------- non-finite
class SqrtObjective(Regression):
    """A finite loss whose gradient is infinite when the predictions are 0."""

    def compute_objectives(self, predictions, batch, stage):
        return (predictions.abs() + batch[1].abs()).sqrt().mean()


def zero_task(name="zero"):
    """A task whose loss is finite (0) and whose gradient is infinite."""
    zeros = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2).double())
    return Task(name, zeros, zeros)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_task_with_a_finite_loss_but_nonfinite_gradient_is_skipped(algorithm):
    good = regression_task(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    brain = make_brain(algorithm, SqrtObjective, net=copy.deepcopy(net))
    reference = make_brain(algorithm, SqrtObjective, net=copy.deepcopy(net))
    brain.fit_batch(MetaBatch([good, zero_task()]))
    reference.fit_batch(MetaBatch([good]))
    assert brain.nonfinite_count == 1
    for p, q in zip(brain.modules.parameters(), reference.modules.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q)


def test_multitask_skipped_task_leaves_no_trace_in_the_statistics():
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    good = regression_task(6)
    bad = Task("bad", (good.support[0] * float("nan"), good.support[1]), good.query)
    brain = make_brain(MultiTask, net=copy.deepcopy(net))
    reference = make_brain(MultiTask, net=copy.deepcopy(net))
    brain.fit_batch(MetaBatch([good, bad]))
    reference.fit_batch(MetaBatch([good]))
    assert brain.nonfinite_count == 1
    for name, value in reference.modules.state_dict().items():
        torch.testing.assert_close(brain.modules.state_dict()[name], value)


def test_nonfinite_weights_after_a_step_stop_the_run_before_any_checkpoint(tmp_path):
    dataset = sine_tasks()
    net = torch.nn.Linear(1, 1)
    checkpointer = Checkpointer(tmp_path, {"net": net})
    brain = type("B", (SineRegressionWithDropout, FOMAML), {})(
        {"net": net},
        opt_class=lambda params: torch.optim.SGD(params, lr=3e38),  # overflows
        hparams={"inner_lr": 0.01},
        run_opts={"max_grad_norm": float("inf"), "ckpt_interval_steps": 1},
        checkpointer=checkpointer,
    )
    with pytest.raises(RuntimeError, match="not finite after meta-step"):
        brain.fit(range(1, 2), dataset, train_loader_kwargs={
            "batch_sampler": sampler(dataset)
        }, progressbar=False)  # fmt: skip
    for checkpoint in checkpointer.list_checkpoints():  # those before the step
        saved = torch.load(checkpoint.paramfiles["net"])
        assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_checkpoint_with_nonfinite_weights_is_not_resumed(tmp_path):
    dataset = sine_tasks()
    brain = dropout_brain(FOMAML, tmp_path)
    brain.init_optimizers()
    with torch.no_grad():
        brain.modules.net[0].bias.fill_(float("nan"))
    brain.checkpointer.save_checkpoint()  # as an older version could have
    resumed = dropout_brain(FOMAML, tmp_path)
    with pytest.raises(RuntimeError, match="in the checkpoint resumed from"):
        resumed.fit(range(1, 2), dataset, train_loader_kwargs={
            "batch_sampler": sampler(dataset)
        }, progressbar=False)  # fmt: skip


def test_unusable_audio_is_left_out_of_the_episode_and_counted(caplog):
    from speechbrain.dataio.dataset import DynamicItemDataset

    data = {
        f"{lang}{i}": {"lang": lang, "sig": torch.full((5,), 0.1 * (i + 1))}
        for lang in ("de", "fr")
        for i in range(3)
    }
    data["de1"]["sig"] = torch.tensor([0.1, float("nan"), 0.2, 0.0, 0.1])
    data["fr0"]["sig"] = torch.zeros(5)
    dataset = DynamicItemDataset(data, output_keys=["id", "sig"])
    episodic = EpisodicDataset(dataset, task_key="lang")
    keys = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (3, 5)]
    batch = collate_episode([episodic[key] for key in keys])
    assert batch.skipped == [
        ("de1", "non-finite samples"),
        ("fr0", "silent (all samples are zero)"),
    ]
    assert [task.support.id for task in batch.tasks] == [["de0"]]
    brain = make_brain(FOMAML)
    with caplog.at_level(logging.WARNING):
        brain.note_skipped_utterances(batch.skipped)
        brain.note_skipped_utterances(batch.skipped)  # warned once each
    assert caplog.text.count("skipped: its audio is") == 2
    assert set(brain.skipped_utterances) == {"de1", "fr0"}


# ---------------------------------------------------------------- checkpoints
class SineRegressionWithDropout:
    """Sine regression with dropout and a random augmentation in training."""

    def compute_forward(self, batch, stage):
        x = batch.x_t.data
        if stage == sb.Stage.TRAIN:
            x = x + 0.05 * torch.randn_like(x)  # uses the global generator
        return self.modules.net(x)

    def compute_objectives(self, predictions, batch, stage):
        return ((predictions - batch.y_t.data) ** 2).mean()


def dropout_brain(algorithm, folder, **hparams):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 32),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1),
    )
    counter = sb.utils.epoch_loop.EpochCounter(3)
    checkpointer = None
    if folder is not None:
        checkpointer = Checkpointer(folder, {"net": net, "counter": counter})
    return type("Brain", (SineRegressionWithDropout, algorithm), {})(
        {"net": net},
        opt_class=lambda params: torch.optim.Adam(params, lr=0.01),
        hparams={
            "inner_lr": 0.01,
            "inner_steps": 2,
            "adapt_steps": 2,
            "epoch_counter": counter,
            **hparams,
        },
        run_opts={"max_grad_norm": 1e9, "ckpt_interval_steps": 1},
        checkpointer=checkpointer,
    )


class Killed(Exception):
    pass


def fit_until_killed(brain, dataset, kill_at=None, kill_epoch=2):
    """Fit a :func:`dropout_brain` on ``dataset`` for its epochs; return it.

    With ``kill_at``, :class:`Killed` is raised once batch ``kill_at`` of
    epoch ``kill_epoch`` has ended (before its intra-epoch checkpoint).
    """
    if kill_at is not None:
        end = brain.on_fit_batch_end

        def on_fit_batch_end(*args):
            end(*args)
            epoch = brain.hparams.epoch_counter.current
            if epoch == kill_epoch and brain.step == kill_at:
                raise Killed

        brain.on_fit_batch_end = on_fit_batch_end
    torch.manual_seed(1234)  # what a rerun's seed_everything does
    brain.fit(
        brain.hparams.epoch_counter,
        dataset,
        dataset,
        train_loader_kwargs={"batch_sampler": sampler(dataset)},
        valid_loader_kwargs={"batch_sampler": eval_sampler(dataset)},
        progressbar=False,
    )
    return brain


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_is_bit_exact_with_dropout_and_augmentation(algorithm, tmp_path):
    dataset = sine_tasks()

    def run(folder, kill_at=None):
        brain = fit_until_killed(dropout_brain(algorithm, folder), dataset, kill_at)
        return torch.nn.utils.parameters_to_vector(brain.modules.parameters())

    reference = run(tmp_path / "reference")
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=4)
    resumed = run(tmp_path / "killed")
    torch.testing.assert_close(resumed, reference, rtol=0, atol=0)


def eval_sampler(dataset):
    return sampler(
        dataset,
        task_weighting="round_robin",
        tasks_per_batch=1,
        reseed_each_epoch=False,
        episodes_per_epoch=4,
    )


def test_evaluating_twice_gives_the_same_result_whatever_the_random_state():
    """Test-time adaptation (dropout, augmentation) is seeded per task."""
    dataset = sine_tasks()
    brain = dropout_brain(MAML, None)
    brain.fit(range(1, 2), dataset, train_loader_kwargs={
        "batch_sampler": sampler(dataset)
    }, progressbar=False)  # fmt: skip
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(
            brain.evaluate(
                dataset,
                test_loader_kwargs={"batch_sampler": eval_sampler(dataset)},
                progressbar=False,
            )
        )
    assert results[0] == results[1]
    brain.hparams.seed = 99  # another YAML seed: other dropout masks
    other = brain.evaluate(
        dataset,
        test_loader_kwargs={"batch_sampler": eval_sampler(dataset)},
        progressbar=False,
    )
    assert other != results[0]


def test_evaluation_leaves_the_global_random_state_alone():
    dataset = sine_tasks()
    brain = dropout_brain(FOMAML, None)
    state = torch.get_rng_state()
    brain.evaluate(
        dataset,
        test_loader_kwargs={"batch_sampler": eval_sampler(dataset)},
        progressbar=False,
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_an_incomplete_checkpoint_is_set_aside_and_the_last_complete_resumed(
    tmp_path,
):
    dataset = sine_tasks()
    brain = dropout_brain(FOMAML, tmp_path)
    brain.fit(range(1, 2), dataset, train_loader_kwargs={
        "batch_sampler": sampler(dataset)
    }, progressbar=False)  # fmt: skip
    good = brain.checkpointer.save_checkpoint(name="complete")
    expected = copy.deepcopy(brain.modules.state_dict())
    with torch.no_grad():
        for p in brain.modules.parameters():
            p.add_(1.0)
    broken = brain.checkpointer.save_checkpoint(name="killed")
    with open(broken.paramfiles["net"], "r+b") as stream:  # cut short by a kill
        stream.truncate(100)
    resumed = dropout_brain(FOMAML, tmp_path)
    resumed.on_fit_start()
    assert (tmp_path / "incomplete" / "CKPT+killed").is_dir()
    names = [c.path.name for c in resumed.checkpointer.list_checkpoints()]
    assert good.path.name in names and broken.path.name not in names
    for name, value in expected.items():
        assert torch.equal(resumed.modules.state_dict()[name], value)


class DropoutSqrt(SqrtObjective):
    """SqrtObjective with dropout on the inputs: the random state matters."""

    def compute_forward(self, batch, stage):
        inputs = torch.nn.functional.dropout(batch[0], 0.5, training=True)
        return self.modules.net(inputs)


@pytest.mark.parametrize("recipe", [SqrtObjective, DropoutSqrt])
def test_a_skipped_task_after_finite_ones_leaves_exactly_their_gradient(recipe):
    """The gradients accumulate in place; leaving a task out rebuilds the
    earlier tasks' sum from their random states, to the bit."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    tasks = [regression_task(5), regression_task(6)]
    brain = make_brain(MAML, recipe, net=copy.deepcopy(net))
    reference = make_brain(MAML, recipe, net=copy.deepcopy(net))
    torch.manual_seed(3)
    brain.fit_batch(MetaBatch([*tasks, zero_task()]))
    torch.manual_seed(3)
    reference.fit_batch(MetaBatch(tasks))
    assert brain.nonfinite_count == 1 and reference.nonfinite_count == 0
    for p, q in zip(brain.modules.parameters(), reference.modules.parameters()):
        assert torch.equal(p, q)

"""checkpoint_inner_steps: second order that recomputes the inner steps gives the
same meta-gradient, buffers and random state, and keeps less memory."""

import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from test_algorithms import (
    TinyCTC,
    ctc_task,
    make_brain,
    regression_task,
    speech_like_net,
)

from speechbrain_meta import MAML, MetaBatch, Task
from speechbrain_meta.inner_loop import sgd_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_meta_step import peak_memory  # noqa: E402


class DropoutCTC(TinyCTC):
    """TinyCTC with dropout on the frames: random state the recomputation replays."""

    def compute_forward(self, batch, stage):
        frames = torch.nn.functional.dropout(batch[0], 0.3, training=True)
        return super().compute_forward((frames, *batch[1:]), stage)


def speech_like_net_with_batchnorm():
    """The recipe's layers plus a BatchNorm, whose statistics are buffers."""
    net = speech_like_net()
    net.append(sb.nnet.normalization.BatchNorm1d, layer_name="bn")
    return net


def meta_step(checkpoint, steps, seed=5):
    """The meta-gradient, the adapted buffers and the next random draw."""
    brain = make_brain(
        MAML,
        DropoutCTC,
        net=speech_like_net_with_batchnorm(),
        inner_steps=steps,
        checkpoint_inner_steps=checkpoint,
    )
    brain.modules.zero_grad()
    torch.manual_seed(seed)
    _, buffers = brain.task_step(ctc_task(1))
    grads = [p.grad.clone() for p in brain.modules.parameters()]
    return grads, buffers, torch.rand(3)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(steps):
    plain_grads, plain_buffers, plain_next = meta_step(False, steps)
    grads, buffers, after = meta_step(True, steps)
    assert all(g.dtype == torch.float64 for g in grads)
    for plain, checkpointed in zip(plain_grads, grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-12)
    # Running statistics updated once per inner step, not again when recomputed.
    assert buffers.keys() == plain_buffers.keys() and buffers
    for name in buffers:
        torch.testing.assert_close(buffers[name], plain_buffers[name])
    assert torch.equal(after, plain_next)  # the random stream goes on as without


def test_other_dropout_masks_change_the_meta_gradient():
    """The comparison above is sharp: dropout does change the gradient."""
    grads, _, _ = meta_step(False, 2, seed=5)
    other, _, _ = meta_step(False, 2, seed=6)
    assert not all(torch.allclose(a, b) for a, b in zip(grads, other))


def test_checkpointed_steps_keep_the_trajectory_and_learnt_rates():
    rate = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    theta = {"x": torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)}

    def loss(weights, buffers):
        return ((weights["x"] - 3.0) ** 4).sum()

    results = []
    for checkpoint in (False, True):
        adapted = sgd_steps(
            loss, theta, {}, 3, lambda name, step: rate, True, True, checkpoint
        )
        final = adapted.parameters["x"].pow(2).sum()
        results.append(
            (
                [w.detach() for step in adapted.trajectory for w in step.values()],
                torch.autograd.grad(final, [theta["x"], rate]),
            )
        )
    (plain_path, plain_grads), (path, grads) = results
    torch.testing.assert_close(path, plain_path)
    torch.testing.assert_close(grads, plain_grads)


def test_checkpointed_steps_keep_less_memory():
    """Peak memory of a second-order meta-step at k = 4, wide enough that the
    steps' graphs dominate the fast weights."""
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(4, 200, 3, generator=g).double(),
        torch.randint(1, 3, (4, 20), generator=g),
    )
    task = Task("t", batch, batch)

    def peak(checkpoint):
        net = torch.nn.Sequential(
            torch.nn.Linear(3, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3)
        )
        brain = make_brain(
            MAML, TinyCTC, net=net, inner_steps=4, checkpoint_inner_steps=checkpoint
        )
        return peak_memory(lambda: brain.task_step(task), "cpu")

    assert peak(True) < 0.7 * peak(False)


class Shift(torch.nn.Module):
    """A constant buffer (as a positional encoding is), optionally changed in place."""

    def __init__(self, in_place):
        super().__init__()
        self.register_buffer("offset", torch.zeros(3, dtype=torch.float64))
        self.in_place = in_place

    def forward(self, x):
        if self.in_place and self.training:
            self.offset += 1.0
        return x + self.offset


def buffer_brain(in_place):
    net = torch.nn.Sequential(Shift(in_place), torch.nn.Linear(3, 2))
    net.append(torch.nn.BatchNorm1d(2))
    return make_brain(MAML, net=net, inner_steps=2)


def test_only_running_statistics_are_copied_and_averaged():
    brain = buffer_brain(in_place=False)
    offset = brain.modules.net[0].offset
    assert set(brain.copy_buffers()) == {
        "net.2.running_mean", "net.2.running_var", "net.2.num_batches_tracked",
    }  # fmt: skip
    mean = brain.modules.net[2].running_mean.clone()
    brain.fit_batch(MetaBatch([regression_task(1), regression_task(2)]))
    assert brain.modules.net[0].offset is offset and not offset.any()
    assert not torch.equal(brain.modules.net[2].running_mean, mean)


def test_a_constant_buffer_changed_in_place_stops_training():
    brain = buffer_brain(in_place=True)
    with pytest.raises(RuntimeError, match=r"buffers \['net.0.offset'\] in place"):
        brain.fit_batch(MetaBatch([regression_task(1)]))

"""Worker for test_distributed.py: meta-trains on 2 CPU ranks (gloo) via torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py
OUT`` trains each algorithm of ``ALGORITHMS`` in turn, ``STEPS`` meta-steps per
rank, on a model with BatchNorm and an unused Linear (:func:`build_brain`).
Rank 1 starts from other weights and buffers, which rank 0's must replace, and
in meta-step ``SKIPPED_STEP`` (from 0) all of rank 1's tasks fail as non-finite,
so that it takes part in the collectives with nothing. Each rank saves to
``OUT.<rank>``, for each algorithm, the modules' state before the first step and
after each step (``states``) and the episodes it trained on (``episodes``).
"""

import os
import sys

import speechbrain as sb
import torch
from test_meta_training import SineRegression, sampler, sine_tasks

import speechbrain_meta
from speechbrain_meta.brain import MetaBrain
from speechbrain_meta.inner_loop import NonFiniteError

ALGORITHMS = ("MAML", "FOMAML", "Reptile", "MultiTask")
STEPS = 3
SKIPPED_STEP = 1


class FailingTasks:
    """Mixin of a MetaBrain: every task fails as non-finite while ``fail_tasks``."""

    fail_tasks = False

    def task_step(self, task):
        if self.fail_tasks:
            raise NonFiniteError("loss (injected by the test)")
        return super().task_step(task)


def build_brain(algorithm_name: str) -> MetaBrain:
    """The sine recipe of test_meta_training on Linear-BatchNorm-Tanh-Linear.

    ``modules["unused"]`` is a Linear that no forward pass uses, so it never
    gets a gradient; Adam's weight decay would move it if it got a zero one.
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        # No bias before BatchNorm: its gradient would be rounding noise only,
        # which Adam blows up to full steps of random sign.
        torch.nn.Linear(1, 16, bias=False),
        torch.nn.BatchNorm1d(16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )
    algorithm = getattr(speechbrain_meta, algorithm_name)
    return type("Brain", (FailingTasks, SineRegression, algorithm), {})(
        {"net": net, "unused": torch.nn.Linear(2, 2)},
        opt_class=lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.1),
        hparams={"inner_lr": 0.01, "inner_steps": 2},
    )


def snapshot(brain: MetaBrain) -> dict:
    """Copies of the modules' parameters and buffers by state-dict name."""
    return {k: v.detach().clone() for k, v in brain.modules.state_dict().items()}


def train(algorithm_name: str, rank: int) -> dict:
    """Meta-train one algorithm for ``STEPS`` steps, recording states and episodes."""
    brain = build_brain(algorithm_name)
    if rank == 1:
        with torch.no_grad():
            for tensor in brain.modules.state_dict().values():
                tensor.add_(1)
    states, episodes = [], []
    start, end = brain.on_fit_batch_start, brain.on_fit_batch_end

    def on_fit_batch_start(batch, should_step):
        if not states:  # after on_fit_start broadcast rank 0's weights
            states.append(snapshot(brain))
        brain.fail_tasks = rank == 1 and len(episodes) == SKIPPED_STEP
        start(batch, should_step)

    def on_fit_batch_end(batch, *args):
        end(batch, *args)
        episodes.append(batch)
        states.append(snapshot(brain))

    brain.on_fit_batch_start = on_fit_batch_start
    brain.on_fit_batch_end = on_fit_batch_end
    dataset = sine_tasks()
    episodes_per_epoch = STEPS * torch.distributed.get_world_size()
    brain.fit(
        range(1, 2),
        dataset,
        train_loader_kwargs={
            "batch_sampler": sampler(dataset, episodes_per_epoch=episodes_per_epoch)
        },
        progressbar=False,
    )
    return {"states": states, "episodes": episodes}


def main(out_file: str) -> None:
    sb.utils.distributed.ddp_init_group({"distributed_backend": "gloo"})
    rank = torch.distributed.get_rank()
    results = {name: train(name, rank) for name in ALGORITHMS}
    torch.save(results, f"{out_file}.{rank}")


if __name__ == "__main__":
    main(sys.argv[1])
    # Every collective is done and the results are saved. Skip the
    # interpreter's teardown: on a busy machine, gloo's threads sometimes
    # abort it ("terminate called without an active exception"), with or
    # without destroy_process_group, and the test would fail on an exit code
    # unrelated to what it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

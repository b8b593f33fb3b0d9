"""Meta-training through Brain.fit lowers the adapted loss, for every algorithm.

(Exact resumption after a kill: tests/test_brain_faults.py.)
"""

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_meta import FOMAML, MAML, MultiTask, Reptile, TaskSampler


class SineRegression:
    """Recipe: regress y from x; each task is a sine with its own offset."""

    def compute_forward(self, batch, stage):
        return self.modules.net(batch.x_t.data)

    def compute_objectives(self, predictions, batch, stage):
        return ((predictions - batch.y_t.data) ** 2).mean()


def sine_tasks(n_tasks=6, per_task=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for t in range(n_tasks):
        offset = 2 * t / (n_tasks - 1) - 1
        for i in range(per_task):
            x = float(torch.rand(1, generator=g) * 6 - 3)
            y = float(torch.sin(torch.tensor(x))) + offset
            data[f"t{t}_{i}"] = {"task": f"t{t}", "x": x, "y": y}
    dataset = DynamicItemDataset(data)
    for key in ("x", "y"):
        sb.dataio.dataset.add_dynamic_item(
            [dataset],
            lambda v: torch.tensor([v]),
            takes=key,
            provides=f"{key}_t",
        )
    dataset.set_output_keys(["id", "x_t", "y_t"])
    return dataset


def make_brain(algorithm, **hparams):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    return type("Brain", (SineRegression, algorithm), {})(
        {"net": net},
        opt_class=lambda params: torch.optim.Adam(params, lr=0.01),
        hparams={"inner_lr": 0.01, "inner_steps": 2, "adapt_steps": 2, **hparams},
        run_opts={"max_grad_norm": 1e9},
    )


def sampler(dataset, **kwargs):
    options = dict(
        task_key="task",
        tasks_per_batch=2,
        support_size=4,
        query_size=4,
        episodes_per_epoch=10,
        seed=3,
    )
    options.update(kwargs)
    return TaskSampler(dataset, **options)


def valid_loss(brain, dataset):
    valid = {
        "batch_sampler": sampler(
            dataset,
            task_weighting="round_robin",
            tasks_per_batch=1,
            reseed_each_epoch=False,
            episodes_per_epoch=6,
        )
    }
    return brain.evaluate(dataset, test_loader_kwargs=valid, progressbar=False)


@pytest.mark.parametrize("algorithm", [MAML, FOMAML, Reptile, MultiTask])
def test_meta_training_lowers_the_adapted_loss(algorithm):
    dataset = sine_tasks()
    brain = make_brain(algorithm)
    brain.init_optimizers()
    before = valid_loss(brain, dataset)
    brain.fit(
        range(1, 6),
        dataset,
        train_loader_kwargs={"batch_sampler": sampler(dataset)},
        progressbar=False,
    )
    assert valid_loss(brain, dataset) < 0.7 * before

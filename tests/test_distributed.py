"""Meta-training under torchrun on 2 CPU ranks (gloo) keeps the ranks identical.

One torchrun trains MAML, FOMAML, Reptile and MultiTask in turn on a model with
BatchNorm and an unused Linear (ddp_worker.py). The tests compare what the two
ranks saved with each other, and with one process meta-training on the union of
the two ranks' tasks.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import ALGORITHMS, SKIPPED_STEP, STEPS, build_brain

from speechbrain_meta import brain as brain_module
from speechbrain_meta.sampler import MetaBatch

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What ranks 0 and 1 saved: by algorithm, their states and episodes."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port, whatever else runs on the machine
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-12000:]
    return [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]


def episode_ids(episodes):
    return [
        [(t.name, tuple(t.support.id), tuple(t.query.id)) for t in episode.tasks]
        for episode in episodes
    ]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ranks_hold_identical_parameters_and_buffers(ranks, algorithm):
    states0, states1 = (rank[algorithm]["states"] for rank in ranks)
    assert len(states0) == len(states1) == STEPS + 1
    # Before the first step (rank 1 started elsewhere) and after every step.
    for step, (state0, state1) in enumerate(zip(states0, states1)):
        assert state0.keys() == state1.keys()
        for name in state0:
            assert torch.equal(state0[name], state1[name]), (step, name)
    for name in ("net.1.running_mean", "net.1.running_var"):
        assert not torch.equal(states0[-1][name], states0[0][name]), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ranks_train_on_different_episodes(ranks, algorithm):
    ids0, ids1 = (episode_ids(rank[algorithm]["episodes"]) for rank in ranks)
    assert len(ids0) == len(ids1) == STEPS
    assert ids0 != ids1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_unused_parameter_is_not_moved_by_the_optimizer(ranks, algorithm):
    for rank in ranks:
        states = rank[algorithm]["states"]
        for name in ("unused.weight", "unused.bias"):
            assert torch.equal(states[-1][name], states[0][name]), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_meta_step_equals_one_process_on_both_ranks_tasks(ranks, algorithm):
    states = ranks[0][algorithm]["states"]
    episodes0, episodes1 = (rank[algorithm]["episodes"] for rank in ranks)
    brain = build_brain(algorithm)
    brain.modules.load_state_dict(states[0])
    brain.init_optimizers()
    brain.modules.train()
    for step, (episode0, episode1) in enumerate(zip(episodes0, episodes1)):
        # In SKIPPED_STEP, all of rank 1's tasks failed as non-finite.
        tasks = episode0.tasks + ([] if step == SKIPPED_STEP else episode1.tasks)
        brain.fit_batch(MetaBatch(tasks))
        expected = brain.modules.state_dict()
        assert states[step + 1].keys() == expected.keys()
        for name, value in states[step + 1].items():
            torch.testing.assert_close(
                value, expected[name], rtol=1e-5, atol=1e-6, msg=f"{step} {name}"
            )


def test_flat_collective_buckets_by_dtype_and_size(monkeypatch):
    monkeypatch.setattr(brain_module, "_BUCKET_BYTES", 40)
    tensors = [
        torch.arange(6.0).reshape(2, 3),  # 24 bytes
        torch.arange(3),  # int64: a group of its own
        torch.ones(4),  # 16 bytes: 40 with the first, same bucket
        torch.ones(12).t(),  # 48 bytes, over the size: a bucket of its own
        torch.ones(1),  # a new bucket after the full one
    ]
    expected = [2 * t for t in tensors]
    calls = []

    def double(flat):
        calls.append((flat.dtype, flat.numel()))
        flat.mul_(2)

    brain_module._flat_collective(tensors, double)
    for tensor, value in zip(tensors, expected):
        assert torch.equal(tensor, value)
    assert calls == [
        (torch.float32, 10),
        (torch.float32, 12),
        (torch.float32, 1),
        (torch.int64, 3),
    ]

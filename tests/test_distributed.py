"""Meta-training under torchrun on 2 CPU ranks keeps the ranks in sync."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.parametrize("algorithm", ["FOMAML", "Reptile"])
def test_ranks_stay_in_sync_and_see_different_episodes(tmp_path, algorithm):
    out = tmp_path / "weights.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port, whatever else runs on the machine
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        algorithm,
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-12000:]
    rank0, rank1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0, atol=0)
    assert rank0["episodes"] and rank1["episodes"]
    assert rank0["episodes"] != rank1["episodes"]

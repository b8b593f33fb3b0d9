"""Worker for test_distributed.py: meta-trains on 2 CPU ranks (gloo) via torchrun."""

import os
import sys

import speechbrain as sb
import torch
from test_meta_training import make_brain, sampler, sine_tasks

import speechbrain_meta


def main(algorithm_name: str, out_file: str) -> None:
    run_opts = {"distributed_backend": "gloo"}
    sb.utils.distributed.ddp_init_group(run_opts)
    rank = torch.distributed.get_rank()
    torch.manual_seed(rank)  # different initial weights on each rank
    brain = make_brain(getattr(speechbrain_meta, algorithm_name))
    if rank == 1:  # make rank 1 start elsewhere: rank 0's weights must win
        with torch.no_grad():
            for p in brain.modules.parameters():
                p.add_(1.0)
    seen = []
    end = brain.on_fit_batch_end

    def record(batch, *args):
        seen.append(tuple(task.name for task in batch.tasks))
        end(batch, *args)

    brain.on_fit_batch_end = record
    dataset = sine_tasks()
    brain.fit(
        range(1, 3),
        dataset,
        train_loader_kwargs={"batch_sampler": sampler(dataset)},
        progressbar=False,
    )
    vector = torch.nn.utils.parameters_to_vector(brain.modules.parameters())
    torch.save({"params": vector.detach(), "episodes": seen}, f"{out_file}.{rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Every collective is done and the results are saved. Skip the
    # interpreter's teardown: on a busy machine, gloo's threads sometimes
    # abort it ("terminate called without an active exception"), with or
    # without destroy_process_group, and the test would fail on an exit code
    # unrelated to what it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

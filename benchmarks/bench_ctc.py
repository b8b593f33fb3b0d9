"""Time the twice-differentiable CTC loss against PyTorch's native one.

For each size, the median wall time of
  * native: forward + backward of torch.nn.functional.ctc_loss,
  * differentiable: forward + backward of ctc_loss_differentiable,
  * second order: forward, backward with create_graph=True, then the backward
    of the gradient's dot product with a random vector (a Hessian-vector
    product, what second-order MAML does) of ctc_loss_differentiable,
all through log_softmax of random logits, with their ratios to native.
The three are timed in turn, round after round, so that a slow spell of the
machine affects them alike.

    python benchmarks/bench_ctc.py --out bench.md
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import torch

# This checkout's package, not another one an environment may have installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speechbrain_meta.ctc import ctc_loss_differentiable  # noqa: E402
from speechbrain_meta.ctc_kernel import SWITCH  # noqa: E402

SIZES = [(8, 100, 40), (8, 100, 300), (8, 200, 40), (8, 200, 300)]
# Sizes of a GPU's batches: more utterances, longer inputs (benchmarks/gpu_check.py).
GPU_SIZES = [(32, 400, 128), (32, 800, 128), (64, 400, 300)]


def parse_size(text: str) -> Tuple[int, int, int]:
    """``B,T,C`` as a tuple of three ints.

    Example
    -------
    >>> parse_size("8,100,40")
    (8, 100, 40)
    """
    batch, frames, classes = (int(value) for value in text.split(","))
    return batch, frames, classes


def make_batch(batch: int, frames: int, classes: int, device: str) -> Dict:
    """Random logits, targets of about frames / 3 labels and lengths."""
    generator = torch.Generator().manual_seed(0)
    max_target = frames // 3
    input_lengths = torch.randint(
        frames * 3 // 4, frames + 1, (batch,), generator=generator
    )
    target_lengths = torch.randint(
        max_target * 3 // 4, max_target + 1, (batch,), generator=generator
    )
    input_lengths[0], target_lengths[0] = frames, max_target
    return {
        "logits": torch.randn(batch, frames, classes, generator=generator)
        .transpose(0, 1)
        .to(device)
        .requires_grad_(),
        "targets": torch.randint(
            1, classes, (batch, max_target), generator=generator
        ).to(device),
        "input_lengths": input_lengths.to(device),
        "target_lengths": target_lengths.to(device),
    }


def first_order(loss_fn: Callable, data: Dict) -> Callable[[], None]:
    """Forward and backward of ``loss_fn``."""
    logits = data["logits"]

    def run() -> None:
        loss = loss_fn(
            logits.log_softmax(-1),
            data["targets"],
            data["input_lengths"],
            data["target_lengths"],
        )
        torch.autograd.grad(loss, logits)

    return run


def second_order(data: Dict) -> Callable[[], None]:
    """Forward, create_graph backward and Hessian-vector product."""
    logits = data["logits"]
    vector = torch.randn_like(logits)

    def run() -> None:
        loss = ctc_loss_differentiable(
            logits.log_softmax(-1),
            data["targets"],
            data["input_lengths"],
            data["target_lengths"],
        )
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        torch.autograd.grad((grad * vector).sum(), logits)

    return run


def without_kernel(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the loss's C kernel switched off (the tensor loops)."""

    def call() -> None:
        with mock.patch.dict(os.environ, {SWITCH: "0"}):
            run()

    return call


def synchronize(device: str) -> None:
    """Wait for the device's queued work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(
    runs: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: str
) -> Dict[str, float]:
    """Median seconds of each run, the runs interleaved."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the arguments, time every size and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=SIZES,
        help="batch, frames and classes of each size, as B,T,C",
    )
    parser.add_argument(
        "--tensor_loops",
        action="store_true",
        help="also time second order with the C kernel off (the tensor loops)",
    )
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [
        f"Device: {args.device} ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load "
        f"average {os.getloadavg()[0]:.1f} at start); median of {args.repeats} "
        "runs, ms.",
        "",
        "| B | T | C | S | native fwd+bwd | differentiable fwd+bwd | ratio "
        "| second order | ratio |"
        + (" second order, tensor loops | ratio |" if args.tensor_loops else ""),
        "|---|---|---|---|---|---|---|---|---|" + "---|---|" * args.tensor_loops,
    ]
    for batch, frames, classes in args.sizes:
        data = make_batch(batch, frames, classes, args.device)
        runs = {
            "native": first_order(torch.nn.functional.ctc_loss, data),
            "differentiable": first_order(ctc_loss_differentiable, data),
            "second": second_order(data),
        }
        if args.tensor_loops:
            runs["tensor loops"] = without_kernel(second_order(data))
        ms = {
            name: 1e3 * seconds
            for name, seconds in median_times(
                runs, args.repeats, args.warmup, args.device
            ).items()
        }
        native = ms["native"]
        lines.append(
            f"| {batch} | {frames} | {classes} | {frames // 3} | {native:.2f} "
            f"| {ms['differentiable']:.2f} | {ms['differentiable'] / native:.2f}x "
            f"| {ms['second']:.2f} | {ms['second'] / native:.2f}x |"
            + (
                f" {ms['tensor loops']:.2f} | {ms['tensor loops'] / native:.2f}x |"
                if args.tensor_loops
                else ""
            )
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()

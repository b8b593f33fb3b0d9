"""The GPU check: what only a CUDA machine can check, in one Markdown report.

Runs, each as a subprocess with its own time limit (together under 8 minutes
on one GPU), and writes their results into one report (``--out``):

1. ``pytest -m cuda``: the tests marked ``cuda`` (second order with cuDNN RNNs
   switched off, attention on the math backend, bf16, recomputed inner steps,
   the twice-differentiable CTC against the native CUDA loss);
2. ``bench_meta_step.py``: every algorithm's meta-step on the CTC and
   Transformer models, and a GPU-sized CTC model;
3. ``bench_peers.py``: second-order MAML and FOMAML against the peers;
4. ``bench_ctc.py``: the CTC loss at GPU sizes (``bench_ctc.GPU_SIZES``);
5. ``ssl_real_size.py``: meta-steps on an XLS-R 300M-sized encoder.

A step that fails or runs out of time is reported as such, and the others
still run; the exit status is 1 if any failed. Without a CUDA device the check
stops at once with exit status 2. ``--device cpu`` runs the same steps on
the CPU at tiny sizes: a check of this script, not of the GPU.

    python benchmarks/gpu_check.py --out gpu_check.md
    python benchmarks/gpu_check.py --device cpu --only ctc    # the CPU fallback
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_ctc import GPU_SIZES  # noqa: E402

# Time limits of the steps, seconds: 455 in all, under 8 minutes with start-up.
LIMITS = {"tests": 90, "meta_step": 100, "peers": 100, "ctc": 45, "ssl": 120}
GPU_CTC_MODEL = "hparams/{}_ctc.yaml:rnn_size=512,cnn_channels=256"


class Step(NamedTuple):
    """One part of the check: a command, its time limit and its report file."""

    name: str
    command: List[str]
    limit: int
    out: Optional[str]  # the Markdown file the command writes, if any


def plan(args: argparse.Namespace, folder: str) -> List[Step]:
    """The steps, at GPU sizes (or tiny ones on the CPU)."""
    python, tiny = sys.executable, args.device == "cpu"
    data = ["--data_folder", args.data_folder]
    bench = REPO_ROOT / "benchmarks"

    def out(name: str) -> str:
        return os.path.join(folder, f"{name}.md")

    episode = (
        ["--tasks", "1", "--support", "1", "--query", "1", "--steps", "1"]
        + ["--repeats", "1", "--warmup", "0"]
        if tiny
        else ["--tasks", "4", "--support", "4", "--query", "4", "--repeats", "5"]
    )
    models = [f"hparams/{a}_ctc.yaml" for a in ("maml", "fomaml")]
    if not tiny:
        models += [f"hparams/{a}_attention.yaml" for a in ("maml", "fomaml")]
        models += [GPU_CTC_MODEL.format(a) for a in ("maml", "fomaml")]
    sizes = ["2,20,5"] if tiny else [",".join(map(str, s)) for s in GPU_SIZES]
    steps = [
        Step(
            "tests",
            [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
            LIMITS["tests"],
            None,
        ),
        Step(
            "meta_step",
            [python, str(bench / "bench_meta_step.py"), "--device", args.device]
            + data + episode + ["--ctc_repeats", "1" if tiny else "10"]
            + ["--hparams", *models, "--out", out("meta_step")],
            LIMITS["meta_step"],
            out("meta_step"),
        ),
        Step(
            "peers",
            [python, str(bench / "bench_peers.py"), "--device", args.device]
            + data + episode + ["--out", out("peers")],
            LIMITS["peers"],
            out("peers"),
        ),
        Step(
            "ctc",
            [python, str(bench / "bench_ctc.py"), "--device", args.device]
            + ["--sizes", *sizes, "--out", out("ctc")]
            + (["--repeats", "2", "--warmup", "1"] if tiny else []),
            LIMITS["ctc"],
            out("ctc"),
        ),
        Step(
            "ssl",
            [python, str(bench / "ssl_real_size.py"), "--device", args.device]
            + (["--tiny"] if tiny else []),
            LIMITS["ssl"],
            None,
        ),
    ]  # fmt: skip
    return [step for step in steps if not args.only or step.name in args.only]


def run_step(step: Step) -> List[str]:
    """Run one step; its section of the report."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            step.command,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=step.limit,
        )
        status, output = f"exit status {done.returncode}", done.stdout + done.stderr
        failed = done.returncode != 0
    except subprocess.TimeoutExpired as expired:
        status, failed = f"TIMED OUT after {step.limit} s", True
        output = "".join(
            part.decode() if isinstance(part, bytes) else (part or "")
            for part in (expired.stdout, expired.stderr)
        )
    seconds = time.perf_counter() - start
    lines = [
        f"## {step.name}: {'FAILED, ' if failed else ''}{status}, {seconds:.0f} s",
        "",
        "```",
        " ".join(str(part) for part in step.command),
        "```",
        "",
    ]
    if not failed and step.out and os.path.isfile(step.out):
        with open(step.out, encoding="utf-8") as stream:
            lines.append(stream.read().rstrip())
    else:
        lines += ["```", *output.rstrip().splitlines()[-40:], "```"]
    return lines + [""]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (tiny sizes)")
    parser.add_argument("--data_folder", default="data/embedded_tiny")
    parser.add_argument("--only", nargs="+", choices=list(LIMITS), help="these steps")
    parser.add_argument("--out", default="gpu_check.md", help="the report")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the check; the exit status (0: all passed, 1: a step failed, 2: no GPU)."""
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); run it on "
            "a GPU machine, or with --device cpu to check this script at tiny sizes.",
            file=sys.stderr,
        )
        return 2
    device = torch.cuda.get_device_name() if args.device != "cpu" else "CPU, tiny sizes"
    report = [f"# GPU check ({device}, torch {torch.__version__})", ""]
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        for step in plan(args, folder):
            section = run_step(step)
            failed |= "FAILED" in section[0]
            report += section
            print(section[0], flush=True)
    with open(args.out, "w", encoding="utf-8") as stream:
        stream.write("\n".join(report))
    print(f"report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time and peak memory of meta-steps on a real-size (XLS-R 300M) encoder.

Builds a randomly initialised wav2vec2 of XLS-R 300M's shapes (hidden size
1024, 24 Transformer layers of 16 heads, feed-forward 4096, the 7-layer
convolutional feature encoder of 512 channels, pre-norm "stable" layer
normalisation), saves it in the Hugging Face format in a temporary folder and
loads it through the training YAMLs, as ``train.py`` would with
``--ssl_source facebook/wav2vec2-xls-r-300m``. On one synthetic episode
(``--tasks`` tasks of ``--utterances`` support and query utterances of
``--seconds`` seconds, random audio and characters) it times one meta-step
(``fit_batch``, outer step included) of:

* ``maml_lora_ssl_ctc``: second-order MAML, LoRA adapters and head as fast
  weights, the pretrained encoder frozen;
* ``maml_anil_ssl_ctc``: second-order MAML adapting the head, the encoder
  meta-learnt;
* ``fomaml_ssl_ctc``: first-order MAML of the whole encoder (feature encoder
  frozen);

and prints a Markdown table of seconds per meta-step and peak memory above
the model and optimizer state (``torch.cuda.max_memory_allocated`` on CUDA,
PyTorch's CPU allocator events on CPU). ``--tiny`` takes the tiny stand-in of
:mod:`speechbrain_meta.tiny_ssl` instead (a quick CPU check of this script).
The hub is never contacted.

    python benchmarks/ssl_real_size.py --device cuda
    python benchmarks/ssl_real_size.py --device cuda --precision bf16 --utterances 8
    python benchmarks/ssl_real_size.py --tiny
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from speechbrain.dataio.batch import PaddedBatch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_ctc import synchronize  # noqa: E402
from benchmarks.bench_meta_step import MIB, fast_weights, peak_memory  # noqa: E402
from speechbrain_meta.asr import ASR, insert_adapters  # noqa: E402
from speechbrain_meta.hparams import load_hparams  # noqa: E402
from speechbrain_meta.sampler import MetaBatch, Task  # noqa: E402
from speechbrain_meta.tiny_ssl import build_tiny_ssl  # noqa: E402

# XLS-R 300M (facebook/wav2vec2-xls-r-300m's config.json), dropout and
# LayerDrop off so that every meta-step does the same work.
XLSR_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "conv_dim": (512,) * 7,
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
}
CONFIGS = ("maml_lora_ssl_ctc", "maml_anil_ssl_ctc", "fomaml_ssl_ctc")


def episode(tasks: int, utterances: int, seconds: float, device: str) -> MetaBatch:
    """Random audio and characters: ``tasks`` tasks of support and query sets.

    Lengths vary from ``seconds`` down to 70 % of it within a batch, with 12
    characters a second (a fast speaker; the encoder gives 50 frames).
    """
    generator = torch.Generator().manual_seed(0)

    def batch(name: str) -> PaddedBatch:
        items = []
        for index in range(utterances):
            length = seconds * (1 - 0.3 * index / max(utterances - 1, 1))
            tokens = torch.randint(3, 60, (int(12 * length),), generator=generator)
            items.append(
                {
                    "id": f"{name}{index}",
                    "sig": 0.1 * torch.randn(int(16000 * length), generator=generator),
                    "tokens": tokens,
                }
            )
        return PaddedBatch(items).to(device)

    return MetaBatch(
        [Task(f"t{i}", batch(f"s{i}_"), batch(f"q{i}_")) for i in range(tasks)]
    )


def brain_of(config: str, source: str, folder: str, args):
    """The Brain ``train.py`` builds from ``hparams/<config>.yaml``."""
    hparams = load_hparams(
        str(REPO_ROOT / "hparams" / f"{config}.yaml"),
        {"ssl_source": source, "output_folder": folder, "speed_perturb": None},
    )
    insert_adapters(hparams)
    brain = type("ASRBrain", (ASR, hparams["brain_class"]), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": args.device, "precision": args.precision},
    )
    brain.init_optimizers()
    brain.modules.train()
    return brain


def measure(config: str, source: str, folder: str, args) -> str:
    """One Markdown row: the configuration's meta-step time and peak memory."""
    brain = brain_of(config, source, os.path.join(folder, config), args)
    batch = episode(args.tasks, args.utterances, args.seconds, args.device)
    brain.fit_batch(batch)  # warm-up: kernels, optimizer state
    synchronize(args.device)
    start = time.perf_counter()
    brain.fit_batch(batch)
    synchronize(args.device)
    seconds = time.perf_counter() - start
    peak = peak_memory(lambda: brain.fit_batch(batch), args.device) / MIB / 1024
    if brain.nonfinite_count:
        raise RuntimeError(f"{config}: a loss was not finite; the step skipped work.")
    total = sum(p.numel() for p in brain.modules.parameters())
    learnt = sum(p.numel() for p in brain.meta_parameters().values())
    row = (
        f"| {config} | {total / 1e6:.3f} M | {learnt / 1e6:.3f} M "
        f"| {fast_weights(brain) / 1e6:.3f} M | {seconds:.3g} | {peak:.3g} |"
    )
    return row


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-in")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument(
        "--layers", type=int, help="Transformer layers (default: 24, tiny: 2)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    """Build the encoder, measure each configuration, print the table."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        shapes = {} if args.tiny else dict(XLSR_300M)
        if args.layers:
            shapes["num_hidden_layers"] = args.layers
        source = build_tiny_ssl("wav2vec2", os.path.join(folder, "encoder"), **shapes)
        rows = []
        for config in args.configs:
            rows.append(measure(config, source, folder, args))
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the Brain of measure() is gone
    name = "tiny stand-in" if args.tiny else "XLS-R 300M shapes"
    if args.layers:
        name += f", {args.layers} Transformer layers"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    report = "\n".join(
        [
            f"Encoder: {name}, random weights. Device: {args.device} ({device}), "
            f"{args.precision}, torch {torch.__version__}. Episode: {args.tasks} "
            f"task(s) of {args.utterances} support + {args.utterances} query "
            f"utterances of {0.7 * args.seconds:.1f}-{args.seconds:.1f} s; "
            "inner_steps 1. One timed meta-step after a warm-up.",
            "",
            "| config | parameters | meta-learnt | fast weights | s / meta-step "
            "| peak GiB |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(report)
    return report


if __name__ == "__main__":
    main()

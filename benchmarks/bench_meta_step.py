"""Wall time and peak memory of one meta-step, per algorithm and inner steps.

Every training YAML given with ``--hparams`` is loaded as ``train.py`` loads
it (its ``brain_class`` mixed with the recipe's ``ASR`` methods, its modules
and optimizer), with speed perturbation removed (it changes the shapes) and
dropout on as in training. A YAML may be followed by overrides, e.g.
``hparams/maml_attention.yaml:decoder_type=rnn``. One episode (``--tasks``
tasks of ``--support`` / ``--query`` utterances: the first one the YAML's
``train_sampler`` draws with ``--seed``) is reused for every measurement. For
each YAML and each number of inner steps ``k`` (``--steps``) the benchmark
times one ``fit_batch`` (one meta-step, outer optimizer step included) and
measures its peak memory.

Each meta-step is compared with plain SpeechBrain training of equal work:
``sb.Brain.fit_batch`` of a Brain built from the same YAML on the batches the
algorithm passes forward and backward (per task: MAML and FOMAML, ``k`` times
the support batch then the query batch; Reptile, ``k`` times the support
batch; MultiTask, the support and the query batch), gradients accumulated over
all of them, one optimizer step. Full MAML is also compared with FOMAML of the
same ``k`` on the same model (when its YAML is given too).

The twice-differentiable CTC loss is timed against the native one on each
model's CTC log-probabilities for the episode's batches
(``benchmarks/bench_ctc.py`` does the same on synthetic sizes).

All meta-steps, then all CTC losses, are timed round-robin: ``--repeats``
(``--ctc_repeats``) rounds after ``--warmup`` calls of each. Times are the
medians over the rounds; a ratio is the median over the rounds of the ratio of
the two runs' times in that round, and runs that are compared follow each
other in a round, so that a slow spell of a shared machine hits both alike.
Peak memory is measured afterwards, one call per run: the peak of tensor
memory allocated during the call and not yet freed, above what exists before
it (parameters, optimizer state, batch). On CUDA that is
``torch.cuda.max_memory_allocated`` minus the memory allocated at the start;
on CPU it is summed from the allocation and free events of PyTorch's CPU
allocator that ``torch.profiler`` records (``profile_memory=True``).

    python benchmarks/bench_meta_step.py --threads 1 --out bench.md
    python benchmarks/bench_meta_step.py --threads 1 --hparams ssl

``--hparams ssl`` is the group of the pretrained-encoder YAMLs
(``hparams/*_ssl_ctc.yaml``, FOMAML first: the whole-model reference of the
inner-loop variants), on the encoder of ``--ssl_source``: by default a tiny
wav2vec2 (:mod:`speechbrain_meta.tiny_ssl`) built in a temporary folder.
    python benchmarks/bench_meta_step.py --threads 1 --hparams \
        hparams/maml_ctc.yaml hparams/fomaml_ctc.yaml \
        hparams/maml_attention.yaml hparams/maml_attention.yaml:decoder_type=rnn
"""

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import speechbrain as sb
import torch
import yaml

# This checkout's package, not another one an environment may have installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_ctc import (  # noqa: E402
    first_order,
    median_times,
    second_order,
    synchronize,
)
from recipes.embedded_corpus.prepare import prepare_embedded_corpus  # noqa: E402
from speechbrain_meta import MAML, MultiTask, Reptile  # noqa: E402
from speechbrain_meta.asr import ASR, dataio_prepare, insert_adapters  # noqa: E402
from speechbrain_meta.ctc import ctc_loss_differentiable  # noqa: E402
from speechbrain_meta.hparams import load_hparams  # noqa: E402

ALGORITHMS = ("maml", "fomaml", "reptile", "multitask")
DEFAULT_HPARAMS = [
    str(REPO_ROOT / "hparams" / f"{name}_ctc.yaml") for name in ALGORITHMS
]
SSL_HPARAMS = [
    str(REPO_ROOT / "hparams" / f"{name}_ssl_ctc.yaml")
    for name in ("fomaml", "maml", "reptile", "multitask", "maml_anil", "maml_lora")
]
MIB = 2**20
# Targets of the issue: meta-step / plain training of equal work, MAML / FOMAML
# at k = 1, differentiable / native CTC forward+backward at first and second
# order.
FIRST_ORDER_TARGET, MAML_TARGET = 1.15, 2.5
CTC_TARGETS = {"differentiable": 1.5, "second order": 3.0}
# Second-order MAML of a partial inner loop (ANIL, LoRA) against first-order
# training of the whole model, in peak memory.
PARTIAL_MEMORY_TARGET = 1.5


class Run(NamedTuple):
    """One timed configuration: a meta-step or a plain training step."""

    model: str
    algorithm: str
    steps: Optional[int]
    passes: int  # forward/backward passes per task
    step: Callable[[], None]
    plain: Optional[str]  # name of the plain run of equal work
    reference: Optional[str]  # name of the FOMAML run MAML is compared with


def parse_spec(spec: str) -> Tuple[str, dict]:
    """``path[:key=value,...]`` as the path and its YAML overrides.

    Example
    -------
    >>> parse_spec("hparams/maml_attention.yaml:decoder_type=rnn,d_model=64")
    ('hparams/maml_attention.yaml', {'decoder_type': 'rnn', 'd_model': 64})
    >>> parse_spec("hparams/maml_lora_ctc.yaml:lora_layers=[conv1.conv, conv2.conv]")
    ('hparams/maml_lora_ctc.yaml', {'lora_layers': ['conv1.conv', 'conv2.conv']})
    """
    path, _, text = spec.partition(":")
    overrides = {}
    # Commas between overrides, not inside a [list].
    for item in filter(None, re.split(r",(?![^\[]*\])", text)):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"Override {item!r} of {spec!r} is not key=value.")
        overrides[key] = yaml.safe_load(value)
    return path, overrides


def is_ssl(spec: str) -> bool:
    """Whether the YAML of ``spec`` is one of the pretrained-encoder YAMLs."""
    return str(Path(parse_spec(spec)[0]).resolve()) in SSL_HPARAMS


def benchmark_hparams(spec: str, args, output_folder: str) -> dict:
    """The YAML's hyperparameters with the benchmark's episode and folders."""
    path, overrides = parse_spec(spec)
    overrides.update(
        data_folder=args.data_folder,
        output_folder=output_folder,
        skip_prep=True,
        seed=args.seed,
        tasks_per_batch=args.tasks,
        support_size=args.support,
        query_size=args.query,
        size_unit="utterances",
    )
    if is_ssl(spec):
        overrides.setdefault("ssl_source", args.ssl_source)
    hparams = load_hparams(path, overrides)
    hparams.pop("speed_perturb", None)
    return hparams


def model_name(spec: str, hparams: dict) -> str:
    """The YAML's name without its algorithm, and its decoder type if any.

    ``hparams/maml_ctc.yaml`` gives ``ctc``; ``hparams/maml_attention.yaml``
    with ``decoder_type: rnn`` gives ``attention/rnn``; an inner-loop variant
    keeps its name: ``hparams/maml_lora_ctc.yaml`` gives ``lora_ctc``.
    """
    path, overrides = parse_spec(spec)
    name = Path(path).stem.split("_", 1)[-1]
    if hparams.get("decoder_type"):
        name += f"/{hparams['decoder_type']}"
    extra = {k: v for k, v in overrides.items() if k != "decoder_type"}
    return name + "".join(f" {k}={v}" for k, v in extra.items())


def build_brain(hparams: dict, brain_class: type, device: str):
    """The Brain of ``train.py``, in training mode, optimizer ready.

    Returns the Brain and its training dataset.
    """
    insert_adapters(hparams)
    datasets, encoder = dataio_prepare(hparams)
    brain = type("ASRBrain", (ASR, brain_class), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": device},
    )
    brain.tokenizer = encoder
    brain.nonfinite_count = 0
    brain.init_optimizers()
    brain.modules.train()
    return brain, datasets["train"]


def first_episode(brain, hparams: dict, dataset, device: str):
    """The first episode the YAML's training sampler draws, on ``device``."""
    loader = brain.make_dataloader(
        dataset, sb.Stage.TRAIN, batch_sampler=hparams["train_sampler"](dataset)
    )
    return next(iter(loader)).to(device)


def utterances(episode) -> List[List[str]]:
    """The IDs of each task's support and query utterances."""
    return [task.support.id + task.query.id for task in episode.tasks]


def passes_per_task(brain_class: type, task, steps: int) -> List:
    """The batches an algorithm passes forward and backward for one task."""
    if issubclass(brain_class, MAML):
        return [task.support] * steps + [task.query]
    if issubclass(brain_class, Reptile):
        return [task.support] * steps
    if issubclass(brain_class, MultiTask):
        return [task.support, task.query]
    raise ValueError(f"No plain-training equivalent known for {brain_class}.")


def audio_seconds(batches: List, sample_rate: int) -> float:
    """Seconds of audio in ``batches`` (padding excluded)."""
    return sum(
        float(batch.sig[1].sum()) * batch.sig[0].shape[1] / sample_rate
        for batch in batches
    )


def check_finite(brain, name: str) -> None:
    """Refuse timings of steps that skipped work on a non-finite loss."""
    if brain.nonfinite_count:
        raise RuntimeError(
            f"{name}: a loss was not finite, so the step skipped work; "
            "lower inner_lr or change --seed."
        )


def meta_step(brain, episode, steps: Optional[int], name: str) -> Callable:
    """One ``fit_batch`` of a meta-learning Brain with ``steps`` inner steps."""

    def run() -> None:
        if steps is not None:
            brain.hparams.inner_steps = steps
        brain.fit_batch(episode)
        check_finite(brain, name)

    return run


def plain_step(brain, batches: List, name: str) -> Callable:
    """Plain ``sb.Brain.fit_batch`` on each batch, one optimizer step in all."""

    def run() -> None:
        brain.grad_accumulation_factor = len(batches)
        for step, batch in enumerate(batches, start=1):
            brain.step = step  # the optimizer steps after the last batch
            brain.fit_batch(batch)
        check_finite(brain, name)

    return run


def model_runs(model: str, loaded: List[Tuple[str, dict]], args, folder: str):
    """The runs of the YAMLs that share one model.

    Arguments
    ---------
    model : str
        The model's name.
    loaded : list of tuple
        Each YAML spec with its loaded hyperparameters.
    args : argparse.Namespace
        The command-line options.
    folder : str
        Where the plain Brain's YAML writes its label encoder.

    Returns
    -------
    tuple
        The runs by name, the first YAML's Brain and the episode.
    """
    runs: Dict[str, Run] = {}
    first = None
    for spec, hparams in loaded:
        brain_class = hparams["brain_class"]
        brain, train_data = build_brain(hparams, brain_class, args.device)
        episode = first_episode(brain, hparams, train_data, args.device)
        if first is None:
            first = brain, episode
            plain_hparams = benchmark_hparams(spec, args, folder)
            plain_brain, _ = build_brain(plain_hparams, sb.Brain, args.device)
        elif repr(brain.modules) != repr(first[0].modules):
            raise ValueError(f"{spec} has another {model} model than {loaded[0][0]}.")
        if utterances(episode) != utterances(first[1]):
            raise ValueError(f"{spec} draws another episode than {loaded[0][0]}.")
        algorithm = brain_class.__name__
        if issubclass(brain_class, MAML):
            algorithm = "FOMAML" if brain.first_order else "MAML"
        for steps in [None] if issubclass(brain_class, MultiTask) else args.steps:
            task = episode.tasks[0]
            pattern = "".join(
                "S" if batch is task.support else "Q"
                for batch in passes_per_task(brain_class, task, steps or 0)
            )
            plain = f"{model} plain {pattern}"
            if plain not in runs:
                batches = [
                    batch
                    for task in episode.tasks
                    for batch in passes_per_task(brain_class, task, steps or 0)
                ]
                runs[plain] = Run(
                    model, "plain", None, len(pattern),
                    plain_step(plain_brain, batches, plain), None, None,
                )  # fmt: skip
            name = f"{model} {algorithm} {steps}"
            runs[name] = Run(
                model,
                algorithm,
                steps,
                len(pattern),
                meta_step(brain, episode, steps, name),
                plain,
                f"{model} FOMAML {steps}" if algorithm == "MAML" else None,
            )
    # Each plain run just before the meta-steps compared with it (MAML next to
    # FOMAML), so that every ratio compares runs timed seconds apart.
    ordered: Dict[str, Run] = {}
    for name, run in runs.items():
        if run.algorithm == "plain":
            ordered[name] = run
            ordered.update((n, r) for n, r in runs.items() if r.plain == name)
    return ordered, *first


class Timings:
    """Round-robin timings: ``repeats`` rounds, each run once per round.

    Every other round runs in reverse order, so that no run is always the
    one after another's (on this CPU, of two runs the first is 5-20 % slower
    than the same run second: page faults of what the run before left).

    Arguments
    ---------
    runs : dict
        The callables to time, by name, in the order they run in the first
        round (reversed in the second, and so on).
    repeats : int
        Number of rounds.
    warmup : int
        Untimed calls of each run before the first round.
    device : str
        Its queued work is waited for around every call.
    """

    def __init__(self, runs: Dict[Hashable, Callable], repeats, warmup, device):
        backwards = dict(reversed(runs.items()))
        self.rounds = [
            median_times(
                backwards if index % 2 else runs,
                1,
                warmup if index == 0 else 0,
                device,
            )
            for index in range(repeats)
        ]

    def ms(self, name: Hashable) -> float:
        """Median milliseconds of a run."""
        return 1e3 * statistics.median(times[name] for times in self.rounds)

    def ratio(self, name: Hashable, reference: Hashable) -> float:
        """Median over the rounds of the run's time over the reference's."""
        return statistics.median(
            times[name] / times[reference] for times in self.rounds
        )

    def faster_rounds(self, name: Hashable, reference: Hashable) -> int:
        """Number of rounds in which the run took less time than the reference."""
        return sum(times[name] < times[reference] for times in self.rounds)


def peak_memory(step: Callable[[], None], device: str) -> int:
    """Peak bytes allocated by ``step`` above those allocated before it.

    Measured on the second of two calls, the first warming caches. On a CPU
    the profiler counts a free only of a block allocated while a memory
    profiler was on (the allocator records the sizes of those alone), so the
    first call runs under one too: the measured call's frees of what the
    first left (the gradients it replaces, say) then count, as they do on a
    GPU, and the figure is the same from one call to the next. (Measured
    after an unprofiled call, it moved with what the call before left, by up
    to a copy of the parameters.)
    """
    if device.startswith("cuda"):
        step()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - start
    with torch.autograd.profiler.profile(profile_memory=True):
        step()
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        step()
    events = [
        event
        for event in prof.kineto_results.events()
        if event.name() == "[memory]"
        and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def ctc_runs(brain, episode) -> Dict[str, Callable[[], None]]:
    """Native, differentiable and second-order CTC on the episode's batches.

    The log-probabilities are the model's CTC output (first output of
    ``compute_forward``) for the support and query batch of every task; the
    targets and lengths are those of the batches.
    """
    data = []
    with torch.no_grad():
        for task in episode.tasks:
            for batch in (task.support, task.query):
                log_probs = brain.compute_forward(batch, sb.Stage.TRAIN)[0]
                frames = log_probs.shape[1]
                tokens, token_lens = batch.tokens
                data.append(
                    {
                        "logits": log_probs.transpose(0, 1).requires_grad_(),
                        "targets": tokens,
                        "input_lengths": (batch.sig[1] * frames).round().long(),
                        "target_lengths": (token_lens * tokens.shape[1]).round().long(),
                    }
                )

    def every_batch(make: Callable) -> Callable[[], None]:
        runs = [make(batch) for batch in data]
        return lambda: [run() for run in runs]

    return {
        "native": every_batch(
            lambda batch: first_order(torch.nn.functional.ctc_loss, batch)
        ),
        "differentiable": every_batch(
            lambda batch: first_order(ctc_loss_differentiable, batch)
        ),
        "second order": every_batch(second_order),
    }


def meta_step_table(runs: Dict[str, Run], timings: Timings, mib: Dict) -> List[str]:
    """Markdown rows of the meta-step table."""
    lines = [
        "| model | algorithm | k | fwd/bwd per task | ms / step | peak MiB "
        "| plain ms | plain peak MiB | x plain | x FOMAML |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(run.model for run in runs.values()))
    order = ("MAML", "FOMAML", "Reptile", "MultiTask")
    shown = sorted(
        (name for name, run in runs.items() if run.algorithm != "plain"),
        key=lambda name: (
            models.index(runs[name].model),
            order.index(runs[name].algorithm),
            runs[name].steps or 0,
        ),
    )
    for name in shown:
        run = runs[name]
        versus = ""
        if run.reference in runs:
            versus = f"{timings.ratio(name, run.reference):.2f}"
        lines.append(
            f"| {run.model} | {run.algorithm} | {run.steps or '-'} | {run.passes} "
            f"| {timings.ms(name):.0f} | {mib[name]:.1f} | {timings.ms(run.plain):.0f} "
            f"| {mib[run.plain]:.1f} | {timings.ratio(name, run.plain):.2f} "
            f"| {versus} |"
        )
    return lines


def ctc_table(models: List[str], timings: Timings) -> List[str]:
    """Markdown rows of the CTC table, one per model."""
    lines = [
        "| model | native fwd+bwd ms | differentiable fwd+bwd ms | ratio "
        "| second order ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        native, differentiable, second = (
            (model, kind) for kind in ("native", "differentiable", "second order")
        )
        lines.append(
            f"| {model} | {timings.ms(native):.1f} | {timings.ms(differentiable):.1f} "
            f"| {timings.ratio(differentiable, native):.2f} "
            f"| {timings.ms(second):.1f} | {timings.ratio(second, native):.2f} |"
        )
    return lines


def maml_slope(points: List[Tuple[int, float]]) -> Tuple[float, float, float]:
    """Least-squares line ``time = a + b k`` and its largest relative error.

    Example
    -------
    >>> maml_slope([(1, 3.0), (2, 5.0), (4, 9.0)])
    (1.0, 2.0, 0.0)
    """
    ks, ts = zip(*points)
    k_mean, t_mean = statistics.fmean(ks), statistics.fmean(ts)
    slope = sum((k - k_mean) * (t - t_mean) for k, t in points) / sum(
        (k - k_mean) ** 2 for k in ks
    )
    intercept = t_mean - slope * k_mean
    worst = max(abs(t - intercept - slope * k) / t for k, t in points)
    return intercept, slope, worst


def verdicts(
    runs: Dict[str, Run], timings: Timings, ctc: Timings, mib: Dict[str, float]
) -> List[str]:
    """The targets of the issues, met or missed, with the figures.

    The first model given is the whole-model reference of the peak-memory
    target of the inner-loop variants (ANIL, LoRA) that follow it.
    """

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    first = [n for n, r in runs.items() if r.algorithm in ("FOMAML", "Reptile")]
    if first:
        ratios = {name: timings.ratio(name, runs[name].plain) for name in first}
        worst = max(ratios, key=ratios.get)
        lines.append(
            f"- FOMAML and Reptile within {FIRST_ORDER_TARGET}x of plain training "
            f"of equal work: {verdict(ratios[worst] <= FIRST_ORDER_TARGET)} "
            f"(largest: {ratios[worst]:.2f}x, {worst})."
        )
    models = list(dict.fromkeys(r.model for r in runs.values()))
    for model in models:
        maml = {
            r.steps: n
            for n, r in runs.items()
            if r.model == model and r.algorithm == "MAML"
        }
        if 1 in maml and runs[maml[1]].reference in runs:
            ratio = timings.ratio(maml[1], runs[maml[1]].reference)
            lines.append(
                f"- MAML within {MAML_TARGET}x of FOMAML at k = 1 ({model}): "
                f"{verdict(ratio <= MAML_TARGET)} ({ratio:.2f}x)."
            )
        if len(maml) > 2:
            a, b, worst = maml_slope([(k, timings.ms(n)) for k, n in maml.items()])
            lines.append(
                f"- MAML linear in k ({model}): {a:.0f} ms + {b:.0f} ms x k, "
                f"largest deviation from that line {100 * worst:.0f}% of the time."
            )
    whole = {r.steps: n for n, r in runs.items() if r.algorithm == "FOMAML"}
    whole = {k: n for k, n in whole.items() if runs[n].model == models[0]}
    for model in models[1:]:
        for name, run in runs.items():
            if run.model != model or run.algorithm != "MAML" or run.steps not in whole:
                continue
            ratio = mib[name] / mib[whole[run.steps]]
            lines.append(
                f"- Second-order {model} within {PARTIAL_MEMORY_TARGET}x the peak "
                f"memory of first-order whole-model training ({models[0]} FOMAML) "
                f"at k = {run.steps}: {verdict(ratio <= PARTIAL_MEMORY_TARGET)} "
                f"({ratio:.2f}x)."
            )
    for model in models:
        for kind, target in CTC_TARGETS.items():
            ratio = ctc.ratio((model, kind), (model, "native"))
            lines.append(
                f"- CTC, {kind}, within {target}x of native fwd+bwd ({model}): "
                f"{verdict(ratio <= target)} ({ratio:.2f}x)."
            )
    return lines


def episode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the corpus, the episode, the rounds and the device."""
    parser.add_argument("--data_folder", default="data/embedded_tiny")
    parser.add_argument(
        "--corpus_size",
        default="tiny",
        help="size of the embedded corpus built in --data_folder if missing",
    )
    parser.add_argument("--download_folder", default="data/downloads")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--support", type=int, default=4)
    parser.add_argument("--query", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 is steadiest on a busy machine",
    )
    parser.add_argument("--out", help="also write the report to this file")


def write_report(report: str, out: Optional[str]) -> None:
    """Print the report, and write it to ``out`` if given."""
    print(report)
    if out:
        with open(out, "w", encoding="utf-8") as stream:
            stream.write(report + "\n")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hparams",
        nargs="+",
        default=DEFAULT_HPARAMS,
        help="training YAMLs, each optionally followed by :key=value,...",
    )
    episode_arguments(parser)
    parser.add_argument("--ctc_repeats", type=int, default=30)
    parser.add_argument(
        "--ssl_source",
        help="encoder of the ssl group (default: a tiny wav2vec2, built here)",
    )
    args = parser.parse_args(argv)
    if args.hparams == ["ssl"]:
        args.hparams = SSL_HPARAMS
    if min(args.steps) < 1:
        parser.error("--steps must be positive.")
    for spec in args.hparams:
        if not os.path.isfile(parse_spec(spec)[0]):
            parser.error(f"No such YAML: {spec}")
    return args


def fast_weights(brain) -> int:
    """The number of values the Brain's inner loop adapts (``inner_params``)."""
    parameters = dict(brain.modules.named_parameters())
    return sum(parameters[name].numel() for name in brain.fast_weight_names)


def header(args, models: Dict[str, object], episode) -> str:
    """The machine, the models' sizes and the episode."""
    sizes = ", ".join(
        f"{model} {sum(p.numel() for p in brain.modules.parameters()) / 1e6:.2f} M"
        f" ({fast_weights(brain) / 1e6:.3f} M fast weights)"
        for model, brain in models.items()
    )
    rate = next(iter(models.values())).hparams.sample_rate
    seconds = [
        audio_seconds([getattr(task, part) for task in episode.tasks], rate)
        for part in ("support", "query")
    ]
    return (
        f"Device: {args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). Parameters: {sizes}. Episode: "
        f"{len(episode.tasks)} tasks ({', '.join(t.name for t in episode.tasks)}), "
        f"{args.support} support and {args.query} query utterances each "
        f"({seconds[0]:.1f} s and {seconds[1]:.1f} s of audio). Medians of "
        f"{args.repeats} round-robin rounds after {args.warmup} warm-up; ratios: "
        "medians of the rounds' ratios."
    )


def main(argv: Optional[List[str]] = None) -> None:
    """Measure every run and print the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_embedded_corpus(
        args.data_folder, size=args.corpus_size, download_folder=args.download_folder
    )
    runs: Dict[str, Run] = {}
    ctc: Dict[str, Dict[str, Callable]] = {}
    brains = {}
    episode = None
    with tempfile.TemporaryDirectory() as folder:
        if args.ssl_source is None and any(map(is_ssl, args.hparams)):
            from speechbrain_meta.tiny_ssl import build_tiny_ssl

            args.ssl_source = build_tiny_ssl("wav2vec2", os.path.join(folder, "ssl"))
        models: Dict[str, List[Tuple[str, dict]]] = {}
        for index, spec in enumerate(args.hparams):
            hparams = benchmark_hparams(spec, args, os.path.join(folder, str(index)))
            models.setdefault(model_name(spec, hparams), []).append((spec, hparams))
        for index, (model, loaded) in enumerate(models.items()):
            plain_folder = os.path.join(folder, f"plain{index}")
            group, brains[model], drawn = model_runs(model, loaded, args, plain_folder)
            if episode is not None and utterances(drawn) != utterances(episode):
                raise ValueError(
                    f"{model} draws another episode than {args.hparams[0]}."
                )
            episode = drawn
            runs.update(group)
            ctc[model] = ctc_runs(brains[model], episode)
        timings = Timings(
            {name: run.step for name, run in runs.items()},
            args.repeats,
            args.warmup,
            args.device,
        )
        mib = {name: peak_memory(r.step, args.device) / MIB for name, r in runs.items()}
        # Every model's CTC runs in one round-robin, as the meta-steps.
        ctc_timings = Timings(
            {(model, kind): run for model, r in ctc.items() for kind, run in r.items()},
            args.ctc_repeats,
            args.warmup,
            args.device,
        )

    report = "\n".join(
        [
            header(args, brains, episode),
            "",
            *meta_step_table(runs, timings, mib),
            "",
            "CTC loss on each model's log-probabilities for all the episode's "
            f"batches (median of {args.ctc_repeats}):",
            "",
            *ctc_table(list(ctc), ctc_timings),
            "",
            "Targets:",
            "",
            *verdicts(runs, timings, ctc_timings, mib),
        ]
    )
    write_report(report, args.out)


if __name__ == "__main__":
    main()

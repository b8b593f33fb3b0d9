"""Second-order MAML and FOMAML meta-steps: speechbrain-meta against its peers.

On the model of each training YAML given with ``--hparams`` (by default the
CTC model of ``hparams/maml_ctc.yaml`` and the Transformer of
``hparams/maml_attention.yaml``), loaded as ``benchmarks/bench_meta_step.py``
loads it, and on the same episode, every implementation computes the
meta-gradient of one meta-step (the mean over the episode's tasks of the
query loss's gradient after ``k`` SGD steps on the support batch, through
every step for MAML, at the adapted weights for FOMAML) into the ``.grad`` of
the same parameters, for each ``k`` of ``--steps``:

* ``speechbrain-meta``: :meth:`speechbrain_meta.MAML.task_step`, what
  ``fit_batch`` runs for each task;
* ``higher``: ``higher.innerloop_ctx`` with ``torch.optim.SGD`` (FOMAML:
  ``track_higher_grads=False`` and the query gradient at the fast weights
  added to theta's, higher's first-order idiom);
* ``torchopt``: its functional SGD (``torchopt.sgd``, ``update``,
  ``apply_updates``) over ``torch.func.functional_call``;
* ``torchopt MetaSGD``: ``torchopt.MetaSGD`` stepping the module in place
  (MAML only: it always differentiates its steps);
* ``torch.func``: the tutorial's plain loop, ``functional_call`` with
  ``torch.autograd.grad``;
* ``torch.func.grad``: the same loop with ``torch.func.grad``;
* ``learn2learn``: ``MAML(...).clone().adapt(loss)``;
* ``speechbrain-meta again``: ours once more, a control: its ratio to ours
  is what this machine's noise gives two identical runs.

The loss is the same for all: the recipe's ``compute_forward`` and
``compute_objectives`` (``speechbrain_meta.inner_loop.BrainObjective``),
second order inside ``second_order_context`` (our twice-differentiable CTC,
recurrent layers without cuDNN, attention on the math backend), first order
without it, as ``MAML.task_step`` does: no peer could differentiate twice
through PyTorch's CTC. ``higher`` and ``learn2learn`` copy the modules, so the
recipe's ``self.modules`` points at their copies while they run. The
outer optimizer step, the same for everyone, is left out.

Fairness check: every run starts from the same random seed (dropout masks
alike), and each peer's meta-gradient is compared with ours on the same
episode before anything is timed (``same gradient``: the largest difference
of an entry relative to the largest entry of our gradient). Then every run is
timed round-robin as in ``bench_meta_step.py`` (a peer right after ours of
the same row, every other round in reverse order; ratios are medians of
per-round ratios; ``faster rounds``: in how many rounds the peer took less
time than ours, and a peer counts as faster than ours only where a two-sided
sign test over the rounds gives p < 0.05, and again in fresh rounds of the
pairs so flagged: of some 50 pairs, about one passes the first test by
chance), and its peak memory
measured by ``bench_meta_step.peak_memory`` (on the second of two calls of
its own: the same figure from one measurement to the next). A peer that is
not installed, or that fails, is reported as such in the table, never left
out silently.

Peers are the ``bench`` extra: ``pip install -e ".[bench]" -c constraints.txt``
(learn2learn 0.2.0 does not build on Python 3.11: its generated C includes
``longintrepr.h``).

    python benchmarks/bench_peers.py --threads 1 --tasks 2 --out peers.md
"""

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import speechbrain as sb
import torch
from scipy.stats import binomtest
from torch.func import functional_call

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_meta_step import (  # noqa: E402
    MIB,
    Timings,
    benchmark_hparams,
    build_brain,
    episode_arguments,
    first_episode,
    header,
    model_name,
    peak_memory,
    write_report,
)
from recipes.embedded_corpus.prepare import prepare_embedded_corpus  # noqa: E402
from speechbrain_meta import MAML  # noqa: E402
from speechbrain_meta.inner_loop import (  # noqa: E402
    fast_weight_context,
    second_order_context,
)

DEFAULT_HPARAMS = [
    str(REPO_ROOT / "hparams" / "maml_ctc.yaml"),
    str(REPO_ROOT / "hparams" / "maml_attention.yaml"),
]
OURS = "speechbrain-meta"
# Ours again, timed as a peer: the ratio two identical runs get on this machine.
CONTROL = "speechbrain-meta again"
# A peer is faster than ours where a sign test over the rounds says so.
SIGNIFICANCE = 0.05
# A peer's gradient is the same as ours within float32 rounding of the sums.
SAME_GRADIENT = 1e-4
TRAIN = sb.Stage.TRAIN
TaskStep = Callable[[MAML, object, int, bool], None]


@contextmanager
def same_loss(first_order: bool) -> Iterator[None]:
    """The context of ``MAML.task_step``'s losses, for a peer's loop."""
    with nullcontext() if first_order else second_order_context():
        with fast_weight_context():
            yield


@contextmanager
def recipe_modules(brain: MAML, module: torch.nn.Module) -> Iterator[None]:
    """Point the recipe's ``self.modules`` at the submodules of ``module``.

    For the peers that copy the model (``higher``, ``learn2learn``): the
    recipe's methods then run on the copies, with the peer's fast weights.
    """
    own = brain.modules
    brain.modules = torch.nn.ModuleDict(dict(module.named_children()))
    try:
        yield
    finally:
        brain.modules = own


def model_loss(objective, params: Dict, buffers: Dict, batch) -> torch.Tensor:
    """The recipe's loss on ``batch`` with ``params`` and ``buffers``."""
    return functional_call(objective, {**params, **buffers}, (batch, TRAIN))


def add_to_grad(tensors, grads) -> None:
    """Accumulate ``grads`` into the ``.grad`` of ``tensors``."""
    for p, g in zip(tensors, grads):
        p.grad = g if p.grad is None else p.grad + g


def ours(brain: MAML, task, steps: int, first_order: bool) -> None:
    """:meth:`MAML.task_step` with ``steps`` inner steps."""
    brain.hparams.inner_steps = steps
    brain.hparams.first_order = first_order
    brain.task_step(task)


def plain_loop(brain: MAML, task, steps: int, first_order: bool) -> None:
    """The torch.func tutorial's loop: ``functional_call`` + ``autograd.grad``."""
    objective, lr = brain.objective(), brain.inner_lr
    params, buffers = brain.meta_parameters(), brain.copy_buffers()
    with same_loss(first_order):
        for _ in range(steps):
            loss = model_loss(objective, params, buffers, task.support)
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=not first_order
            )
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        model_loss(objective, params, buffers, task.query).backward()


def func_grad(brain: MAML, task, steps: int, first_order: bool) -> None:
    """The same loop with ``torch.func.grad`` for the inner gradients."""
    objective, lr = brain.objective(), brain.inner_lr
    params, buffers = brain.meta_parameters(), brain.copy_buffers()

    def support_loss(weights: Dict) -> torch.Tensor:
        return model_loss(objective, weights, buffers, task.support)

    with same_loss(first_order):
        for _ in range(steps):
            grads = torch.func.grad(support_loss)(params)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            params = {n: p - lr * grads[n] for n, p in params.items()}
        model_loss(objective, params, buffers, task.query).backward()


def higher_loop(brain: MAML, task, steps: int, first_order: bool) -> None:
    """``higher.innerloop_ctx`` with ``torch.optim.SGD``."""
    import higher

    objective = brain.objective()
    optimizer = torch.optim.SGD(objective.parameters(), lr=brain.inner_lr)
    with (
        same_loss(first_order),
        higher.innerloop_ctx(
            objective,
            optimizer,
            copy_initial_weights=False,
            track_higher_grads=not first_order,
        ) as (fmodel, diffopt),
    ):
        with recipe_modules(brain, fmodel):
            for _ in range(steps):
                diffopt.step(fmodel(task.support, TRAIN))
            query_loss = fmodel(task.query, TRAIN)
            if first_order:
                fast = list(fmodel.parameters())
                add_to_grad(
                    objective.parameters(), torch.autograd.grad(query_loss, fast)
                )
            else:
                query_loss.backward()


def torchopt_functional(brain: MAML, task, steps: int, first_order: bool) -> None:
    """torchopt's functional SGD: ``sgd``, ``update``, ``apply_updates``."""
    import torchopt

    objective = brain.objective()
    names, params = zip(*brain.meta_parameters().items())
    buffers = brain.copy_buffers()
    optimizer = torchopt.sgd(lr=brain.inner_lr)
    state = optimizer.init(params)
    with same_loss(first_order):
        for _ in range(steps):
            loss = model_loss(
                objective, dict(zip(names, params)), buffers, task.support
            )
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            updates, state = optimizer.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        model_loss(objective, dict(zip(names, params)), buffers, task.query).backward()


def torchopt_metasgd(brain: MAML, task, steps: int, first_order: bool) -> None:
    """``torchopt.MetaSGD`` on the modules, restored afterwards."""
    import torchopt

    if first_order:
        raise NotImplementedError("MetaSGD always differentiates its steps")
    objective = brain.objective()
    state = torchopt.extract_state_dict(objective)
    optimizer = torchopt.MetaSGD(objective, lr=brain.inner_lr)
    try:
        with same_loss(first_order):
            for _ in range(steps):
                optimizer.step(objective(task.support, TRAIN))
            objective(task.query, TRAIN).backward()
    finally:
        torchopt.recover_state_dict(objective, state)


def learn2learn_loop(brain: MAML, task, steps: int, first_order: bool) -> None:
    """``learn2learn.algorithms.MAML(...).clone().adapt(loss)``."""
    import learn2learn

    objective = brain.objective()
    maml = learn2learn.algorithms.MAML(
        objective, lr=brain.inner_lr, first_order=first_order
    )
    learner = maml.clone()
    with same_loss(first_order), recipe_modules(brain, learner.module):
        for _ in range(steps):
            learner.adapt(learner(task.support, TRAIN))
        learner(task.query, TRAIN).backward()


class Peer(NamedTuple):
    """An implementation: its name, the module it needs and its task step."""

    name: str
    module: Optional[str]
    task_step: TaskStep


PEERS = [
    Peer(OURS, None, ours),
    Peer("higher", "higher", higher_loop),
    Peer("torchopt", "torchopt", torchopt_functional),
    Peer("torchopt MetaSGD", "torchopt", torchopt_metasgd),
    Peer("torch.func", None, plain_loop),
    Peer("torch.func.grad", None, func_grad),
    Peer("learn2learn", "learn2learn", learn2learn_loop),
    Peer(CONTROL, None, ours),
]


def missing(module: Optional[str]) -> Optional[str]:
    """Why ``module`` cannot be imported, or None when it can."""
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure skips the peer
        return f"not importable ({type(error).__name__}: {error})"
    return None


def meta_step(
    brain: MAML, episode, steps: int, first_order: bool, peer: Peer, seed: int
):
    """One meta-gradient of the episode by ``peer``, into the parameters' grads."""
    parameters = list(brain.meta_parameters().values())

    def run() -> None:
        for p in parameters:
            p.grad = None
        torch.manual_seed(seed)
        for task in episode.tasks:
            peer.task_step(brain, task, steps, first_order)
        for p in parameters:
            if p.grad is not None:
                p.grad /= len(episode.tasks)

    return run


def gradient(brain: MAML, step: Callable[[], None]) -> List[torch.Tensor]:
    """The meta-gradient that ``step`` leaves (zeros where none)."""
    step()
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in brain.meta_parameters().values()
    ]


def difference(grads: List[torch.Tensor], reference: List[torch.Tensor]) -> float:
    """Largest entry of ``grads - reference`` over the largest of ``reference``."""
    scale = max(float(r.abs().max()) for r in reference)
    worst = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
    return worst / scale


class Row(NamedTuple):
    """One peer on one model, algorithm and number of inner steps."""

    model: str
    algorithm: str
    steps: int
    peer: str
    step: Optional[Callable[[], None]]  # None: skipped or failed
    note: str  # why skipped or failed, or the gradient difference


def peer_rows(brain: MAML, model: str, episode, args) -> List[Row]:
    """Every peer's row for one model, each checked against ours first."""
    if set(brain.fast_weight_names) != set(brain.meta_parameters()):
        raise ValueError(
            f"{model}: the peers adapt every parameter; keep inner_params null."
        )
    reasons = {peer.name: missing(peer.module) for peer in PEERS}
    rows = []
    for first_order in (False, True):
        algorithm = "FOMAML" if first_order else "MAML"
        for steps in args.steps:
            reference = None
            for peer in PEERS:
                step = meta_step(brain, episode, steps, first_order, peer, args.seed)
                note = reasons[peer.name]
                if note is None:
                    try:
                        grads = gradient(brain, step)
                    except Exception as error:  # noqa: BLE001 - reported in the table
                        if peer.name == OURS:
                            raise
                        last = traceback.extract_tb(error.__traceback__)[-1]
                        note = (
                            f"failed: {type(error).__name__}: "
                            f"{str(error).splitlines()[0].split('. ')[0]} "
                            f"({Path(last.filename).name}:{last.lineno})"
                        )
                    else:
                        if reference is None:
                            reference = grads
                        note = f"{difference(grads, reference):.1e}"
                rows.append(
                    Row(model, algorithm, steps, peer.name,
                        step if is_number(note) else None, note)
                )  # fmt: skip
    return rows


def is_number(text: str) -> bool:
    """Whether ``text`` is a number (a gradient difference, not a reason)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def sign_test(wins: int, rounds: int) -> float:
    """Two-sided sign test (``scipy.stats.binomtest``): the chance of a split
    at least as uneven as ``wins`` of ``rounds`` when either run is as likely
    to win a round.

    Example
    -------
    >>> round(sign_test(9, 10), 4), sign_test(5, 10)
    (0.0215, 1.0)
    """
    return float(binomtest(wins, rounds).pvalue)


def table(rows: List[Row], timings: Timings, mib: Dict[Tuple, float]) -> List[str]:
    """The Markdown table: each peer's time and memory, and ratios to ours."""
    rounds = len(timings.rounds)
    lines = [
        "| model | algorithm | k | implementation | ms / meta-step | x ours "
        "| faster rounds | peak MiB | x ours (memory) | same gradient |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        key = row[:4]
        ours_key = (*row[:3], OURS)
        if row.step is None:
            lines.append(
                f"| {' | '.join(map(str, key))} | - | - | - | - | - | {row.note} |"
            )
            continue
        same = "yes" if float(row.note) <= SAME_GRADIENT else "NO"
        faster = (
            "-" if row.peer == OURS
            else f"{timings.faster_rounds(key, ours_key)}/{rounds}"
        )  # fmt: skip
        lines.append(
            f"| {' | '.join(map(str, key))} | {timings.ms(key):.0f} "
            f"| {timings.ratio(key, ours_key):.2f} | {faster} | {mib[key]:.1f} "
            f"| {mib[key] / mib[ours_key]:.2f} | {same} ({row.note}) |"
        )
    return lines


def significant(timings: Timings, key: Tuple, ours_key: Tuple) -> bool:
    """Whether the run ``key`` was faster than ``ours_key`` in more rounds
    than a sign test gives to chance (p < ``SIGNIFICANCE``)."""
    rounds = len(timings.rounds)
    wins = timings.faster_rounds(key, ours_key)
    return wins > rounds / 2 and sign_test(wins, rounds) < SIGNIFICANCE


def pairs(rows: List[Row], control: bool) -> List[Tuple[Tuple, Tuple]]:
    """Each timed peer's key with ours of the same row: the control's alone,
    or every other peer's."""
    return [
        (row[:4], (*row[:3], OURS))
        for row in rows
        if row.step is not None
        and row.peer != OURS
        and (row.peer == CONTROL) == control
    ]


def retime_faster(rows: List[Row], timings: Timings, repeats: int, warmup: int,
                  device: str) -> Optional[Timings]:  # fmt: skip
    """Fresh rounds of every pair, the control's included, that ``timings``
    found faster than ours: the confirmation of the screening (None when
    there is none). Testing some 50 pairs at p < 0.05 flags about one by
    chance; a pair flagged twice in independent rounds is one in several
    thousand.
    """
    steps = {row[:4]: row.step for row in rows if row.step is not None}
    flagged = [
        pair
        for pair in pairs(rows, control=False) + pairs(rows, control=True)
        if significant(timings, *pair)
    ]
    if not flagged:
        return None
    runs = {key: steps[key] for peer, ours in flagged for key in (ours, peer)}
    return Timings(runs, repeats, warmup, device)


def verdicts(rows: List[Row], timings: Timings, mib: Dict[Tuple, float],
             confirmation: Optional[Timings] = None) -> List[str]:  # fmt: skip
    """Where we are at most each peer in time and in memory, and where not.

    A peer is faster than ours on a row where it took less time in so many
    rounds that a sign test gives p < ``SIGNIFICANCE``, and again in the
    fresh rounds of ``confirmation`` (:func:`retime_faster`) when given; a
    median ratio below 1 without that is listed as within noise. The control
    (ours against itself) is put to the same test: the rows where it passes
    are the false alarms of this machine and of testing many rows at once. A
    peer is below ours in memory by any byte.
    """
    rounds = len(timings.rounds)

    def faster(key: Tuple, ours_key: Tuple) -> Tuple[bool, str]:
        wins = f"{timings.faster_rounds(key, ours_key)}/{rounds} rounds"
        if not significant(timings, key, ours_key) or confirmation is None:
            return significant(timings, key, ours_key), wins
        again = confirmation.faster_rounds(key, ours_key)
        confirmed = significant(confirmation, key, ours_key)
        return confirmed, (
            f"{wins}, {'confirmed' if confirmed else 'not confirmed'}: "
            f"{again}/{len(confirmation.rounds)} fresh rounds"
        )

    peers = pairs(rows, control=False)
    found, noise = [], []
    for key, ours_key in peers:
        ratio = timings.ratio(key, ours_key)
        if ratio < 1:
            is_faster, wins = faster(key, ours_key)
            text = f"{' '.join(map(str, key))} ({ratio:.2f}x, {wins})"
            (found if is_faster else noise).append(text)
    control = pairs(rows, control=True)
    ratios = [timings.ratio(key, ours_key) for key, ours_key in control]
    alarms = []
    for key, ours_key in control:
        if significant(timings, key, ours_key):
            alarms.append(f"{' '.join(map(str, key[:3]))} ({faster(key, ours_key)[1]})")
    test = f"a sign test over the {rounds} rounds gives p < {SIGNIFICANCE}" + (
        ", and again over fresh rounds of the pairs it flags" if confirmation else ""
    )
    verdict = ", ".join(found) if found else None
    lines = [
        "- Our time at most every peer's on every row: "
        + (f"MISSED where a peer is faster: {verdict}" if verdict else "met")
        + f" (a peer is faster where {test}). Below 1.00x within noise: "
        + (", ".join(noise) if noise else "none")
        + (
            f". Ours against itself (the control): {min(ratios):.2f}-"
            f"{max(ratios):.2f}x, faster than ours by the sign test on "
            + (", ".join(alarms) if alarms else "no row")
            + "."
            if control
            else "."
        )
    ]
    below = [
        f"{' '.join(map(str, key))} ({mib[key] / mib[ours_key]:.2f}x, "
        f"{(mib[ours_key] - mib[key]) * 1024:.1f} KiB less)"
        for key, ours_key in peers
        if mib[key] < mib[ours_key]
    ]
    verdict = ", ".join(below) if below else None
    lines.append(
        "- Our peak memory at most every peer's on every row: "
        + (f"MISSED where a peer is below ours: {verdict}." if verdict else "met.")
    )
    return lines


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", nargs="+", default=DEFAULT_HPARAMS)
    episode_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.steps) < 1:
        parser.error("--steps must be positive.")
    return args


def main(argv: Optional[List[str]] = None) -> str:
    """Measure every implementation and print (and return) the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_embedded_corpus(
        args.data_folder, size=args.corpus_size, download_folder=args.download_folder
    )
    rows: List[Row] = []
    brains = {}
    episode = None
    with tempfile.TemporaryDirectory() as folder:
        for index, spec in enumerate(args.hparams):
            hparams = benchmark_hparams(spec, args, os.path.join(folder, str(index)))
            if not issubclass(hparams["brain_class"], MAML):
                raise ValueError(f"{spec} is no MAML YAML.")
            model = model_name(spec, hparams)
            brain, train_data = build_brain(
                hparams, hparams["brain_class"], args.device
            )
            episode = first_episode(brain, hparams, train_data, args.device)
            brains[model] = brain
            rows += peer_rows(brain, model, episode, args)
        timed = {row[:4]: row.step for row in rows if row.step is not None}
        timings = Timings(timed, args.repeats, args.warmup, args.device)
        confirmation = retime_faster(
            rows, timings, args.repeats, args.warmup, args.device
        )
        mib = {key: peak_memory(step, args.device) / MIB for key, step in timed.items()}
    report = "\n".join(
        [
            header(args, brains, episode),
            "",
            *table(rows, timings, mib),
            "",
            "Targets:",
            "",
            *verdicts(rows, timings, mib, confirmation),
        ]
    )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()

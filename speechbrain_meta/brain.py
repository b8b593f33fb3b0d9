"""The episode-based Brain that every meta-learning algorithm shares.

:class:`MetaBrain` is a :class:`speechbrain.core.Brain` whose training batches
are episodes (:class:`speechbrain_meta.sampler.MetaBatch`): a few tasks, each
with a support and a query batch. ``fit_batch`` lets the algorithm turn every
task into a contribution to the meta-gradient (:meth:`MetaBrain.task_step`),
averages the contributions and takes one step of the outer optimizer with
SpeechBrain's own ``optimizers_step`` (gradient clipping, non-finite checks).
Validation and test adapt a copy of the weights on each task's support batch
(:meth:`MetaBrain.inner_loop`) and score the query batch with it.

The recipe's ``compute_forward`` and ``compute_objectives`` run unchanged on
fast weights through :class:`speechbrain_meta.inner_loop.BrainObjective`; the
modules' parameters and buffers are never modified by an inner loop.

YAML keys read from ``hparams`` (defaults in brackets):

* ``inner_steps`` [1]: SGD steps on the support batch in meta-training.
* ``inner_lr`` [0.1]: learning rate of those steps.
* ``adapt_steps`` [``inner_steps``] and ``adapt_lr`` [``inner_lr``]: the same
  for the adaptation done in validation and test.
* ``seed`` [0]: with the support utterances' ids, seeds the random state of
  each test-time adaptation (dropout, augmentation), so that evaluating a
  checkpoint twice gives the same scores.
* ``inner_params`` [all]: the fast weights, as module names or glob patterns
  over parameter names (:mod:`speechbrain_meta.parameters`); the other
  learnt parameters are meta-parameters only. ANIL: ``[ctc_lin]``.
* ``reuse_body_pass`` [True]: when every fast weight lies in the recipe's
  head (``head_modules``, e.g. ANIL), the body (``compute_body``) runs once
  per support and query batch, not once per inner step
  (:meth:`MetaBrain.body_pass`); False runs it in every step (a fresh
  dropout mask and augmentation each time).
* ``meta_params`` [those that require a gradient]: the parameters the outer
  step learns; the others are frozen.
* ``learn_inner_lr`` [null]: ``tensor``, ``element`` or ``layer_step`` learns
  the inner learning rates (:class:`~speechbrain_meta.inner_rates.InnerRates`,
  starting at ``inner_lr``) with the outer optimizer at ``inner_lr_lr``
  [its learning rate]; validation and test then adapt with them for
  ``inner_steps`` steps (``adapt_with_learnt_rates`` [True]).
* ``train_time_budget_minutes`` [null]: equal compute; once the training
  batches have taken longer in total, the current batch is finished, the
  epoch validated and checkpointed, and ``fit`` ends
  (:mod:`speechbrain_meta.compute_budget`; the time spent is checkpointed).

These keys and SpeechBrain's ``max_grad_norm`` are checked when the Brain is
built (:meth:`MetaBrain.check_hparams`). Nothing non-finite reaches the
weights: a task whose support loss, query loss or gradient is not finite is
left out of its meta-step and counted (SpeechBrain's ``nonfinite_patience``
stops a run that keeps failing), and utterances whose audio is not usable
(:class:`~speechbrain_meta.sampler.EpisodicDataset`) are never trained on.
With a checkpointer, checkpoints also hold the random number generators
(exact resume) and checkpoints left incomplete by a kill are set aside before
recovery.
"""

import hashlib
import logging
import math
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import speechbrain as sb
import torch
import torch.distributed as dist
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.distributed import run_on_main
from torch.nn.modules.batchnorm import _NormBase

from speechbrain_meta.checkpoints import (
    RandomState,
    nonfinite_tensors,
    set_aside_incomplete_checkpoints,
)
from speechbrain_meta.compute_budget import TrainingClock
from speechbrain_meta.errors import SetupError
from speechbrain_meta.inner_loop import (
    AdaptedWeights,
    BrainObjective,
    NonFiniteError,
    Rate,
    Tensors,
    all_finite,
    once_differentiable_context,
    recomputed_pass,
    sgd_steps,
)
from speechbrain_meta.inner_rates import InnerRates
from speechbrain_meta.parameters import matching, set_trainable
from speechbrain_meta.sampler import (
    EpisodicDataset,
    MetaBatch,
    TaskSampler,
    collate_episode,
)

__all__ = ["MetaBrain"]

logger = logging.getLogger(__name__)


_BUCKET_BYTES = 25 * 2**20
# Stands for "no value on this rank" in the maximum of the integer buffers.
_NO_VALUE = torch.iinfo(torch.long).min


def _flat_collective(
    tensors: List[torch.Tensor], collective: Callable[[torch.Tensor], object]
) -> None:
    """Apply an in-place collective to ``tensors`` through a few flat buffers.

    The tensors are grouped by dtype and device, in order, and each group is
    cut into buckets of about 25 MiB (a larger tensor makes a bucket of its
    own); each bucket is flattened into one tensor, ``collective`` runs on it
    and the results are copied back. Every rank must pass tensors of the same
    shapes and dtypes in the same order.

    Arguments
    ---------
    tensors : list of torch.Tensor
        The tensors to update in place.
    collective : callable
        An in-place collective on one tensor, e.g. ``dist.all_reduce``.
    """
    groups: Dict[Tuple[torch.dtype, torch.device], List[List[torch.Tensor]]] = {}
    sizes: Dict[Tuple[torch.dtype, torch.device], int] = {}
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        buckets = groups.setdefault(key, [[]])
        if buckets[-1] and sizes[key] + nbytes > _BUCKET_BYTES:
            buckets.append([])
            sizes[key] = 0
        buckets[-1].append(tensor)
        sizes[key] = sizes.get(key, 0) + nbytes
    for bucket in (b for buckets in groups.values() for b in buckets):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        for tensor, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(piece.view_as(tensor))


class MetaBrain(sb.Brain):
    """Base class of the episode-based meta-learning Brains.

    A subclass defines :meth:`task_step`, which adds one task's contribution
    to the ``.grad`` of the meta-parameters and returns the loss to report.
    Everything else (episodes, averaging, distributed synchronisation, the
    outer step, adaptation at evaluation) is shared.

    Arguments
    ---------
    *args, **kwargs
        Those of :class:`speechbrain.core.Brain`.

    Example
    -------
    >>> class SupportOnly(MetaBrain):
    ...     def task_step(self, task):
    ...         loss = self.task_loss(self.meta_parameters(), {}, task.support)
    ...         loss.backward()
    ...         return loss.detach(), {}
    """

    #: The name under which recipes log the loss that :meth:`task_step` reports.
    train_loss_name = "loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.precision == "fp16":
            raise ValueError(
                f"{type(self).__name__} supports --precision fp32 and bf16; "
                "fp16 loss scaling does not reach the inner loop."
            )
        if self.grad_accumulation_factor != 1:
            raise ValueError(
                "grad_accumulation_factor must be 1 for meta-learning Brains: "
                "raise the sampler's tasks_per_batch instead."
            )
        self.check_hparams()
        self._refuse_activation_checkpointing()
        self.fast_weight_names = self._select_parameters()
        self.reuses_body_pass = self._reuses_body_pass()
        self.inner_rates = self._make_inner_rates()
        self.nonfinite_count = 0
        self.skipped_utterances: Dict[str, str] = {}
        self.unscored_tasks = 0
        self.training_clock = TrainingClock(
            self._hparam("train_time_budget_minutes", None)
        )
        self._objective: Optional[Tuple[tuple, BrainObjective]] = None
        if self.checkpointer is not None:
            # Optional: checkpoints written before it existed still load.
            self.checkpointer.add_recoverable(
                "random_state", RandomState(), optional_load=True
            )
            if self.inner_rates is not None:
                self.checkpointer.add_recoverable("inner_rates", self.inner_rates)
            self.checkpointer.add_recoverable(
                "training_clock", self.training_clock, optional_load=True
            )

    # ------------------------------------------------------------------ keys
    def _hparam(self, name: str, default):
        return getattr(self.hparams, name, default) if self.hparams else default

    def check_hparams(self) -> None:
        """Refuse settings that would train wrongly, saying what to set instead.

        ``inner_steps`` must be a whole number >= 1, ``adapt_steps`` >= 0,
        ``inner_lr`` and ``adapt_lr`` finite and > 0, and ``max_grad_norm``
        > 0 (``inf`` disables clipping; 0 would zero every gradient and a
        negative value flips their sign). Subclasses add their own checks.

        Raises
        ------
        speechbrain_meta.errors.SetupError
            Naming the key, its value and what to set.
        """
        for name, minimum in (("inner_steps", 1), ("adapt_steps", 0)):
            value = self._hparam(name, None)
            if value is None:
                continue
            if isinstance(value, bool) or value != int(value) or value < minimum:
                raise SetupError(
                    f"{name} must be a whole number >= {minimum}, got {value!r}: "
                    f"set --{name} to the number of SGD steps on the support set."
                )
        for name in ("inner_lr", "adapt_lr"):
            value = self._hparam(name, None)
            if value is not None and not (0 < float(value) < math.inf):
                raise SetupError(
                    f"{name} must be a finite learning rate > 0, got {value!r}: "
                    f"set e.g. --{name} 0.05."
                )
        if not self.max_grad_norm > 0:
            raise SetupError(
                f"max_grad_norm must be > 0, got {self.max_grad_norm!r} (0 zeroes "
                "every gradient, a negative value flips their sign): set e.g. "
                "--max_grad_norm 5, or --max_grad_norm inf for no clipping."
            )

    def _refuse_activation_checkpointing(self) -> None:
        """Refuse modules that recompute their forward in the backward pass.

        Activation (gradient) checkpointing, as transformers'
        ``gradient_checkpointing_enable()`` turns on, recomputes a layer's
        forward during the backward pass with the module's own weights, not
        the fast weights that ``functional_call`` put in place for the
        forward: the inner and meta-gradients would be silently wrong.

        Raises
        ------
        speechbrain_meta.errors.SetupError
            Naming the module.
        """
        for name, module in self.modules.named_modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                raise SetupError(
                    f"Module '{name}' has activation checkpointing on "
                    "(gradient_checkpointing): it recomputes forwards with the "
                    "module's own weights, not the fast weights, so the "
                    "meta-gradients would be wrong. Turn it off (transformers: "
                    "model.gradient_checkpointing_disable()); lower memory with "
                    "LoRA or ANIL (inner_params), bf16 or smaller episodes."
                )

    def _select_parameters(self) -> List[str]:
        """Apply ``meta_params`` and return the fast weights (``inner_params``)."""
        trainable = set_trainable(
            self.modules, self._hparam("meta_params", None), "meta_params"
        )
        patterns = self._hparam("inner_params", None)
        if patterns is None:
            return trainable
        names = [name for name, _ in self.modules.named_parameters()]
        fast = matching(names, patterns, "inner_params")
        frozen = [name for name in fast if name not in trainable]
        if frozen:
            raise SetupError(
                f"inner_params select frozen parameters ({', '.join(frozen[:3])}"
                f"{', ...' if len(frozen) > 3 else ''}): adapt only learnt ones, "
                "or add them to meta_params."
            )
        return fast

    def _reuses_body_pass(self) -> bool:
        """Whether inner loops compute the recipe's body once per batch.

        True when the recipe splits its forward pass (``compute_forward`` is
        ``compute_head`` after ``compute_body``, in the class that defines
        them, and ``head_modules`` names the head's modules), every fast
        weight lies in a head module (ANIL) and ``reuse_body_pass`` is not
        False.
        """
        head = getattr(self, "head_modules", ())
        if not head or not self._hparam("reuse_body_pass", True):
            return False
        owner = next((c for c in type(self).__mro__ if "compute_body" in vars(c)), None)
        if owner is None or "compute_head" not in vars(owner):
            return False
        if type(self).compute_forward is not vars(owner).get("compute_forward"):
            return False  # a subclass changed the forward pass: no split
        return all(name.split(".")[0] in head for name in self.fast_weight_names)

    def _make_inner_rates(self) -> Optional[InnerRates]:
        """The learnt inner rates of ``learn_inner_lr``, or None."""
        mode = self._hparam("learn_inner_lr", None)
        if mode is None:
            return None
        parameters = dict(self.modules.named_parameters())
        shapes = {name: parameters[name].shape for name in self.fast_weight_names}
        rates = InnerRates(shapes, self.inner_lr, mode, self.inner_steps)
        return rates.to(self.device)

    @property
    def inner_rate(self) -> Rate:
        """The inner learning rate: the learnt rates if any, else ``inner_lr``."""
        return self.inner_rates.rate if self.inner_rates is not None else self.inner_lr

    def learnt_tensors(self) -> List[torch.Tensor]:
        """Everything the outer step learns: meta-parameters and inner rates."""
        tensors = list(self.meta_parameters().values())
        if self.inner_rates is not None:
            tensors += list(self.inner_rates.parameters())
        return tensors

    def init_optimizers(self):
        """SpeechBrain's optimizer, plus a parameter group for learnt rates.

        The rates learn at ``inner_lr_lr`` (default: the optimizer's own
        learning rate).
        """
        super().init_optimizers()
        if self.inner_rates is not None and self.opt_class is not None:
            lr = self._hparam("inner_lr_lr", self.optimizer.param_groups[0]["lr"])
            self.optimizer.add_param_group(
                {"params": list(self.inner_rates.parameters()), "lr": float(lr)}
            )

    def train_log_stats(self) -> Dict[str, float]:
        """What the recipe adds to its training log line: the learnt rates."""
        return self.inner_rates.summary() if self.inner_rates is not None else {}

    @property
    def inner_steps(self) -> int:
        """Number of inner SGD steps in meta-training (YAML ``inner_steps``)."""
        return int(self._hparam("inner_steps", 1))

    @property
    def inner_lr(self) -> float:
        """Learning rate of the inner SGD steps (YAML ``inner_lr``)."""
        return float(self._hparam("inner_lr", 0.1))

    @property
    def adapt_steps(self) -> int:
        """Adaptation steps in validation and test (YAML ``adapt_steps``)."""
        return int(self._hparam("adapt_steps", self.inner_steps))

    @property
    def adapt_lr(self) -> float:
        """Adaptation learning rate in validation and test (``adapt_lr``)."""
        return float(self._hparam("adapt_lr", self.inner_lr))

    # --------------------------------------------------------- fast weights
    def objective(self) -> BrainObjective:
        """The recipe's forward pass and objectives as one module.

        Built once, and again only if ``self.modules`` holds other modules
        (e.g. compiled ones after ``on_fit_start``).
        """
        key = tuple((name, id(m)) for name, m in self.modules.items())
        if self._objective is None or self._objective[0] != key:
            self._objective = (key, BrainObjective(self))
        return self._objective[1]

    def meta_parameters(self) -> Tensors:
        """The trainable parameters of ``self.modules`` by objective name."""
        return {
            name: p
            for name, p in self.objective().named_parameters()
            if p.requires_grad
        }

    def copy_buffers(self) -> Tensors:
        """Clones of the modules' running statistics, for an inner loop to update.

        Only torch's normalisation layers that track running statistics
        (BatchNorm, InstanceNorm) update buffers while training; the other
        buffers (positional encodings, initial states) are constants, left to
        the modules (no copy per task, nothing to average after the
        meta-step). :meth:`fit_batch` checks that no task changed them.
        """
        statistics = self._statistics_names()
        return {
            name: buffer.clone()
            for name, buffer in self.objective().named_buffers()
            if name in statistics
        }

    def _statistics_names(self) -> frozenset:
        """Names of the buffers of normalisation layers with running statistics."""
        return frozenset(
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.objective().named_modules()
            if isinstance(module, _NormBase) and module.track_running_stats
            for name, _ in module.named_buffers(recurse=False)
        )

    def _constant_buffer_versions(self) -> Dict[str, int]:
        """In-place version counters of the buffers :meth:`copy_buffers` leaves."""
        statistics = self._statistics_names()
        return {
            name: buffer._version
            for name, buffer in self.objective().named_buffers()
            if name not in statistics
        }

    def task_loss(
        self,
        parameters: Tensors,
        buffers: Tensors,
        batch,
        stage: sb.Stage = sb.Stage.TRAIN,
        body: Optional[tuple] = None,
    ) -> torch.Tensor:
        """The recipe's loss on ``batch`` computed with the given tensors.

        Arguments
        ---------
        parameters : dict
            Parameters by name; those missing keep the modules' own.
        buffers : dict
            Buffers by name; those missing are the modules' own and may be
            updated in place (e.g. BatchNorm statistics in training mode).
        batch : PaddedBatch
            The batch given to ``compute_forward``.
        stage : speechbrain.Stage
            The stage given to the recipe's methods.
        body : tuple, optional
            The recipe's body states on ``batch`` (:meth:`body_pass`): only
            its head runs.

        Returns
        -------
        torch.Tensor
            The loss returned by ``compute_objectives``.
        """
        context = self.training_ctx if stage == sb.Stage.TRAIN else self.evaluation_ctx
        with context:
            return self.objective().call({**parameters, **buffers}, batch, stage, body)

    def body_pass(
        self,
        batch,
        buffers: Tensors,
        with_grad: bool = True,
        recompute: bool = False,
    ) -> Optional[tuple]:
        """The recipe's ``compute_body`` on a training batch, to be reused.

        When the inner loop adapts only the head (:attr:`reuses_body_pass`),
        the body's states do not change from one inner step to the next: they
        are computed once per batch, with the meta-parameters' graph
        (``with_grad``, as the second-order meta-gradient needs) or without
        it (first order: no gradient of the support loss reaches the body),
        and every inner step, and every query loss of the multi-step loss,
        runs the head only. One dropout mask and augmentation per batch, not
        per step. The meta-gradient differentiates the body's graph once (the
        inner gradients are the head's), so the pass runs with the native
        kernels even in second order
        (:func:`~speechbrain_meta.inner_loop.once_differentiable_context`:
        fused attention, which keeps no attention maps, and cuDNN RNNs).
        None when the body is not reused.

        Arguments
        ---------
        batch : PaddedBatch
            A support or query batch.
        buffers : dict
            The buffers to run with (updated, as in any step).
        with_grad : bool
            Whether to record the graph of the pass.
        recompute : bool
            With ``with_grad``: keep none of the pass's activations, recompute
            them when a later loss is differentiated
            (:func:`~speechbrain_meta.inner_loop.recomputed_pass`).

        Returns
        -------
        tuple or None
            The body's states, or None.
        """
        if not self.reuses_body_pass:
            return None

        def body(tensors: Tensors) -> tuple:
            with once_differentiable_context():
                return self.objective().call_body(tensors, batch, sb.Stage.TRAIN)

        grad = torch.is_grad_enabled() and with_grad
        with self.training_ctx, torch.set_grad_enabled(grad):
            if not (grad and recompute):
                return body(buffers)
            states, updated = recomputed_pass(body, buffers)
        buffers.update(updated)
        return states

    def inner_loop(
        self,
        batch,
        steps: int,
        lr: Rate,
        create_graph: bool = False,
        parameters: Optional[Tensors] = None,
        keep_trajectory: bool = False,
    ) -> AdaptedWeights:
        """Adapt fast weights to ``batch`` with ``steps`` steps of SGD.

        :func:`speechbrain_meta.inner_loop.sgd_steps` on the recipe's loss
        (stage TRAIN) with copies of the modules' buffers. The fast weights
        (``inner_params``) start from ``parameters`` (the meta-parameters by
        default) and keep their autograd history: with ``create_graph`` the
        gradient of a later loss reaches the meta-parameters through every
        inner step (second order); without it, through the identity only
        (first order). The other parameters are the modules' own. The
        modules' parameters and buffers are untouched. With YAML
        ``checkpoint_inner_steps: True``, second-order steps keep no
        activations: each is recomputed in the backward pass (gradient
        checkpointing; the same meta-gradient, less memory, more time), as is
        the body pass that ANIL's steps share (:meth:`body_pass`).

        Arguments
        ---------
        batch : PaddedBatch
            The support batch.
        steps : int
            Number of SGD steps.
        lr : float or callable
            Their learning rate, or a rate per weight and step
            (:attr:`inner_rate`).
        create_graph : bool
            Whether the inner gradients are themselves differentiable.
        parameters : dict, optional
            Where to start from.
        keep_trajectory : bool
            Whether to return the weights after every step too.

        Returns
        -------
        AdaptedWeights
            The adapted weights, buffers and last support loss.

        Raises
        ------
        NonFiniteError
            When a support loss or its gradient is not finite (the task must
            be skipped).
        """
        if parameters is None:
            theta = self.meta_parameters()
            parameters = {name: theta[name] for name in self.fast_weight_names}
        buffers = self.copy_buffers()
        recompute = bool(self._hparam("checkpoint_inner_steps", False))
        body = self.body_pass(batch, buffers, create_graph, recompute)
        return sgd_steps(
            lambda weights, buffers: self.task_loss(weights, buffers, batch, body=body),
            parameters,
            buffers,
            steps,
            lr,
            create_graph,
            keep_trajectory,
            checkpoint_steps=recompute,
        )

    # ------------------------------------------------------------- training
    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Add one task's contribution to the meta-gradient.

        Arguments
        ---------
        task : speechbrain_meta.sampler.Task
            The task, with its support and query batches.

        Returns
        -------
        tuple or None
            The detached loss to report and the buffers the task ended with
            (empty if the modules' own were updated in place), or None if the
            task was skipped.

        Raises
        ------
        NonFiniteError
            When a loss is not finite; :meth:`fit_batch` then discards what
            the task added to the gradients, as it does when the gradient the
            task leaves is not finite.
        """
        raise NotImplementedError

    def meta_buffers(self, task_buffers: List[Tensors]) -> None:
        """Set the modules' buffers from the tasks' adapted buffers.

        A floating-point buffer (normalisation statistics) becomes the mean of
        the values the tasks returned for it: their sum divided by their
        number. Under DDP both are summed over the ranks first, so the mean is
        over the tasks of all ranks, as on one process holding all of them
        (up to rounding). Another buffer (e.g. ``num_batches_tracked``) takes
        the last task's value; under DDP, the element-wise maximum over the
        ranks of their last task's value (ranks whose tasks did not return it
        take no part), the same on every rank. A buffer that no task returned
        (on any rank) is left as it is. Under DDP every rank takes part in the
        collectives, even one whose tasks were all skipped.

        Arguments
        ---------
        task_buffers : list of dict
            The buffers each task of the episode ended with.
        """
        named = list(self.objective().named_buffers())
        if not named:
            return
        counts = [float(sum(name in b for b in task_buffers)) for name, _ in named]
        local = []
        for name, buffer in named:
            values = [buffers[name] for buffers in task_buffers if name in buffers]
            if buffer.is_floating_point():
                local.append(
                    torch.stack(values).sum(0) if values else torch.zeros_like(buffer)
                )
            else:
                local.append(
                    values[-1].long()
                    if values
                    else torch.full_like(buffer, _NO_VALUE, dtype=torch.long)
                )
        if self._distributed():
            floats = [v for (_, b), v in zip(named, local) if b.is_floating_point()]
            others = [v for (_, b), v in zip(named, local) if not b.is_floating_point()]
            total = torch.tensor(counts, device=self.device)
            _flat_collective(floats + [total], dist.all_reduce)
            counts = total.tolist()
            if others:
                _flat_collective(others, partial(dist.all_reduce, op=dist.ReduceOp.MAX))
        for (_, buffer), value, count in zip(named, local, counts):
            if count > 0:
                buffer.copy_(value / count if buffer.is_floating_point() else value)

    def fit_batch(self, batch: MetaBatch) -> torch.Tensor:
        """One meta-step: every task's contribution, averaged, then the step.

        A task whose loss or gradient is not finite adds nothing and is
        counted (:meth:`skip_task`); so are the utterances the loader left out
        (:attr:`MetaBatch.skipped`). Without any task left, no step is taken.

        Arguments
        ---------
        batch : MetaBatch
            The tasks of this episode.

        Returns
        -------
        torch.Tensor
            The mean reported loss over the tasks that were not skipped (NaN
            if all were).

        Raises
        ------
        TypeError
            When the batch is not an episode (the loader has no TaskSampler).
        RuntimeError
            When the optimizer step left a parameter non-finite (the run
            stops before any checkpoint holds it).
        """
        _check_episode(batch, sb.Stage.TRAIN)
        start = time.perf_counter()
        self.on_fit_batch_start(batch, True)
        self.note_skipped_utterances(batch.skipped)
        losses, task_buffers = [], []
        constants = self._constant_buffer_versions()
        finished: List[Tuple[object, dict]] = []
        for task in batch.tasks:
            outcome = self._finite_task_step(task, finished)
            if outcome is not None:
                losses.append(outcome[0])
                task_buffers.append(outcome[1])
        changed = [
            n for n, v in self._constant_buffer_versions().items() if v != constants[n]
        ]
        if changed:
            raise RuntimeError(
                f"The episode's tasks changed the modules' buffers {changed} in "
                "place: only the running statistics of torch's normalisation "
                "layers are copied for inner loops (MetaBrain.copy_buffers)."
            )
        tasks_done = self._all_reduce_gradients(len(losses))
        if tasks_done > 0:
            for p in self.learnt_tensors():
                if p.grad is not None:
                    p.grad /= tasks_done
            self.optimizers_step()
            with torch.no_grad():
                self.meta_buffers(task_buffers)
            self._check_finite_weights(
                f"after meta-step {self.optimizer_step}",
                "No checkpoint holds them; lower meta_lr or max_grad_norm.",
            )
        else:
            self.zero_grad(set_to_none=True)
        mean_loss = (
            torch.stack(losses).mean().cpu() if losses else torch.tensor(float("nan"))
        )
        self.on_fit_batch_end(batch, None, mean_loss, True)
        self._count_time(time.perf_counter() - start)
        return mean_loss

    def _count_time(self, seconds: float) -> None:
        """Add a batch's time to the clock; every rank adds the slowest's."""
        if self._distributed() and self.training_clock.budget_minutes is not None:
            slowest = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = float(slowest)
        self.training_clock.add(seconds)

    @property
    def _optimizer_step_limit_exceeded(self) -> bool:
        """SpeechBrain's ``optimizer_step_limit``, or the time budget, spent.

        ``Brain._fit_train`` checks it before each batch and ``Brain.fit``
        after each validation, so a spent budget ends the epoch early and
        then ``fit``.
        """
        return super()._optimizer_step_limit_exceeded or self.training_clock.spent

    def _finite_task_step(
        self, task, finished: List[Tuple[object, dict]]
    ) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """:meth:`task_step`, undone and counted if anything it made is not finite.

        The task adds its gradient to the earlier tasks' in place, as plain
        training accumulates: one gradient per parameter in memory. When the
        sum is then not finite (or a task fails after adding to it), the task
        is skipped and the earlier tasks' sum is rebuilt by running them
        again from their random states (``finished``: the episode's tasks so
        far with the states they started from; the same gradients, rarely
        needed); the random state then goes on from where the skipped task
        left it.
        """
        parameters = self.learnt_tensors()
        before = RandomState.state()
        seen = _gradient_marks(parameters)
        try:
            outcome = self.task_step(task)
            if outcome is not None and not all_finite(p.grad for p in parameters):
                raise NonFiniteError("meta-gradient")
        except NonFiniteError as error:
            self.skip_task(task.name, str(error))
            if _gradient_marks(parameters) != seen:
                self._rebuild_gradients(parameters, finished)
            return None
        if outcome is not None:
            finished.append((task, before))
        return outcome

    def _rebuild_gradients(self, parameters: List[torch.Tensor], finished) -> None:
        """The gradients of the ``finished`` tasks alone, run again."""
        after = RandomState.state()
        for p in parameters:
            p.grad = None
        for task, state in finished:
            RandomState.restore(state)
            if self.task_step(task) is None or not all_finite(
                p.grad for p in parameters
            ):
                raise RuntimeError(
                    f"Task '{task.name}' was finite but not when run again "
                    "to leave out a skipped task: its step is not reproducible."
                )
        RandomState.restore(after)

    def skip_task(self, task: str, reason: str) -> None:
        """Count a training task left out because ``reason`` was not finite.

        Arguments
        ---------
        task : str
            The task's name.
        reason : str
            The value that was not finite.

        Raises
        ------
        ValueError
            When more tasks were skipped than ``--nonfinite_patience`` allows.
        """
        self.nonfinite_count += 1
        message = (
            f"Task '{task}' skipped in meta-step {self.optimizer_step + 1}: "
            f"non-finite {reason} ({self.nonfinite_count} tasks skipped, "
            f"nonfinite_patience {self.nonfinite_patience})."
        )
        if self.nonfinite_count > self.nonfinite_patience:
            raise ValueError(
                f"{message} Patience exhausted: check the data (audio, "
                "transcripts) and lower inner_lr / meta_lr; to debug, wrap fit() "
                "in torch.autograd.detect_anomaly()."
            )
        logger.warning(message)

    def note_skipped_utterances(self, skipped: List[Tuple[str, str]]) -> None:
        """Count utterances the loader left out, warning once for each.

        Arguments
        ---------
        skipped : list of tuple
            ``(utterance id, reason)`` pairs (:attr:`MetaBatch.skipped`).
        """
        for utt_id, reason in skipped:
            if utt_id in self.skipped_utterances:
                continue
            self.skipped_utterances[utt_id] = reason
            logger.warning(
                f"Utterance '{utt_id}' skipped: its audio is {reason} "
                f"({len(self.skipped_utterances)} utterances skipped so far)."
            )

    def _check_finite_weights(self, when: str, advice: str) -> None:
        """Stop the run if a parameter or buffer is not finite."""
        bad = nonfinite_tensors(self.modules)
        if bad:
            names = ", ".join(f"{n} ({v})" for n, v in list(bad.items())[:5])
            raise RuntimeError(
                f"{len(bad)} parameters or buffers are not finite {when}: {names}. "
                + advice
            )

    def _distributed(self) -> bool:
        """Whether this is a rank of a DDP run (collectives are needed)."""
        return self.distributed_launch and dist.is_initialized()

    def _all_reduce_gradients(self, tasks_done: int) -> int:
        """Sum the gradients and task counts over the ranks of a DDP run.

        Gradients, one "has a gradient" flag per meta-parameter and the task
        count go through one flattened all-reduce (more than one only past
        ~25 MiB per dtype). A parameter that has a gradient on no rank keeps
        ``grad = None``, as on one process, so the optimizer leaves it alone
        (no momentum, no weight decay); elsewhere its gradient is the sum over
        the ranks (zero where a rank had none). Every rank takes part, even
        one whose tasks were all skipped. On one process nothing changes.

        Arguments
        ---------
        tasks_done : int
            The number of tasks of this rank that were not skipped.

        Returns
        -------
        int
            The number of tasks not skipped, over all ranks.
        """
        if not self._distributed():
            return tasks_done
        parameters = self.learnt_tensors()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
        counts = torch.tensor(
            [float(p.grad is not None) for p in parameters] + [float(tasks_done)],
            device=self.device,
        )
        _flat_collective(grads + [counts], dist.all_reduce)
        *flags, total = counts.tolist()
        for p, grad, flag in zip(parameters, grads, flags):
            p.grad = grad if flag > 0 else None
        return int(total)

    def _wrap_distributed(self):
        """Synchronise the initial weights instead of wrapping modules in DDP.

        Rank 0's parameters and buffers are broadcast to every rank (in
        flattened buckets). DDP's gradient hooks fire only on ``backward()``
        and it has no double backward; meta-gradients are all-reduced
        explicitly in ``fit_batch``.
        """
        if self.data_parallel_backend:
            raise ValueError(
                "Meta-learning Brains run on several GPUs through DDP "
                "(torchrun), not --data_parallel_backend."
            )
        if self._distributed():
            logger.info(
                f"DDP on {dist.get_world_size()} ranks: rank 0's weights are "
                "broadcast, meta-gradients and buffers all-reduced."
            )
            with torch.no_grad():
                _flat_collective(
                    list(self.modules.state_dict().values()),
                    partial(dist.broadcast, src=0),
                )

    # ----------------------------------------------------------- evaluation
    def evaluate_batch(self, batch: MetaBatch, stage: sb.Stage) -> torch.Tensor:
        """Adapt on each task's support batch, then score its query batch.

        The query batch goes through the recipe's methods with ``stage``
        (so its metrics, decoding and beam search see the adapted weights).
        A task whose adaptation or query loss is not finite is left out with
        a warning and counted in ``unscored_tasks`` (reset when a stage
        starts, for the recipe's ``on_stage_end`` to report).

        Arguments
        ---------
        batch : MetaBatch
            The tasks to evaluate.
        stage : speechbrain.Stage
            VALID or TEST.

        Returns
        -------
        torch.Tensor
            The mean query loss after adaptation.

        Raises
        ------
        TypeError
            When the batch is not an episode (the loader has no TaskSampler).
        """
        _check_episode(batch, stage)
        self.note_skipped_utterances(batch.skipped)
        losses = []
        for task in batch.tasks:
            try:
                adapted = self.adapt(task.support, seed=self.adaptation_seed(task))
                parameters = {n: w.detach() for n, w in adapted.parameters.items()}
                with torch.no_grad():
                    loss = self.task_loss(
                        parameters, adapted.buffers, task.query, stage
                    )
                if not torch.isfinite(loss):
                    raise NonFiniteError("query loss after adaptation")
            except NonFiniteError as error:
                self.unscored_tasks += 1
                logger.warning(
                    f"{stage.name} task '{task.name}' not scored: non-finite "
                    f"{error} ({self.unscored_tasks} tasks of this stage not "
                    "scored so far)."
                )
                continue
            losses.append(loss.detach().cpu())
        return torch.stack(losses).mean() if losses else torch.tensor(float("nan"))

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Set aside incomplete checkpoints, then load the best one."""
        self._set_aside_incomplete_checkpoints()
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        self._check_finite_weights(
            "in the checkpoint loaded for evaluation", _MOVE_CHECKPOINT
        )

    def on_stage_start(self, stage, epoch=None):
        """Reset the count of tasks not scored (recipes call it by ``super()``)."""
        self.unscored_tasks = 0
        super().on_stage_start(stage, epoch)

    def adaptation_seed(self, task) -> int:
        """The seed of a task's test-time adaptation.

        Made from the YAML ``seed`` and the task's name and support ids, so
        that the same task always adapts with the same dropout masks and
        augmentations, whatever was evaluated before it.

        Arguments
        ---------
        task : speechbrain_meta.sampler.Task
            The task to adapt to.

        Returns
        -------
        int
            A seed for ``torch.manual_seed``.
        """
        ids = list(getattr(task.support, "id", None) or [])
        key = repr((int(self._hparam("seed", 0)), task.name, ids))
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")

    def adapt(self, batch, seed: Optional[int] = None) -> AdaptedWeights:
        """Adapt to one support batch as in validation and test.

        Runs ``adapt_steps`` first-order steps of ``adapt_lr`` (with learnt
        inner rates: ``inner_steps`` steps of those, unless
        ``adapt_with_learnt_rates: False``) with the modules in training mode
        (as in meta-training), whatever the surrounding mode and gradient
        setting, and restores both. With a
        ``seed``, the random numbers (dropout, augmentation) come from a
        generator seeded with it, and the global random state is left as it
        was.

        Arguments
        ---------
        batch : PaddedBatch
            The support batch.
        seed : int, optional
            Seed of the adaptation's random numbers.

        Returns
        -------
        AdaptedWeights
            As :meth:`inner_loop`.

        Raises
        ------
        NonFiniteError
            As :meth:`inner_loop`.
        """
        was_training = self.modules.training
        self.modules.train()
        devices = [self.device] if str(self.device).startswith("cuda") else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.enable_grad():
                    return self.inner_loop(batch, *self._adaptation())
        finally:
            self.modules.train(was_training)

    def _adaptation(self) -> Tuple[int, Rate]:
        """The steps and rate of test-time adaptation."""
        if self.inner_rates is not None and self._hparam(
            "adapt_with_learnt_rates", True
        ):
            return self.inner_steps, self.inner_rates.rate
        return self.adapt_steps, self.adapt_lr

    # ------------------------------------------------------------ checkpoints
    def on_fit_start(self):
        """Set aside incomplete checkpoints, then resume as SpeechBrain does.

        Raises
        ------
        RuntimeError
            When the checkpoint resumed from holds non-finite weights.
        """
        self._set_aside_incomplete_checkpoints()
        super().on_fit_start()
        self._check_finite_weights("in the checkpoint resumed from", _MOVE_CHECKPOINT)

    def _set_aside_incomplete_checkpoints(self) -> None:
        if self.checkpointer is not None:
            # The optimizer is registered by super().on_fit_start(), after this.
            expected = ["optimizer"] if self.opt_class is not None else []
            run_on_main(
                set_aside_incomplete_checkpoints, args=[self.checkpointer, expected]
            )

    # ---------------------------------------------------------------- data
    def make_dataloader(
        self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs
    ):
        """Build episodic loaders when the batch sampler is a TaskSampler.

        A :class:`~speechbrain.dataio.dataset.DynamicItemDataset` passed with
        ``batch_sampler=TaskSampler(...)`` is wrapped in an
        :class:`~speechbrain_meta.sampler.EpisodicDataset` and collated into
        :class:`~speechbrain_meta.sampler.MetaBatch` es. Every loader gets its
        own seeded ``generator`` unless one is given.
        """
        sampler = loader_kwargs.get("batch_sampler")
        if isinstance(sampler, TaskSampler) and isinstance(dataset, DynamicItemDataset):
            dataset = EpisodicDataset(dataset, task_key=sampler.task_key)
            loader_kwargs.setdefault("collate_fn", collate_episode)
        # Its own generator: iterating the loader then leaves the global random
        # state (dropout, augmentation) alone, so a resumed run draws the same.
        generator = torch.Generator().manual_seed(int(self._hparam("seed", 0)))
        loader_kwargs.setdefault("generator", generator)
        return super().make_dataloader(
            dataset, stage, ckpt_prefix=ckpt_prefix, **loader_kwargs
        )

    def _train_loader_specifics(self, dataset, loader_kwargs):
        """Register the episode sampler so Brain calls its ``set_epoch``."""
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        sampler = loader_kwargs.get("batch_sampler")
        if sampler is not None and not self.distributed_launch:
            self.train_sampler = sampler
        return loader_kwargs


_MOVE_CHECKPOINT = (
    "Move that checkpoint (named in the log) out of the save folder to resume "
    "from an earlier one, or pass another --output_folder."
)

_LOADER_KWARGS = {
    sb.Stage.TRAIN: "train_loader_kwargs",
    sb.Stage.VALID: "valid_loader_kwargs",
    sb.Stage.TEST: "test_loader_kwargs",
}


def _gradient_marks(parameters: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """Which gradient tensor each parameter holds, and its in-place version.

    A gradient replaced rather than added to in place is made while the one
    it replaces still exists, so their identities differ.
    """
    return [(id(p.grad), -1 if p.grad is None else p.grad._version) for p in parameters]


def _check_episode(batch, stage: sb.Stage) -> None:
    """Refuse a batch that is not an episode, saying how to get episodes."""
    if isinstance(batch, MetaBatch):
        return
    raise TypeError(
        f"Meta-learning Brains take episodes (MetaBatch) in every stage, but the "
        f"{stage.name} loader gave a {type(batch).__name__}: pass "
        f"{_LOADER_KWARGS[stage]}={{'batch_sampler': TaskSampler(dataset, ...)}} "
        "(for validation and test: tasks_per_batch=1, task_weighting="
        "'round_robin', reseed_each_epoch=False)."
    )

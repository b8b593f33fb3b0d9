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
fast weights through :class:`speechbrain_meta.functional.BrainObjective`; the
modules' parameters and buffers are never modified by an inner loop.

YAML keys read from ``hparams`` (defaults in brackets):

* ``inner_steps`` [1]: SGD steps on the support batch in meta-training.
* ``inner_lr`` [0.1]: learning rate of those steps.
* ``adapt_steps`` [``inner_steps``] and ``adapt_lr`` [``inner_lr``]: the same
  for the adaptation done in validation and test.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import speechbrain as sb
import torch
import torch.distributed as dist
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_meta.functional import BrainObjective
from speechbrain_meta.sampler import (
    EpisodicDataset,
    MetaBatch,
    TaskSampler,
    collate_episode,
)

__all__ = ["AdaptedWeights", "MetaBrain"]

Tensors = Dict[str, torch.Tensor]


class AdaptedWeights(NamedTuple):
    """The result of an inner loop on one batch.

    Attributes
    ----------
    parameters : dict
        The fast weights by name, with autograd history back to the
        meta-parameters.
    buffers : dict
        Copies of the modules' buffers as the inner loop left them.
    loss : torch.Tensor
        The support loss of the last inner step.
    """

    parameters: Tensors
    buffers: Tensors
    loss: torch.Tensor


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
        self.nonfinite_count = 0

    # ------------------------------------------------------------------ keys
    def _hparam(self, name: str, default):
        return getattr(self.hparams, name, default) if self.hparams else default

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
        """The recipe's forward pass and objectives as one module."""
        return BrainObjective(self)

    def meta_parameters(self) -> Tensors:
        """The trainable parameters of ``self.modules`` by objective name."""
        return {
            name: p
            for name, p in self.objective().named_parameters()
            if p.requires_grad
        }

    def copy_buffers(self) -> Tensors:
        """Clones of the modules' buffers, for an inner loop to update."""
        return {n: b.clone() for n, b in self.objective().named_buffers()}

    def task_loss(
        self,
        parameters: Tensors,
        buffers: Tensors,
        batch,
        stage: sb.Stage = sb.Stage.TRAIN,
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

        Returns
        -------
        torch.Tensor
            The loss returned by ``compute_objectives``.
        """
        context = self.training_ctx if stage == sb.Stage.TRAIN else self.evaluation_ctx
        with context:
            return self.objective().call({**parameters, **buffers}, batch, stage)

    def inner_loop(
        self,
        batch,
        steps: int,
        lr: float,
        create_graph: bool = False,
        parameters: Optional[Tensors] = None,
    ) -> Optional[AdaptedWeights]:
        """Adapt fast weights to ``batch`` with ``steps`` steps of SGD.

        The fast weights start from ``parameters`` (the meta-parameters by
        default) and keep their autograd history: with ``create_graph`` the
        gradient of a later loss reaches the meta-parameters through every
        inner step (second order); without it, through the identity only
        (first order). The modules' own parameters and buffers are untouched.

        Arguments
        ---------
        batch : PaddedBatch
            The support batch.
        steps : int
            Number of SGD steps.
        lr : float
            Their learning rate.
        create_graph : bool
            Whether the inner gradients are themselves differentiable.
        parameters : dict, optional
            Where to start from.

        Returns
        -------
        AdaptedWeights or None
            None when a support loss is not finite (the task is counted as a
            non-finite loss and must be skipped).
        """
        weights = self.meta_parameters() if parameters is None else parameters
        buffers = self.copy_buffers()
        loss = torch.zeros(())
        for _ in range(steps):
            loss = self.task_loss(weights, buffers, batch, sb.Stage.TRAIN)
            if not torch.isfinite(loss):
                self.check_loss_isfinite(loss)
                return None
            grads = torch.autograd.grad(
                loss,
                list(weights.values()),
                create_graph=create_graph,
                allow_unused=True,
            )
            weights = {
                name: w if g is None else w - lr * g
                for (name, w), g in zip(weights.items(), grads)
            }
        return AdaptedWeights(weights, buffers, loss.detach())

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
            task was skipped because a loss was not finite (then nothing was
            added to the gradients).
        """
        raise NotImplementedError

    def meta_buffers(self, task_buffers: List[Tensors]) -> None:
        """Set the modules' buffers to the mean of the tasks' adapted buffers.

        Floating-point buffers (normalisation statistics) are averaged over
        the tasks of the episode; other buffers take the last task's value.
        Buffers that the tasks did not return are left as they are.

        Arguments
        ---------
        task_buffers : list of dict
            The buffers each task of the episode ended with.
        """
        for name, buffer in self.objective().named_buffers():
            values = [buffers[name] for buffers in task_buffers if name in buffers]
            if not values:
                continue
            if buffer.is_floating_point():
                buffer.copy_(torch.stack(values).mean(0))
            else:
                buffer.copy_(values[-1])

    def fit_batch(self, batch: MetaBatch) -> torch.Tensor:
        """One meta-step: every task's contribution, averaged, then the step.

        Arguments
        ---------
        batch : MetaBatch
            The tasks of this episode.

        Returns
        -------
        torch.Tensor
            The mean reported loss over the tasks that were not skipped (NaN
            if all were).
        """
        self.on_fit_batch_start(batch, True)
        losses, task_buffers = [], []
        for task in batch.tasks:
            outcome = self.task_step(task)
            if outcome is not None:
                losses.append(outcome[0])
                task_buffers.append(outcome[1])
        tasks_done = self._all_reduce_gradients(len(losses))
        if tasks_done > 0:
            for p in self.meta_parameters().values():
                if p.grad is not None:
                    p.grad /= tasks_done
            self.optimizers_step()
            with torch.no_grad():
                self.meta_buffers(task_buffers)
        else:
            self.zero_grad(set_to_none=True)
        mean_loss = (
            torch.stack(losses).mean().cpu() if losses else torch.tensor(float("nan"))
        )
        self.on_fit_batch_end(batch, None, mean_loss, True)
        return mean_loss

    def _all_reduce_gradients(self, tasks_done: int) -> int:
        """Sum gradients and task counts over the ranks of a DDP run."""
        if not (self.distributed_launch and dist.is_initialized()):
            return tasks_done
        for p in self.meta_parameters().values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        count = torch.tensor(float(tasks_done), device=self.device)
        dist.all_reduce(count)
        return int(count.item())

    def _wrap_distributed(self):
        """Synchronise the initial weights instead of wrapping modules in DDP.

        DDP's gradient hooks fire only on ``backward()`` and it has no double
        backward; meta-gradients are all-reduced explicitly in ``fit_batch``.
        """
        if self.data_parallel_backend:
            raise ValueError(
                "Meta-learning Brains run on several GPUs through DDP "
                "(torchrun), not --data_parallel_backend."
            )
        if self.distributed_launch and dist.is_initialized():
            with torch.no_grad():
                for tensor in self.modules.state_dict().values():
                    dist.broadcast(tensor, src=0)

    # ----------------------------------------------------------- evaluation
    def evaluate_batch(self, batch: MetaBatch, stage: sb.Stage) -> torch.Tensor:
        """Adapt on each task's support batch, then score its query batch.

        The query batch goes through the recipe's methods with ``stage``
        (so its metrics, decoding and beam search see the adapted weights).

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
        """
        losses = []
        for task in batch.tasks:
            adapted = self.adapt(task.support)
            if adapted is None:
                continue
            parameters = {n: w.detach() for n, w in adapted.parameters.items()}
            with torch.no_grad():
                loss = self.task_loss(parameters, adapted.buffers, task.query, stage)
            losses.append(loss.detach().cpu())
        return torch.stack(losses).mean() if losses else torch.tensor(float("nan"))

    def adapt(self, batch) -> Optional[AdaptedWeights]:
        """Adapt to one support batch as in validation and test.

        Runs ``adapt_steps`` first-order steps of ``adapt_lr`` with the
        modules in training mode (as in meta-training), whatever the
        surrounding mode and gradient setting, and restores both.

        Arguments
        ---------
        batch : PaddedBatch
            The support batch.

        Returns
        -------
        AdaptedWeights or None
            As :meth:`inner_loop`.
        """
        was_training = self.modules.training
        self.modules.train()
        try:
            with torch.enable_grad():
                return self.inner_loop(batch, self.adapt_steps, self.adapt_lr)
        finally:
            self.modules.train(was_training)

    # ---------------------------------------------------------------- data
    def make_dataloader(
        self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs
    ):
        """Build episodic loaders when the batch sampler is a TaskSampler.

        A :class:`~speechbrain.dataio.dataset.DynamicItemDataset` passed with
        ``batch_sampler=TaskSampler(...)`` is wrapped in an
        :class:`~speechbrain_meta.sampler.EpisodicDataset` and collated into
        :class:`~speechbrain_meta.sampler.MetaBatch` es.
        """
        sampler = loader_kwargs.get("batch_sampler")
        if isinstance(sampler, TaskSampler) and isinstance(dataset, DynamicItemDataset):
            dataset = EpisodicDataset(dataset, task_key=sampler.task_key)
            loader_kwargs.setdefault("collate_fn", collate_episode)
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

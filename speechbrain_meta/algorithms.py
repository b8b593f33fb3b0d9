"""Meta-learning algorithms, one small Brain class each.

Each class only says how one task of an episode contributes to the gradient
of the meta-parameters; :class:`speechbrain_meta.brain.MetaBrain` does the
rest. With support set S, query set Q, inner learning rate ``a`` and ``k``
inner steps, ``phi = theta - a * sum_i grad L_S(phi_i)``:

* :class:`MAML`: ``d L_Q(phi) / d theta`` through every inner step.
* :class:`FOMAML`: ``grad L_Q(phi)`` taken at ``phi`` (first order).
* :class:`Reptile`: the pseudo-gradient ``theta - phi``; with SGD of learning
  rate ``e`` as outer optimizer, theta moves ``e`` of the way towards the
  mean adapted weights.
* :class:`MultiTask`: no adaptation, ``grad L_S(theta) + grad L_Q(theta)``:
  ordinary joint training on the same episodes, the usual baseline.
"""

from contextlib import nullcontext
from functools import partial
from typing import Optional, Tuple

import torch

from speechbrain_meta.brain import MetaBrain, Tensors
from speechbrain_meta.diagnostics import (
    is_double_backward_error,
    not_twice_differentiable,
)
from speechbrain_meta.functional import second_order_context

__all__ = ["FOMAML", "MAML", "MultiTask", "Reptile"]


class MAML(MetaBrain):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), second order.

    The meta-gradient is that of the query loss after ``inner_steps`` SGD
    steps on the support loss, differentiated through every inner step. Those
    steps run in :func:`speechbrain_meta.functional.second_order_context`, so
    CTC, recurrent layers and attention are twice differentiable on CPU and
    GPU. YAML key ``first_order: True`` drops the second-order terms
    (that is :class:`FOMAML`).

    Example
    -------
    >>> import speechbrain as sb
    >>> class Fit(MAML):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.lin(batch[0])
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return ((predictions - batch[1]) ** 2).mean()
    >>> brain = Fit({"lin": torch.nn.Linear(1, 1)}, hparams={"inner_lr": 0.1})
    >>> batch = (torch.ones(2, 1), torch.zeros(2, 1))
    >>> from speechbrain_meta.sampler import Task
    >>> loss, buffers = brain.task_step(Task("ones", support=batch, query=batch))
    >>> all(p.grad is not None for p in brain.modules.parameters())
    True
    """

    default_first_order = False

    @property
    def first_order(self) -> bool:
        """Whether second-order terms are dropped in this meta-step.

        Always with YAML ``first_order: True``; otherwise during the first
        ``first_order_steps`` meta-steps (default 0), the derivative-order
        annealing of Antoniou et al. (2019, "How to train your MAML"): cheap
        first-order steps while the model is far from any solution, second
        order afterwards.
        """
        if self._hparam("first_order", self.default_first_order):
            return True
        return self.optimizer_step < int(self._hparam("first_order_steps", 0))

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Back-propagate the query loss after adaptation to theta.

        Raises
        ------
        RuntimeError
            In second order, if an operation has no double backward: the
            error names the module that uses it and suggests ``first_order``.
        """
        context = nullcontext() if self.first_order else second_order_context()
        with context:
            try:
                adapted = self.inner_loop(
                    task.support,
                    self.inner_steps,
                    self.inner_lr,
                    create_graph=not self.first_order,
                )
                if adapted is None:
                    return None
                loss = self.task_loss(adapted.parameters, adapted.buffers, task.query)
                if not torch.isfinite(loss):
                    self.check_loss_isfinite(loss)
                    return None
                loss.backward()
            except RuntimeError as error:
                if self.first_order or not is_double_backward_error(error):
                    raise
                support_loss = partial(
                    self.task_loss,
                    self.meta_parameters(),
                    self.copy_buffers(),
                    task.support,
                )
                raise not_twice_differentiable(
                    error, self.objective(), support_loss
                ) from error
        return loss.detach(), adapted.buffers


class FOMAML(MAML):
    """First-order MAML: the query gradient taken at the adapted weights.

    Same keys as :class:`MAML`; ``first_order`` defaults to True.
    """

    default_first_order = True


class Reptile(MetaBrain):
    """Reptile (Nichol et al., 2018).

    Each task's adapted weights ``phi`` (``inner_steps`` SGD steps on the
    support batch) give the pseudo-gradient ``theta - phi``; ``fit_batch``
    averages it over the tasks, so an outer SGD optimizer with learning rate
    ``e`` moves theta by exactly ``e * (theta - mean(phi))``. The query batch
    is not used in training. An adaptive outer optimizer (Adam) is the usual
    "Reptile with Adam" variant.
    """

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Add ``theta - phi`` to the gradients of the meta-parameters."""
        theta = self.meta_parameters()
        start = {name: p.detach().requires_grad_() for name, p in theta.items()}
        adapted = self.inner_loop(
            task.support, self.inner_steps, self.inner_lr, parameters=start
        )
        if adapted is None:
            return None
        with torch.no_grad():
            for name, p in theta.items():
                step = p - adapted.parameters[name]
                p.grad = step if p.grad is None else p.grad + step
        return adapted.loss, adapted.buffers


class MultiTask(MetaBrain):
    """Conventional multilingual training on the same episodes (baseline).

    Each task's support and query batches are ordinary training batches of
    the shared model: the gradient is that of their losses at theta, the
    buffers are updated in place as in plain training. Validation adapts
    exactly as the meta-learners do, so the numbers are comparable.
    """

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Back-propagate the support and query losses at theta."""
        theta = self.meta_parameters()
        losses = []
        for batch in (task.support, task.query):
            loss = self.task_loss(theta, {}, batch)
            if not torch.isfinite(loss):
                self.check_loss_isfinite(loss)
                return None
            losses.append(loss)
        torch.stack(losses).mean().backward()
        return torch.stack(losses).mean().detach(), {}

"""Meta-learning algorithms, one small Brain class each.

Each class only says how one task of an episode contributes to the gradient
of the meta-parameters; :class:`speechbrain_meta.brain.MetaBrain` does the
rest. With support set S, query set Q, inner learning rate ``a`` and ``k``
inner steps, ``phi = theta - a * sum_i grad L_S(phi_i)``:

* :class:`MAML`: ``d L_Q(phi) / d theta`` through every inner step.
* :class:`FOMAML`: ``grad L_Q(phi)`` taken at ``phi`` (first order).
* :class:`Reptile`: the pseudo-gradient ``theta - phi``; with SGD of learning
  rate ``e`` as outer optimizer and no clipping, theta moves ``e`` of the way
  towards the mean adapted weights.
* :class:`MultiTask`: no adaptation, ``grad (L_S(theta) + L_Q(theta)) / 2``:
  ordinary joint training on the same episodes, the usual baseline.

The training loss each reports (and the recipe logs under
``train_loss_name``) differs: MAML and FOMAML the query loss after
adaptation (``query_loss``), Reptile the support loss of the last inner step
(``support_loss``), MultiTask the mean of the support and query losses at
theta (``episode_loss``).
"""

import logging
from contextlib import nullcontext
from functools import partial
from typing import List, Optional, Tuple

import torch

from speechbrain_meta.brain import MetaBrain, Tensors
from speechbrain_meta.diagnostics import (
    is_double_backward_error,
    not_twice_differentiable,
)
from speechbrain_meta.errors import SetupError
from speechbrain_meta.inner_loop import NonFiniteError, second_order_context

__all__ = ["FOMAML", "MAML", "MultiTask", "Reptile"]

logger = logging.getLogger(__name__)


class MAML(MetaBrain):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), second order.

    The meta-gradient is that of the query loss after ``inner_steps`` SGD
    steps on the support loss, differentiated through every inner step. Those
    steps run in :func:`speechbrain_meta.inner_loop.second_order_context`, so
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
    train_loss_name = "query_loss"

    def check_hparams(self) -> None:
        """Also refuse ``first_order: False`` under FOMAML; warn of MAML + True.

        Raises
        ------
        speechbrain_meta.errors.SetupError
            For FOMAML with ``first_order: False``, which would silently run
            second-order MAML.
        """
        super().check_hparams()
        first_order = self._hparam("first_order", None)
        if first_order is None or bool(first_order) == self.default_first_order:
            return
        if self.default_first_order:
            raise SetupError(
                "FOMAML is first-order MAML, but first_order is False: use "
                "brain_class: !name:speechbrain_meta.MAML for second order, or "
                "drop first_order from the YAML."
            )
        logger.warning(
            "first_order: True makes MAML first-order MAML (FOMAML): the "
            "second-order terms are dropped."
        )

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

    def multi_step_weights(self) -> Optional[List[float]]:
        """The weights of the query losses after each inner step, or None.

        MAML++'s multi-step loss (Antoniou et al., 2019), with YAML
        ``msl_steps: N`` > 0: the query loss is taken after every inner step,
        the earlier ones weighing ``(1 - t / N) / k`` at meta-step ``t`` and
        the last one the rest, so that after ``N`` meta-steps only the last
        one counts (as in plain MAML).

        Returns
        -------
        list of float or None
            One weight per inner step, summing to 1; None without ``msl_steps``.

        Example
        -------
        >>> brain = MAML({"lin": torch.nn.Linear(1, 1)},
        ...              hparams={"inner_steps": 4, "msl_steps": 10})
        >>> brain.multi_step_weights()
        [0.25, 0.25, 0.25, 0.25]
        >>> brain.optimizer_step = 5
        >>> brain.multi_step_weights()
        [0.125, 0.125, 0.125, 0.625]
        """
        total = int(self._hparam("msl_steps", 0))
        if total <= 0:
            return None
        k = self.inner_steps
        earlier = max(0.0, 1 - self.optimizer_step / total) / k
        return [earlier] * (k - 1) + [1 - earlier * (k - 1)]

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Back-propagate the query loss after adaptation to theta.

        With ``msl_steps``, the weighted query losses after every inner step
        (:meth:`multi_step_weights`).

        Raises
        ------
        RuntimeError
            In second order, if an operation has no double backward: the
            error names the module that uses it and suggests ``first_order``.
        """
        context = nullcontext() if self.first_order else second_order_context()
        with context:
            try:
                weights = self.multi_step_weights()
                # Without the support loss (Reptile's report): its scalar
                # would otherwise live on through the query pass, the peak.
                adapted = self.inner_loop(
                    task.support,
                    self.inner_steps,
                    self.inner_rate,
                    create_graph=not self.first_order,
                    keep_trajectory=weights is not None,
                )._replace(loss=None)
                body = self.body_pass(task.query, adapted.buffers)
                if weights is None:
                    loss = self.task_loss(
                        adapted.parameters, adapted.buffers, task.query, body=body
                    )
                else:
                    loss = sum(
                        weight
                        * self.task_loss(phi, adapted.buffers, task.query, body=body)
                        for weight, phi in zip(weights, adapted.trajectory)
                        if weight > 0
                    )
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"query loss {loss.item()}")
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
    ``e`` moves theta by exactly ``e * (theta - mean(phi))`` when nothing
    clips it: SpeechBrain's ``max_grad_norm`` (5 by default) shortens a mean
    displacement longer than that, so pass ``--max_grad_norm inf`` for the
    exact rule. The query batch is not used in training. An adaptive outer
    optimizer (Adam) is the usual "Reptile with Adam" variant.
    """

    train_loss_name = "support_loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        outside = [n for n in self.meta_parameters() if n not in self.fast_weight_names]
        if outside:
            logger.warning(
                f"Reptile moves only the fast weights (inner_params): "
                f"{len(outside)} other learnt parameters ({outside[0]}, ...) stay "
                "as they are; freeze them with meta_params or use MAML."
            )

    def check_hparams(self) -> None:
        """Also refuse learnt inner rates, which the pseudo-gradient ignores.

        Raises
        ------
        speechbrain_meta.errors.SetupError
            With ``learn_inner_lr``.
        """
        super().check_hparams()
        _refuse_learnt_rates(self, "Reptile's pseudo-gradient theta - phi")

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Add ``theta - phi`` to the gradients of the fast weights' theta.

        Parameters outside ``inner_params`` get no pseudo-gradient: they stay
        as they are.
        """
        theta = self.meta_parameters()
        start = {
            name: theta[name].detach().requires_grad_()
            for name in self.fast_weight_names
        }
        adapted = self.inner_loop(
            task.support, self.inner_steps, self.inner_lr, parameters=start
        )
        with torch.no_grad():
            for name in start:
                p = theta[name]
                if adapted.parameters[name] is start[name]:
                    continue  # no inner gradient reached it: no pseudo-gradient
                step = p - adapted.parameters[name]
                p.grad = step if p.grad is None else p.grad + step
        return adapted.loss, adapted.buffers


class MultiTask(MetaBrain):
    """Conventional multilingual training on the same episodes (baseline).

    Each task's support and query batches are ordinary training batches of
    the shared model: the gradient is that of the mean of their two losses at
    theta. The buffers (normalisation statistics) are updated on copies, as
    the meta-learners' are, and averaged over the episode's tasks, so that a
    skipped task leaves no trace. Validation adapts exactly as the
    meta-learners do, so the numbers are comparable.
    """

    train_loss_name = "episode_loss"

    def check_hparams(self) -> None:
        """Also refuse learnt inner rates: multitask training has no inner loop.

        Raises
        ------
        speechbrain_meta.errors.SetupError
            With ``learn_inner_lr``.
        """
        super().check_hparams()
        _refuse_learnt_rates(self, "multitask training, which has no inner loop")

    def task_step(self, task) -> Optional[Tuple[torch.Tensor, Tensors]]:
        """Back-propagate the mean of the support and query losses at theta."""
        theta, buffers = self.meta_parameters(), self.copy_buffers()
        losses = []
        for name, batch in (("support", task.support), ("query", task.query)):
            loss = self.task_loss(theta, buffers, batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"{name} loss {loss.item()}")
            losses.append(loss)
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss.detach(), buffers


def _refuse_learnt_rates(brain: MetaBrain, why: str) -> None:
    if brain._hparam("learn_inner_lr", None) is not None:
        raise SetupError(
            f"learn_inner_lr needs MAML or FOMAML: {why} does not depend on the "
            "inner rates, so they would not be learnt. Remove learn_inner_lr."
        )

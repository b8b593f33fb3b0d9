"""Running an unchanged SpeechBrain recipe on fast weights.

A meta-learning inner loop evaluates the recipe's own ``compute_forward`` and
``compute_objectives`` with parameters that are not the modules' own (the
*fast weights*). :class:`BrainObjective` turns a Brain into an ``nn.Module``
whose forward is exactly those two methods, so that
:func:`torch.func.functional_call` can swap the parameters of every module in
``brain.modules`` for the duration of one call.

Two contexts make that safe:

* :func:`fast_weight_context` stops recurrent layers from re-flattening their
  weights into cuDNN's single buffer, an in-place operation that would cut the
  fast weights off from the autograd graph.
* :func:`second_order_context` makes every operation twice differentiable:
  CTC through :func:`speechbrain_meta.ctc.twice_differentiable_ctc`, RNNs with
  cuDNN disabled, and attention on the math backend of
  ``scaled_dot_product_attention``.
"""

from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from speechbrain_meta.ctc import twice_differentiable_ctc

__all__ = [
    "BrainObjective",
    "fast_weight_context",
    "second_order_context",
]

_original_flatten_parameters = torch.nn.RNNBase.flatten_parameters


def _flatten_leaf_parameters(rnn: torch.nn.RNNBase) -> None:
    """Flatten an RNN's weights only when they are its own leaf parameters."""
    if all(w.grad_fn is None for w in rnn._flat_weights if w is not None):
        _original_flatten_parameters(rnn)


@contextmanager
def fast_weight_context() -> Iterator[None]:
    """Keep ``RNNBase.flatten_parameters`` away from fast weights.

    Inside the context, ``flatten_parameters`` does nothing on an RNN whose
    weights carry autograd history (fast weights) and behaves as usual on an
    RNN holding its own parameters.

    Example
    -------
    >>> gru = torch.nn.GRU(3, 4)
    >>> fast = {n: p * 1.0 for n, p in gru.named_parameters()}
    >>> with fast_weight_context():
    ...     out, _ = functional_call(gru, fast, (torch.randn(5, 1, 3),))
    >>> out.shape
    torch.Size([5, 1, 4])
    """
    torch.nn.RNNBase.flatten_parameters = _flatten_leaf_parameters
    try:
        yield
    finally:
        torch.nn.RNNBase.flatten_parameters = _original_flatten_parameters


@contextmanager
def second_order_context() -> Iterator[None]:
    """Make the computations inside twice differentiable, on CPU and GPU.

    CTC losses use :func:`speechbrain_meta.ctc.ctc_loss_differentiable`,
    cuDNN is disabled (its RNN kernels have no double backward) and
    ``scaled_dot_product_attention`` runs on its math backend (the fused
    kernels have no double backward either).

    Example
    -------
    >>> x = torch.randn(4, 2, requires_grad=True)
    >>> with second_order_context():
    ...     y = (x.tanh() ** 2).sum()
    ...     (g,) = torch.autograd.grad(y, x, create_graph=True)
    ...     (h,) = torch.autograd.grad(g.sum(), x)
    >>> h.shape
    torch.Size([4, 2])
    """
    with ExitStack() as stack:
        stack.enter_context(twice_differentiable_ctc())
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


class BrainObjective(torch.nn.Module):
    """A Brain's ``compute_forward`` + ``compute_objectives`` as a module.

    Its submodules are those of ``brain.modules``, so its parameter and buffer
    names are the keys of ``brain.modules.state_dict()``.

    Arguments
    ---------
    brain : speechbrain.core.Brain
        The Brain whose recipe methods are called.

    Example
    -------
    >>> import speechbrain as sb
    >>> class Regression(sb.Brain):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.lin(batch[0])
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return ((predictions - batch[1]) ** 2).mean()
    >>> brain = Regression({"lin": torch.nn.Linear(2, 1)})
    >>> objective = BrainObjective(brain)
    >>> zeros = {n: torch.zeros_like(p) for n, p in objective.named_parameters()}
    >>> batch = (torch.ones(3, 2), torch.ones(3, 1))
    >>> objective.call(zeros, batch, sb.Stage.TRAIN)
    tensor(1.)
    """

    def __init__(self, brain):
        super().__init__()
        for name, module in brain.modules.items():
            if hasattr(self, name):
                raise ValueError(
                    f"brain.modules['{name}'] shadows the nn.Module attribute "
                    f"'{name}'; rename that module."
                )
            self.add_module(name, module)
        # A plain attribute, not a submodule: the Brain is no nn.Module.
        self.__dict__["brain"] = brain

    def forward(self, batch, stage) -> torch.Tensor:
        """Run the recipe's forward pass and objectives on ``batch``."""
        predictions = self.brain.compute_forward(batch, stage)
        return self.brain.compute_objectives(predictions, batch, stage)

    def call(self, tensors: Dict[str, torch.Tensor], batch, stage) -> torch.Tensor:
        """Compute the objective with ``tensors`` in place of the modules' own.

        Arguments
        ---------
        tensors : dict
            Parameters and buffers by name (``<module>.<name>``); the
            ones not given keep the modules' own values.
        batch : PaddedBatch
            The batch passed to ``compute_forward``.
        stage : speechbrain.Stage
            The stage passed to the recipe's methods.

        Returns
        -------
        torch.Tensor
            The loss returned by ``compute_objectives``.
        """
        with fast_weight_context():
            return functional_call(self, tensors, (batch, stage), strict=False)

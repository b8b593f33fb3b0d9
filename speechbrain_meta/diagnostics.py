"""Naming the module that second-order MAML cannot differentiate twice.

When an operation has no double backward, autograd fails deep inside the
meta-gradient with a message that names the operation (``derivative for
aten::_cudnn_rnn_backward is not implemented``, ``trying to differentiate
twice a function that was marked with @once_differentiable``), not the layer
of the model that used it. :func:`find_once_differentiable` finds that layer:
it records the inputs of every submodule during one forward pass, then
differentiates each submodule twice on its own (with respect to its
parameters and floating-point inputs), descending from the top-level modules
into the children of the one that fails, and names the innermost one.
:func:`not_twice_differentiable` turns the original error into one that names
it and points to ``first_order: True``.
"""

import re
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.func import functional_call

__all__ = [
    "find_once_differentiable",
    "is_double_backward_error",
    "not_twice_differentiable",
    "twice_differentiable",
]

_DOUBLE_BACKWARD = re.compile(
    r"derivative for .* is not implemented|differentiate twice|double backward",
    re.IGNORECASE,
)

Call = Tuple[tuple, dict]


def is_double_backward_error(error: BaseException) -> bool:
    """Whether ``error`` is autograd failing to differentiate an op twice.

    Arguments
    ---------
    error : BaseException
        The exception raised by a backward pass.

    Returns
    -------
    bool
        True for the errors of operations without a double backward.

    Example
    -------
    >>> is_double_backward_error(
    ...     RuntimeError("derivative for aten::_ctc_loss_backward is not implemented")
    ... )
    True
    >>> is_double_backward_error(RuntimeError("shape mismatch"))
    False
    """
    return isinstance(error, RuntimeError) and bool(_DOUBLE_BACKWARD.search(str(error)))


def _detached(value):
    """``value`` with its floating-point tensors detached, requiring grad."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.requires_grad_() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _tensors(value) -> List[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@contextmanager
def _recorded_calls(root: torch.nn.Module) -> Iterator[Dict[str, Call]]:
    """Record the (detached) inputs of the first call of every submodule."""
    calls: Dict[str, Call] = {}

    def recorder(name):
        def hook(module, args, kwargs):
            calls.setdefault(name, (_detached(args), _detached(kwargs)))

        return hook

    handles = [
        module.register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name, module in root.named_modules()
        if name
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def twice_differentiable(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``module`` called on these inputs can be differentiated twice.

    The module runs on copies of its trainable parameters; its output is
    differentiated with respect to them and to the floating-point inputs,
    with output gradients that themselves require grad (as in a
    meta-gradient), and the result is back-propagated once more through the
    whole graph (as ``loss.backward()`` does). Only errors of missing double
    backward count; other failures of the isolated call (e.g. a module that
    needs state set by its caller) are not held against the module.

    Arguments
    ---------
    module : torch.nn.Module
        The module to probe; its parameters and their ``.grad`` are left as
        they are.
    args : tuple
        Positional inputs (tensors that require grad where floating point).
    kwargs : dict
        Keyword inputs, likewise.

    Returns
    -------
    bool
        False if the second differentiation fails for lack of a double
        backward.

    Example
    -------
    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> twice_differentiable(torch.nn.Linear(3, 2), (x,), {})
    True
    """
    parameters = {
        name: p.detach().requires_grad_()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    sources = list(parameters.values())
    sources += [t for t in _tensors((args, kwargs)) if t.requires_grad]
    try:
        with torch.enable_grad():
            outputs = functional_call(module, parameters, args, kwargs)
            outputs = [t for t in _tensors(outputs) if t.requires_grad]
            if not outputs or not sources:
                return True
            seeds = [torch.ones_like(t, requires_grad=True) for t in outputs]
            grads = torch.autograd.grad(
                outputs, sources, seeds, create_graph=True, allow_unused=True
            )
            grads = [g for g in grads if g is not None and g.requires_grad]
            if grads:
                sum(g.sum() for g in grads).backward()
    except RuntimeError as error:
        return not is_double_backward_error(error)
    return True


def find_once_differentiable(
    root: torch.nn.Module, forward: Callable[[], object]
) -> Optional[str]:
    """The innermost submodule of ``root`` that cannot be differentiated twice.

    Arguments
    ---------
    root : torch.nn.Module
        The model (e.g. a :class:`~speechbrain_meta.inner_loop.BrainObjective`).
    forward : callable
        Runs one forward pass through ``root``'s submodules (its result is
        ignored); their inputs are recorded there.

    Returns
    -------
    str or None
        The dotted name of the module within ``root`` (e.g. ``encoder.rnn``),
        or None if every module that ran can be differentiated twice (the
        culprit is then an operation outside them, such as a loss).

    Example
    -------
    >>> from torch.autograd.function import once_differentiable
    >>> class Square(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return x**2
    ...
    ...     @staticmethod
    ...     @once_differentiable
    ...     def backward(ctx, grad):
    ...         (x,) = ctx.saved_tensors
    ...         return 2 * x * grad
    >>> class SquareLayer(torch.nn.Module):
    ...     def forward(self, x):
    ...         return Square.apply(x)
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Linear(3, 3),
    ...     torch.nn.Sequential(torch.nn.Linear(3, 3), SquareLayer()),
    ... )
    >>> find_once_differentiable(net, lambda: net(torch.randn(2, 3)))
    '1.1'
    """
    with _recorded_calls(root) as calls, torch.enable_grad():
        forward()

    def culprit(prefix: str, module: torch.nn.Module) -> Optional[str]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full in calls and not twice_differentiable(child, *calls[full]):
                return culprit(full, child) or full
        return None

    return culprit("", root)


def not_twice_differentiable(
    error: RuntimeError, root: torch.nn.Module, forward: Callable[[], object]
) -> RuntimeError:
    """An error naming the module behind a failed second-order step.

    Arguments
    ---------
    error : RuntimeError
        The double backward error (see :func:`is_double_backward_error`).
    root : torch.nn.Module
        The model whose submodules are searched.
    forward : callable
        Runs one forward pass through ``root`` (as in
        :func:`find_once_differentiable`).

    Returns
    -------
    RuntimeError
        The error to raise (from ``error``).

    Example
    -------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> error = RuntimeError("derivative for aten::foo is not implemented")
    >>> print(not_twice_differentiable(error, net, lambda: net(torch.ones(2))))
    Second-order MAML cannot differentiate the loss twice: derivative for \
aten::foo is not implemented. Every module can be differentiated twice, so \
the operation is outside them (e.g. in compute_objectives). Make it twice \
differentiable, or set `first_order: True` in the YAML (first-order MAML).
    """
    name = find_once_differentiable(root, forward)
    if name is None:
        where = (
            "Every module can be differentiated twice, so the operation is "
            "outside them (e.g. in compute_objectives)."
        )
    else:
        kind = type(root.get_submodule(name)).__name__
        where = f"The operation is in module '{name}' ({kind})."
    return RuntimeError(
        f"Second-order MAML cannot differentiate the loss twice: {error}. "
        f"{where} Make it twice differentiable, or set `first_order: True` in "
        "the YAML (first-order MAML)."
    )

"""The inner loop: fast weights, SGD steps and the second-order context.

A meta-learning inner loop adapts *fast weights* (copies of the
meta-parameters that keep their autograd history) to a task's support batch,
evaluating the recipe's own ``compute_forward`` and ``compute_objectives``
with them. Everything it takes is here:

* :class:`BrainObjective` turns a Brain into an ``nn.Module`` whose forward
  is exactly those two methods, so that :func:`torch.func.functional_call`
  swaps the parameters (and buffers) of every module of ``brain.modules`` for
  one call; the modules' own tensors are never touched.
* :func:`sgd_steps` takes the SGD steps on the fast weights (differentiable
  themselves with ``create_graph``, for second-order MAML) and stops with
  :class:`NonFiniteError` at a non-finite loss or gradient; it returns
  :class:`AdaptedWeights`. With ``checkpoint_steps`` the second-order steps
  keep no activations and are recomputed in the backward pass.
  :meth:`speechbrain_meta.MetaBrain.inner_loop` is this on the Brain's recipe.
* :func:`fast_weight_context` stops recurrent layers from re-flattening their
  weights into cuDNN's single buffer, an in-place operation that would cut
  the fast weights off from the autograd graph (:meth:`BrainObjective.call`
  enters it).
* :func:`second_order_context` makes every operation twice differentiable:
  CTC through :func:`speechbrain_meta.ctc.twice_differentiable_ctc`, the
  forward of recurrent layers without cuDNN, attention on the math backend
  of ``scaled_dot_product_attention``, and weight normalisation
  (``torch._weight_norm``, e.g. wav2vec2's positional convolution) with
  differentiable operations instead of the fused kernel, whose double
  backward is wrong. Everything else, convolutions and normalisation
  included, keeps its cuDNN kernels, which have a double backward.

Both contexts touch only the thread that enters them
(:mod:`speechbrain_meta.patching`): while a thread is inside,
``RNNBase.flatten_parameters``, the ``forward`` of ``torch.nn.RNN``,
``LSTM`` and ``GRU`` (which SpeechBrain's RNN wrappers call) and
``torch.nn.functional.scaled_dot_product_attention`` are dispatchers that
behave as the originals in the other threads; the originals are back, by
identity, when the last thread has left. Both contexts are re-entrant. What
autograd runs in threads of its own is outside them, though: forwards that
activation checkpointing recomputes during a GPU backward, say.

cuDNN and the attention backends are enabled by process-wide flags, though.
They are switched only for the duration of one recurrent forward or one
attention call of a thread inside the context, held by a count across threads
so that they come back as they were however the threads interleave; but
another thread that starts a cuDNN operation (a convolution, say) or an
attention call during such a window gets the non-cuDNN kernel or the math
backend: the same results up to rounding, more slowly. (On CPU, there are no
cuDNN kernels for the flag to select; the attention flags do apply.)

Example
-------
>>> theta = {"x": torch.tensor([0.0], requires_grad=True)}
>>> def support_loss(weights, buffers):
...     return ((weights["x"] - 3.0) ** 2).sum()
>>> adapted = sgd_steps(support_loss, theta, {}, steps=2, lr=0.25, create_graph=True)
>>> adapted.parameters["x"]  # 0 -> 1.5 -> 2.25, a function of theta
tensor([2.2500], grad_fn=<AddBackward0>)
>>> torch.autograd.grad(adapted.parameters["x"].sum(), theta["x"])  # (1 - 0.5) ** 2
(tensor([0.2500]),)
"""

import sys
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from speechbrain_meta.ctc import twice_differentiable_ctc
from speechbrain_meta.patching import SharedSetting, ThreadLocalPatch

__all__ = [
    "AdaptedWeights",
    "BrainObjective",
    "NonFiniteError",
    "Rate",
    "all_finite",
    "fast_weight_context",
    "once_differentiable_context",
    "second_order_context",
    "sgd_steps",
]

Tensors = Dict[str, torch.Tensor]


@contextmanager
def _cudnn_disabled() -> Iterator[None]:
    """Disable cuDNN, and only that: its other flags stay as they are."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


_no_cudnn = SharedSetting(_cudnn_disabled)
_math_attention = SharedSetting(lambda: sdpa_kernel(SDPBackend.MATH))


def _within(setting: SharedSetting) -> Callable[[Callable], Callable]:
    """The replacement that calls a function with ``setting`` held."""

    def replacement(function: Callable) -> Callable:
        def call(*args, **kwargs):
            with setting:
                return function(*args, **kwargs)

        return call

    return replacement


def _leaf_weights_only(flatten_parameters: Callable) -> Callable:
    """``flatten_parameters`` that leaves RNNs with fast weights alone."""

    def flatten_leaf_parameters(rnn: torch.nn.RNNBase) -> None:
        if all(w.grad_fn is None for w in rnn._flat_weights if w is not None):
            flatten_parameters(rnn)

    return flatten_leaf_parameters


_fast_weights = ThreadLocalPatch(
    [(torch.nn.RNNBase, "flatten_parameters")], _leaf_weights_only
)
_rnn_without_cudnn = ThreadLocalPatch(
    [(rnn, "forward") for rnn in (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)],
    _within(_no_cudnn),
)
_attention_on_math = ThreadLocalPatch(
    [(torch.nn.functional, "scaled_dot_product_attention")],
    _within(_math_attention),
)


def _composite_weight_norm(fused: Callable) -> Callable:
    """Weight normalisation as ``v * (g / ||v||)``, in place of ``fused``.

    PyTorch's fused ``torch._weight_norm`` has a wrong double backward (its
    second derivatives fail ``gradgradcheck``, torch 2.11, CPU); the same
    formula written with differentiable operations has the right one.
    """

    def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return v * (g / torch.norm_except_dim(v, 2, dim))

    return weight_norm


# Both spellings of weight normalisation call torch._weight_norm: the
# parametrization (torch.nn.utils.parametrizations.weight_norm, e.g. the
# positional convolution of transformers' wav2vec2) by attribute, the older
# hook (torch.nn.utils.weight_norm) through its module's own import of it.
_twice_differentiable_weight_norm = ThreadLocalPatch(
    [
        (torch, "_weight_norm"),
        (sys.modules["torch.nn.utils.weight_norm"], "_weight_norm"),
    ],
    _composite_weight_norm,
)


# The kernels second_order_context replaces by twice-differentiable ones
# (CTC aside), and once_differentiable_context gives back.
_KERNEL_PATCHES = (
    _rnn_without_cudnn,
    _attention_on_math,
    _twice_differentiable_weight_norm,
)


@contextmanager
def fast_weight_context() -> Iterator[None]:
    """Keep ``RNNBase.flatten_parameters`` away from fast weights.

    Inside the context, ``flatten_parameters`` called from this thread does
    nothing on an RNN whose weights carry autograd history (fast weights) and
    behaves as usual on an RNN holding its own parameters. Other threads are
    not affected; the context is re-entrant.

    Example
    -------
    >>> gru = torch.nn.GRU(3, 4)
    >>> fast = {n: p * 1.0 for n, p in gru.named_parameters()}
    >>> with fast_weight_context():
    ...     out, _ = functional_call(gru, fast, (torch.randn(5, 1, 3),))
    >>> out.shape
    torch.Size([5, 1, 4])
    """
    with _fast_weights:
        yield


@contextmanager
def second_order_context() -> Iterator[None]:
    """Make the computations of this thread twice differentiable, on any device.

    Inside the context, in the calling thread only: CTC losses use
    :func:`speechbrain_meta.ctc.ctc_loss_differentiable`, the forward of
    ``torch.nn.RNN``, ``LSTM`` and ``GRU`` runs without cuDNN (whose RNN
    kernels have no double backward; their backward then follows the
    non-cuDNN forward), ``scaled_dot_product_attention`` runs on its math
    backend (the fused kernels have no double backward either) and weight
    normalisation (``torch._weight_norm``, whose fused double backward is
    wrong) is computed as ``v * (g / ||v||)``. Convolutions and everything
    else keep cuDNN. Fast weights need
    :func:`fast_weight_context` as well (:meth:`BrainObjective.call` enters
    it). The context is re-entrant; see the module's description for the
    process-wide flags that it switches during recurrent and attention
    calls.

    Example
    -------
    >>> gru = torch.nn.GRU(2, 3)
    >>> x = torch.randn(4, 1, 2, requires_grad=True)
    >>> with second_order_context():
    ...     y = gru(x)[0].tanh().pow(2).sum()
    ...     (g,) = torch.autograd.grad(y, x, create_graph=True)
    ...     (h,) = torch.autograd.grad(g.sum(), x)
    >>> h.shape
    torch.Size([4, 1, 2])
    """
    with twice_differentiable_ctc(), ExitStack() as stack:
        for patch in _KERNEL_PATCHES:
            stack.enter_context(patch)
        yield


@contextmanager
def once_differentiable_context() -> Iterator[None]:
    """Native kernels again, inside :func:`second_order_context`.

    For a pass whose graph the meta-gradient differentiates only once, such
    as the body pass that ANIL's inner steps share (their gradients reach
    the head's weights, not the body): in the calling thread, RNNs may use
    cuDNN, ``scaled_dot_product_attention`` its fused kernels (the math
    backend keeps every attention map for the backward pass) and weight
    normalisation its fused function, as outside the context. CTC losses
    stay twice differentiable. Re-entrant; leaving it restores
    :func:`second_order_context`.

    Example
    -------
    >>> from torch.nn import functional
    >>> q = torch.randn(1, 2, 5, 4, requires_grad=True)
    >>> with second_order_context():
    ...     with once_differentiable_context():
    ...         once = functional.scaled_dot_product_attention(q, q, q)
    ...     twice = functional.scaled_dot_product_attention(q, q, q)
    >>> once.grad_fn.name() == twice.grad_fn.name()
    False
    """
    with ExitStack() as stack:
        for patch in _KERNEL_PATCHES:
            stack.enter_context(patch.suspended())
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

    def forward(self, batch, stage, body=None, body_only: bool = False):
        """Run the recipe's forward pass and objectives on ``batch``.

        With ``body`` (states returned by the Brain's ``compute_body``), only
        its ``compute_head`` runs before the objectives; with ``body_only``,
        ``compute_body``'s states are returned instead of the loss.
        """
        brain = self.brain
        if body_only:
            return brain.compute_body(batch, stage)
        if body is None:
            predictions = brain.compute_forward(batch, stage)
        else:
            predictions = brain.compute_head(body, batch, stage)
        return brain.compute_objectives(predictions, batch, stage)

    def call(
        self, tensors: Dict[str, torch.Tensor], batch, stage, body=None
    ) -> torch.Tensor:
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
        body : tuple, optional
            The states of :meth:`call_body` on ``batch``: only the head runs.

        Returns
        -------
        torch.Tensor
            The loss returned by ``compute_objectives``.
        """
        with fast_weight_context():
            return functional_call(
                self, tensors, (batch, stage), {"body": body}, strict=False
            )

    def call_body(self, tensors: Dict[str, torch.Tensor], batch, stage) -> tuple:
        """``compute_body``'s states on ``batch``, ``tensors`` as in :meth:`call`."""
        with fast_weight_context():
            return functional_call(
                self, tensors, (batch, stage), {"body_only": True}, strict=False
            )


class NonFiniteError(ArithmeticError):
    """A loss or gradient of one task is NaN or infinite: skip that task.

    Raised by :func:`sgd_steps` and the algorithms' ``task_step``;
    :meth:`~speechbrain_meta.MetaBrain.fit_batch` and
    :meth:`~speechbrain_meta.MetaBrain.evaluate_batch` leave the task out and
    count it. The message says which value it was.
    """


class AdaptedWeights(NamedTuple):
    """The result of an inner loop on one batch.

    Attributes
    ----------
    parameters : dict
        The fast weights by name, with autograd history back to the
        meta-parameters.
    buffers : dict
        Copies of the modules' buffers as the inner loop left them.
    loss : torch.Tensor or None
        The support loss of the last inner step (None where a caller that
        does not need it dropped it, so that it is freed).
    trajectory : tuple of dict
        With ``keep_trajectory``, the fast weights after each step (the last
        is ``parameters``), for a loss after every step (MAML++'s multi-step
        loss).
    """

    parameters: Tensors
    buffers: Tensors
    loss: Optional[torch.Tensor]
    trajectory: Tuple[Tensors, ...] = ()


def all_finite(tensors) -> bool:
    """Whether every tensor of ``tensors`` (None entries ignored) is finite.

    One sum per tensor, accumulated in at least float32: a NaN or an
    infinity anywhere makes it non-finite, as does a sum beyond float32's
    range (above 3e38, only entries of a diverged step reach it). A tenth of
    the time of ``isfinite`` on every entry, which writes a mask as large as
    the tensor; it runs on every inner step's gradient.

    Example
    -------
    >>> all_finite([torch.ones(3), None, torch.tensor([1.0, float("inf")])])
    False
    >>> all_finite([torch.tensor([float("nan"), 0.0])])
    False
    >>> all_finite([torch.full((4,), 6e4, dtype=torch.float16)])
    True
    """
    sums = [
        t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32))
        for t in tensors
        if t is not None
    ]
    return bool(torch.stack(sums).isfinite().all()) if sums else True


Rate = Union[float, Callable[[str, int], Union[float, torch.Tensor]]]


def _sgd_step(
    loss: Callable[[Tensors, Tensors], torch.Tensor],
    weights: Tensors,
    buffers: Tensors,
    rate: Callable[[str, int], Union[float, torch.Tensor]],
    step: int,
    create_graph: bool,
) -> Tuple[torch.Tensor, Tensors]:
    """One SGD step: the loss at ``weights`` and the weights after the step."""
    value = loss(weights, buffers)
    if not torch.isfinite(value):
        raise NonFiniteError(f"support loss {value.item()} at inner step {step + 1}")
    grads = torch.autograd.grad(
        value, list(weights.values()), create_graph=create_graph, allow_unused=True
    )
    if not all_finite(grads):
        raise NonFiniteError(f"support gradient at inner step {step + 1}")
    return value, {
        name: w if g is None else _descend(w, g, rate(name, step))
        for (name, w), g in zip(weights.items(), grads)
    }


def _descend(weight: torch.Tensor, grad: torch.Tensor, rate) -> torch.Tensor:
    """``weight - rate * grad``, with one new tensor when ``rate`` is a number.

    The product is computed and the weight added to it in place: the same
    bits as ``weight - rate * grad`` (``-(rate * grad)`` is exact), half the
    time on a CPU (one tensor allocated, not two). A learnt rate (a tensor)
    is multiplied as written, so that the graph reaches it.
    """
    if isinstance(rate, torch.Tensor):
        return weight - rate * grad
    return (grad * -rate).add_(weight)


def _checkpointed_sgd_step(
    loss: Callable[[Tensors, Tensors], torch.Tensor],
    weights: Tensors,
    buffers: Tensors,
    rate: Callable[[str, int], Union[float, torch.Tensor]],
    step: int,
) -> Tuple[torch.Tensor, Tensors, Tensors]:
    """:func:`_sgd_step` with its activations recomputed in the backward pass.

    ``torch.utils.checkpoint`` (non-reentrant) over the step, the fast
    weights its inputs: the step's graph (its forward and its differentiable
    backward) is freed once the step is taken and rebuilt when the backward
    pass of a later loss reaches it, with the random state of the first run
    (``preserve_rng_state``), so dropout draws the same masks. The loss runs
    on clones of ``buffers`` both times, so that statistics it updates in
    place are updated once; the updated clones are returned.
    """
    names, buffer_names = list(weights), list(buffers)

    def run(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        fresh = {name: b.clone() for name, b in buffers.items()}
        value, new = _sgd_step(
            loss, dict(zip(names, tensors)), fresh, rate, step, create_graph=True
        )
        return (value, *new.values(), *fresh.values())

    value, *outputs = checkpoint(
        run, *weights.values(), use_reentrant=False, preserve_rng_state=True
    )
    new_weights = dict(zip(names, outputs[: len(names)]))
    return value, new_weights, dict(zip(buffer_names, outputs[len(names) :]))


def recomputed_pass(
    function: Callable[[Tensors], Union[torch.Tensor, Tuple[torch.Tensor, ...]]],
    buffers: Tensors,
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], Tensors]:
    """``function(buffers)`` with its activations recomputed in the backward pass.

    As :func:`_checkpointed_sgd_step` does for a step: ``torch.utils.checkpoint``
    (non-reentrant, the random state replayed), ``function`` run on clones of
    ``buffers`` both times. For a pass that a later loss differentiates
    through but that need not keep its activations until then (the support
    batch's body pass of a second-order ANIL step).

    Arguments
    ---------
    function : callable
        ``function(buffers)``: a tensor or a tuple of tensors; may update
        ``buffers``.
    buffers : dict
        Buffers by name (left as they are).

    Returns
    -------
    tuple
        ``function``'s output, and the buffers it updated (clones).

    Example
    -------
    >>> w = torch.tensor(2.0, requires_grad=True)
    >>> y, _ = recomputed_pass(lambda buffers: torch.sin(w) * w, {})
    >>> torch.autograd.grad(y, w)[0].item() == (torch.cos(w) * w + torch.sin(w)).item()
    True
    """
    originals = dict(buffers)
    single = []

    def run() -> Tuple[torch.Tensor, ...]:
        fresh = {name: b.clone() for name, b in originals.items()}
        outputs = function(fresh)
        single[:] = [isinstance(outputs, torch.Tensor)]
        return (*((outputs,) if single[0] else outputs), *fresh.values())

    outputs = checkpoint(run, use_reentrant=False, preserve_rng_state=True)
    count = len(outputs) - len(originals)
    states = outputs[0] if single[0] else tuple(outputs[:count])
    return states, dict(zip(originals, outputs[count:]))


def sgd_steps(
    loss: Callable[[Tensors, Tensors], torch.Tensor],
    parameters: Tensors,
    buffers: Tensors,
    steps: int,
    lr: Rate,
    create_graph: bool = False,
    keep_trajectory: bool = False,
    checkpoint_steps: bool = False,
) -> AdaptedWeights:
    """Take ``steps`` SGD steps of ``loss`` on fast weights.

    The fast weights start from ``parameters`` and keep their autograd
    history: with ``create_graph`` the gradient of a later loss reaches
    ``parameters`` through every step (second order); without it, through
    the identity only (first order). A learnt rate (a tensor) is part of the
    graph either way, so a later loss also has a gradient with respect to it.
    A weight that gets no gradient stays the same tensor.

    Arguments
    ---------
    loss : callable
        ``loss(weights, buffers)``: the support loss with these weights and
        buffers (e.g. :meth:`BrainObjective.call` on the support batch); it
        may update ``buffers`` in place (normalisation statistics).
    parameters : dict
        Where the fast weights start, by name.
    buffers : dict
        Buffers by name, passed to every step.
    steps : int
        Number of steps.
    lr : float or callable
        The learning rate, or ``lr(name, step)`` (0-based step): a rate per
        weight and step, e.g. :meth:`speechbrain_meta.inner_rates.InnerRates.rate`.
    create_graph : bool
        Whether the gradients of the steps are themselves differentiable.
    keep_trajectory : bool
        Whether to return the weights after every step too.
    checkpoint_steps : bool
        With ``create_graph``: keep no activations of the steps, recompute
        each step's in the backward pass of a later loss (gradient
        checkpointing, the same random state): the same derivatives, a peak
        memory that grows by the fast weights per step instead of a whole
        step's graph, for recomputing each step (its forward pass and its
        differentiable backward) once more.
        Without ``create_graph`` it changes nothing.

    Returns
    -------
    AdaptedWeights
        The adapted weights, the buffers and the last step's loss.

    Raises
    ------
    NonFiniteError
        When a loss or its gradient is not finite (the task must be skipped).

    Example
    -------
    >>> theta = {"x": torch.tensor([0.0], requires_grad=True)}
    >>> def support_loss(weights, buffers):
    ...     return ((weights["x"] - 3.0) ** 2).sum()
    >>> adapted = sgd_steps(
    ...     support_loss, theta, {}, 2, 0.25, create_graph=True, checkpoint_steps=True
    ... )
    >>> torch.autograd.grad(adapted.parameters["x"].sum(), theta["x"])
    (tensor([0.2500]),)
    """
    rate = lr if callable(lr) else (lambda name, step: lr)
    weights = parameters
    value = None  # no tensor yet: a placeholder would outlive the first step
    trajectory = []
    for step in range(steps):
        if checkpoint_steps and create_graph:
            value, weights, buffers = _checkpointed_sgd_step(
                loss, weights, buffers, rate, step
            )
        else:
            value, weights = _sgd_step(loss, weights, buffers, rate, step, create_graph)
        if keep_trajectory:
            trajectory.append(weights)
    last_loss = torch.zeros(()) if value is None else value.detach()
    return AdaptedWeights(weights, buffers, last_loss, tuple(trajectory))

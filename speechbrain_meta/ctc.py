"""A CTC loss that autograd can differentiate twice.

``torch.nn.functional.ctc_loss`` has no double backward: second-order MAML
through it fails with "derivative for aten::_ctc_loss_backward is not
implemented". :func:`ctc_loss_differentiable` has the same interface and
semantics, and exact first and second derivatives:

* the forward pass runs the log-space CTC forward recursion, vectorised over
  the batch and the ``2 S + 1`` blank-interleaved label positions, with a
  Python loop over time only; the backward recursion (beta) runs in the same
  loop, as more rows, on the time- and label-reversed problem;
* the backward pass reads the state posteriors ``exp(alpha + beta - emission
  - log_likelihood)`` off the saved alphas and betas, without any recursion,
  normalised frame by frame, so that the float32 roundings of alphas in the
  thousands (long inputs: 1e-4 and more) cancel out rather than reach the
  gradient through ``log_likelihood``, as they reach the native one;
* with ``create_graph=True``, that gradient is itself a differentiable
  function, whose backward (the Hessian-vector product) runs two linear
  recursions with the posterior transition weights, again in one loop; the
  weights are normalised over each state's predecessors, for the same reason.

Each step is a few in-place kernels on buffers, without an autograd node per
time step: an autograd graph through the recursion costs several times more
in Python overhead (:mod:`speechbrain_meta.ctc_tensors`). On CPU tensors
the same three computations (the log-likelihood, its gradient, the
Hessian-vector product) are each one call of a C kernel instead
(:mod:`speechbrain_meta.ctc_kernel`: sample by sample, the beta recursion
run directly), where it can be built; both are tested against each other.
The derivatives are those of the log-likelihood with respect to
``log_probs`` (tested against autograd on a textbook
implementation, and with ``gradcheck`` and ``gradgradcheck``); a third
derivative raises an error.

:func:`ctc_loss` is ``speechbrain.nnet.losses.ctc_loss`` on top of it, for a
recipe to choose in its YAML (``ctc_cost: !name:speechbrain_meta.ctc.ctc_loss``):
twice differentiable everywhere, without any patch.
:func:`twice_differentiable_ctc` instead swaps it in for the native loss
wherever SpeechBrain or PyTorch look it up, for unchanged recipes.

That swap is thread-local: only the thread inside the context computes the
differentiable loss, all others keep the native one. It patches
``torch.nn.functional.ctc_loss`` with a dispatcher only while at least one
thread is inside, and puts the native function back when the last one
leaves, rather than installing a dispatcher for good: outside the contexts,
nothing of PyTorch is changed, identity included
(``torch.nn.functional.ctc_loss is native`` holds for the function found
before, and TorchScript, which cannot compile the dispatcher, scripts
``torch.nn.CTCLoss`` as usual). While some thread is inside, every thread
sees the dispatcher, which calls the native function (the one found when the
first thread entered) outside of the contexts: same results, ``grad_fn`` and
errors, one Python call more.

Example
-------
>>> logits = torch.randn(20, 2, 5, dtype=torch.float64, requires_grad=True)
>>> targets = torch.tensor([[1, 2, 2], [3, 4, 0]])
>>> loss = ctc_loss_differentiable(
...     logits.log_softmax(-1), targets, [20, 15], [3, 2]
... )
>>> native = torch.nn.functional.ctc_loss(
...     logits.log_softmax(-1), targets, [20, 15], [3, 2]
... )
>>> torch.allclose(loss, native)
True
>>> (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
>>> (hvp,) = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), logits)
>>> hvp.shape
torch.Size([20, 2, 5])
"""

import contextlib
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from speechbrain_meta import ctc_kernel
from speechbrain_meta.ctc_tensors import NEG, Targets, TensorLoops
from speechbrain_meta.patching import ThreadLocalPatch

__all__ = ["ctc_loss", "ctc_loss_differentiable", "twice_differentiable_ctc"]
Lengths = Union[torch.Tensor, Sequence[int], int]


def _as_lengths(lengths: Lengths, device: torch.device) -> torch.Tensor:
    """Lengths given as a tensor, a sequence or an int, as a 1-D long tensor."""
    return torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)


def _padded_targets(
    targets: torch.Tensor, target_lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Targets as ``(B, max_length)``, from padded or concatenated form.

    Entries past each target's length are arbitrary (the caller masks them).
    """
    if targets.dim() == 2:
        return targets[:, :max_length]
    if targets.numel() == 0:
        return targets.new_zeros(target_lengths.numel(), max_length)
    offsets = target_lengths.cumsum(0) - target_lengths
    positions = torch.arange(max_length, device=targets.device)
    index = (offsets[:, None] + positions).clamp(max=targets.numel() - 1)
    return targets[index]


def _nan_where(
    values: torch.Tensor, nan_samples: Optional[torch.Tensor]
) -> torch.Tensor:
    """``values`` (batch in dimension 1, or 0 if 1-D) made NaN for ``nan_samples``."""
    if nan_samples is None:
        return values
    mask = nan_samples if values.dim() == 1 else nan_samples[:, None]
    return values.masked_fill_(mask, float("nan"))


class _Gradient(torch.autograd.Function):
    """The gradient of the log-likelihoods with respect to ``log_probs``, as a function.

    Its backward is the Hessian-vector product of the log-likelihood. The
    Hessian with respect to the emissions is the covariance of the state
    indicators under the posterior over paths, so for an incoming gradient
    ``u``: ``H u [t, s] = posterior[t, s] (u[t, s] + E[U_<t | s, t] +
    E[U_>t | s, t] - E[U])``, ``U`` the sum of ``u`` along a path. The two
    conditional expectations are linear recursions with the posterior
    transition weights, forward and backward in time.
    """

    @staticmethod
    def forward(
        ctx,
        log_probs: torch.Tensor,
        grad: torch.Tensor,
        log_likelihood: torch.Tensor,
        nan_samples: Optional[torch.Tensor],
        computation,
        context,
        *saved: torch.Tensor,
    ) -> torch.Tensor:
        gradient, posterior = computation.gradient(
            context, saved, log_probs.shape, log_likelihood, grad, keep_posterior=True
        )
        ctx.save_for_backward(log_probs, grad, posterior, *saved)
        ctx.computation, ctx.context = computation, context
        ctx.nan_samples = nan_samples
        return _nan_where(gradient, nan_samples)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple:
        log_probs, grad, posterior, *saved = ctx.saved_tensors
        with torch.no_grad():
            hvp, expected = ctx.computation.hvp(
                ctx.context, saved, posterior, upstream, grad
            )
        hvp = _nan_where(hvp, ctx.nan_samples)
        expected = _nan_where(expected, ctx.nan_samples)
        if torch.is_grad_enabled():  # create_graph=True: a third order would follow
            hvp, expected = _NoThirdOrder.apply(
                hvp, expected, log_probs, grad, upstream
            )
        return (hvp, expected, None, None, None, None, *[None] * len(saved))


class _NoThirdOrder(torch.autograd.Function):
    """Identity on the Hessian-vector products that refuses to be differentiated.

    Connected to every input of the second-order computation, so that a
    third-order derivative fails loudly instead of silently missing terms.
    """

    @staticmethod
    def forward(
        ctx, hvp: torch.Tensor, expected: torch.Tensor, *inputs: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return hvp.view_as(hvp), expected.view_as(expected)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> None:
        raise RuntimeError(
            "the CTC loss of speechbrain_meta.ctc is twice differentiable: "
            "its third derivative is not implemented"
        )


class _LogLikelihood(torch.autograd.Function):
    """CTC log-likelihood per sample of the log-probabilities ``(T, B, C)``.

    ``computation`` is :class:`TensorLoops` or the C kernel's
    :class:`speechbrain_meta.ctc_kernel.CompiledCTC`. The forward pass
    computes what the backward pass needs; a backward with
    ``create_graph=True`` returns the gradient through :class:`_Gradient`,
    whose own backward is the Hessian-vector product. A NaN inside a sample's
    sequence makes that sample's loss and derivatives NaN, as natively.
    """

    @staticmethod
    def forward(
        ctx, log_probs: torch.Tensor, targets: Targets, computation
    ) -> torch.Tensor:
        log_likelihood, nan_samples, saved, context = computation.forward(
            log_probs, targets
        )
        ctx.save_for_backward(log_probs, log_likelihood, *saved)
        ctx.computation, ctx.context = computation, context
        ctx.nan_samples = nan_samples if bool(nan_samples.any()) else None
        return _nan_where(log_likelihood.clone(), ctx.nan_samples)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        log_probs, log_likelihood, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep it differentiable
            gradient = _Gradient.apply(
                log_probs,
                grad,
                log_likelihood,
                ctx.nan_samples,
                ctx.computation,
                ctx.context,
                *saved,
            )
            return gradient, None, None
        gradient, _ = ctx.computation.gradient(
            ctx.context, saved, log_probs.shape, log_likelihood, grad, False
        )
        return _nan_where(gradient, ctx.nan_samples), None, None


def ctc_loss_differentiable(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> torch.Tensor:
    """Twice-differentiable drop-in for ``torch.nn.functional.ctc_loss``.

    Same arguments, shapes and results as the native loss. Its gradient is the
    true derivative with respect to ``log_probs`` (the native one is the
    gradient with respect to the logits, assuming ``log_softmax``); both agree
    once back-propagated through ``log_softmax``. Half precision inputs are
    computed in float32.

    Arguments
    ---------
    log_probs : torch.Tensor
        Log-probabilities ``(T, B, C)``, or ``(T, C)`` for a single sequence.
    targets : torch.Tensor
        Target labels without blanks, padded ``(B, S)`` (``(S,)`` for a single
        sequence) or concatenated ``(sum(target_lengths),)``.
    input_lengths : torch.Tensor or sequence of int
        Number of frames of each sequence, at most ``T``.
    target_lengths : torch.Tensor or sequence of int
        Number of labels of each target.
    blank : int
        Index of the blank class.
    reduction : str
        ``'none'``: the per-sequence losses ``(B,)``; ``'sum'``: their sum;
        ``'mean'``: each loss divided by its target length (at least 1), then
        averaged over the batch.
    zero_infinity : bool
        Replace infinite losses (inputs too short for their targets) and their
        gradients with zeros. NaN inputs give NaN losses either way.

    Returns
    -------
    torch.Tensor
        The loss: a scalar, or ``(B,)`` with ``reduction='none'``.

    Example
    -------
    >>> log_probs = torch.randn(30, 3, 6, requires_grad=True).log_softmax(-1)
    >>> targets = torch.tensor([[1, 2, 2, 5], [3, 0, 0, 0], [0, 0, 0, 0]])
    >>> loss = ctc_loss_differentiable(
    ...     log_probs, targets, [30, 25, 12], [4, 1, 0], reduction="none"
    ... )
    >>> native = torch.nn.functional.ctc_loss(
    ...     log_probs, targets, [30, 25, 12], [4, 1, 0], reduction="none"
    ... )
    >>> torch.allclose(loss, native, rtol=1e-5)
    True
    >>> ctc_loss_differentiable(log_probs, targets, [30, 25, 2], [4, 1, 3])
    tensor(inf, grad_fn=<MeanBackward0>)
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if log_probs.dim() == 2:
        loss = ctc_loss_differentiable(
            log_probs.unsqueeze(1),
            targets.unsqueeze(0),
            input_lengths,
            target_lengths,
            blank,
            reduction,
            zero_infinity,
        )
        return loss.squeeze(0)
    frames, batch, classes = log_probs.shape
    device = log_probs.device
    input_lengths = _as_lengths(input_lengths, device)
    target_lengths = _as_lengths(target_lengths, device)
    if input_lengths.numel() != batch or target_lengths.numel() != batch:
        raise ValueError("input_lengths and target_lengths need one entry per sample")
    if not 0 <= blank < classes:
        raise ValueError(f"blank index {blank} is out of range for {classes} classes")
    if bool((input_lengths > frames).any()):
        raise ValueError(f"input_lengths must be at most {frames}")
    padded = targets.dim() == 2
    if padded and bool((target_lengths > targets.shape[1]).any()):
        raise ValueError(f"target_lengths must be at most {targets.shape[1]}")
    if not padded and int(target_lengths.sum()) != targets.numel():
        raise ValueError("concatenated targets must have sum(target_lengths) labels")

    steps = max(int(input_lengths.max()), 1)
    dtype = log_probs.dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    labels = _padded_targets(
        targets.to(device, torch.long), target_lengths, int(target_lengths.max())
    )
    computed = log_probs[:steps].to(dtype)
    batch_targets = Targets(
        *(t.contiguous() for t in (labels, input_lengths, target_lengths)), blank
    )
    kernel = ctc_kernel.kernel()
    computation = kernel if kernel and kernel.accepts(computed) else TensorLoops
    log_likelihood = _LogLikelihood.apply(computed, batch_targets, computation)

    # NaN is not infeasible: it stays NaN, as with the native loss, so that a
    # non-finite input is seen (and its task skipped) rather than zeroed.
    infeasible = log_likelihood.detach() <= NEG / 2
    fallback = 0.0 if zero_infinity else float("inf")
    loss = torch.where(infeasible, fallback, -log_likelihood).to(log_probs.dtype)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return (loss / target_lengths.clamp(min=1).to(loss.dtype)).mean()
    return loss


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lens: torch.Tensor,
    target_lens: torch.Tensor,
    blank_index: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Twice-differentiable ``speechbrain.nnet.losses.ctc_loss``.

    Same interface and results as SpeechBrain's CTC loss (relative lengths,
    batch-first inputs, infinite losses zeroed), computed with
    :func:`ctc_loss_differentiable`: twice differentiable in any context, and
    without touching ``torch.nn.functional.ctc_loss``. A recipe's YAML
    chooses it as ``ctc_cost: !name:speechbrain_meta.ctc.ctc_loss`` with
    ``blank_index: !ref <blank_index>``.

    Arguments
    ---------
    log_probs : torch.Tensor
        Log-probabilities ``(B, T, C)``.
    targets : torch.Tensor
        Padded targets without blanks ``(B, S)``.
    input_lens : torch.Tensor
        Length of each input relative to ``T``, in ``[0, 1]``.
    target_lens : torch.Tensor
        Length of each target relative to ``S``, in ``[0, 1]``.
    blank_index : int
        Index of the blank class.
    reduction : str
        ``'mean'``, ``'sum'`` and ``'none'`` as in PyTorch; ``'batch'``: each
        loss divided by its target length, ``(B,)``; ``'batchmean'``: the sum
        divided by the batch size.

    Returns
    -------
    torch.Tensor
        The loss: a scalar, or ``(B,)`` with ``'none'`` or ``'batch'``.

    Example
    -------
    >>> import speechbrain.nnet.losses
    >>> log_probs = torch.randn(2, 12, 5).log_softmax(-1)
    >>> targets = torch.tensor([[1, 2, 3], [4, 4, 0]])
    >>> lens, target_lens = torch.tensor([1.0, 0.75]), torch.tensor([1.0, 2 / 3])
    >>> loss = ctc_loss(log_probs, targets, lens, target_lens, blank_index=0)
    >>> native = speechbrain.nnet.losses.ctc_loss(
    ...     log_probs, targets, lens, target_lens, blank_index=0
    ... )
    >>> torch.allclose(loss, native)
    True
    """
    input_lens = (input_lens * log_probs.shape[1]).round().int()
    target_lens = (target_lens * targets.shape[1]).round().int()
    torch_reduction = {"batch": "none", "batchmean": "sum"}.get(reduction, reduction)
    loss = ctc_loss_differentiable(
        log_probs.transpose(0, 1),
        targets,
        input_lens,
        target_lens,
        blank_index,
        reduction=torch_reduction,
        zero_infinity=True,
    )
    if reduction == "batchmean":
        return loss / targets.shape[0]
    if reduction == "batch":
        return loss / target_lens.to(loss.dtype)
    return loss


_differentiable_ctc = ThreadLocalPatch(
    [(F, "ctc_loss")], lambda native: ctc_loss_differentiable
)


@contextlib.contextmanager
def twice_differentiable_ctc() -> Iterator[None]:
    """Make the CTC losses that this thread computes twice differentiable.

    Inside the context, ``torch.nn.functional.ctc_loss`` computes
    :func:`ctc_loss_differentiable` when called from the thread that entered
    it, and the native loss when called from any other thread. Everything
    that looks the function up at call time follows:
    ``speechbrain.nnet.losses.ctc_loss`` and ``torch.nn.CTCLoss`` included.
    The context is re-entrant and exception-safe. Outside of every thread's
    context, ``torch.nn.functional.ctc_loss`` *is* the native function again;
    while a thread is inside, it is a dispatcher that wraps it (same name,
    signature and docstring; ``__wrapped__`` is the native function).

    This is how the meta-learning Brains differentiate through CTC: their
    second-order steps run inside this context
    (:func:`speechbrain_meta.functional.second_order_context`), so a recipe's
    ``compute_objectives`` that calls SpeechBrain's ``ctc_loss`` needs no
    change. A recipe that uses :func:`ctc_loss` itself needs no context.

    Returns
    -------
    Iterator[None]
        A context manager.

    Example
    -------
    >>> import speechbrain.nnet.losses
    >>> logits = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    >>> targets, lens = torch.tensor([[1, 2], [3, 3]]), torch.ones(2)
    >>> native = torch.nn.functional.ctc_loss
    >>> with twice_differentiable_ctc():
    ...     loss = speechbrain.nnet.losses.ctc_loss(
    ...         logits.log_softmax(-1), targets, lens, lens, blank_index=0
    ...     )
    ...     (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    ...     (hvp,) = torch.autograd.grad(grad.pow(2).sum(), logits)
    >>> torch.nn.functional.ctc_loss is native
    True
    """
    with _differentiable_ctc:
        yield

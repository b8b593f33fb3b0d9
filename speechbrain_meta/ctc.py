"""A CTC loss that autograd can differentiate twice.

``torch.nn.functional.ctc_loss`` has no double backward: second-order MAML
through it fails with "derivative for aten::_ctc_loss_backward is not
implemented". :func:`ctc_loss_differentiable` has the same interface and
semantics, and autograd can differentiate it twice:

* the forward pass runs the log-space CTC forward recursion, vectorised over
  the batch and the ``2 S + 1`` blank-interleaved label positions, with a
  Python loop over time only. The backward recursion (beta) runs in the same
  loop as a second half of the batch, on the time- and label-reversed problem;
* a first-order backward reads the state posteriors off the saved alphas and
  betas: no autograd graph is built, which keeps it close to native speed;
* a backward with ``create_graph=True`` rebuilds the posteriors as an
  autograd graph (the same recursions in probability space, scaled by the
  saved log-space values, so that nothing under- or overflows), which autograd
  then differentiates once more: the Hessian-vector products of second-order
  MAML.

:func:`ctc_loss` is ``speechbrain.nnet.losses.ctc_loss`` on top of it, and
:func:`twice_differentiable_ctc` swaps it in for the native loss wherever
SpeechBrain or PyTorch look it up.

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
import math
import threading
from typing import Iterator, NamedTuple, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["ctc_loss", "ctc_loss_differentiable", "twice_differentiable_ctc"]

# Log-probability of impossible states. A finite stand-in for -inf keeps every
# exp, log and difference of the recursions finite (logsumexp of all -inf has a
# NaN gradient); paths through it stay below _NEG / 2, which marks them
# infeasible.
_NEG = -1e30

Lengths = Union[torch.Tensor, Sequence[int], int]


class _Plan(NamedTuple):
    """Index tensors of one batch, shared by the forward and backward passes.

    The recursions run on a flat ``(T, N)`` layout: ``R`` rows (the batch for
    alpha, then the reversed batch for beta) of ``W = L + 2`` entries each,
    two padding entries (always impossible) followed by the ``L`` extended
    label positions, so that the predecessors ``s - 1`` and ``s - 2`` of every
    position are the two entries before it.
    """

    batch: int
    rows: int
    width: int
    flip_index: torch.Tensor  # (T, B, L): (t, s) <-> (T_b - 1 - t, L_b - 1 - s)
    flip_mask: torch.Tensor  # (T, B, L): t < T_b and s < L_b
    skip: torch.Tensor  # (N - 2,): 0 where s - 2 -> s is allowed, else _NEG
    start: torch.Tensor  # (N,): 0 on the positions 0 and 1 of each row
    final_index: torch.Tensor  # (B, 2): flat index of alpha[T_b - 1, L_b - {1, 2}]
    final_mask: torch.Tensor  # (B, 2): which of the two final states exist
    input_lengths: torch.Tensor  # (B,)
    target_lengths: torch.Tensor  # (B,)


def _as_lengths(lengths: Lengths, device: torch.device) -> torch.Tensor:
    """Lengths given as a tensor, a sequence or an int, as a 1-D long tensor."""
    return torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)


def _padded_targets(
    targets: torch.Tensor, target_lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Targets as ``(B, max_length)``, from padded or concatenated form.

    Entries past each target's length are arbitrary (the caller masks them).
    """
    positions = torch.arange(max_length, device=targets.device)
    if targets.dim() == 2:
        return targets[:, :max_length]
    if targets.numel() == 0:
        return targets.new_zeros(target_lengths.numel(), max_length)
    offsets = target_lengths.cumsum(0) - target_lengths
    index = (offsets[:, None] + positions).clamp(max=targets.numel() - 1)
    return targets[index]


def _extend(labels: torch.Tensor, blank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blank-interleaved labels ``(B, 2 S + 1)`` and their skip transitions.

    ``s - 2 -> s`` is allowed on label positions (odd ``s``) whose label differs
    from the previous one.
    """
    batch, max_length = labels.shape
    extended = labels.new_full((batch, 2 * max_length + 1), blank)
    extended[:, 1::2] = labels
    skip = torch.zeros_like(extended, dtype=torch.bool)
    skip[:, 3::2] = extended[:, 3::2] != extended[:, 1:-2:2]
    return extended, skip


def _make_plan(
    labels: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    frames: int,
    blank: int,
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, _Plan]:
    """Extended labels ``(B, L)`` for the emission gather, and the plan."""
    device = labels.device
    batch, max_length = labels.shape
    width = 2 * max_length + 3
    label_mask = torch.arange(max_length, device=device) < target_lengths[:, None]
    labels = torch.where(label_mask, labels, blank)
    extended, skip = _extend(labels, blank)
    states = extended.shape[1]
    ext_lengths = 2 * target_lengths + 1

    # The beta recursion is the alpha recursion of the reversed problem.
    positions = torch.arange(states, device=device)
    reverse = (ext_lengths[:, None] - 1 - positions).clamp(min=0)
    reversed_labels = torch.where(
        positions < ext_lengths[:, None], extended.gather(1, reverse), blank
    )
    _, reversed_skip = _extend(reversed_labels[:, 1::2], blank)

    skip = torch.cat([skip, reversed_skip])
    skip = torch.zeros(skip.shape, dtype=dtype, device=device).masked_fill_(~skip, _NEG)
    skip = F.pad(skip, (2, 0), value=_NEG)
    start = torch.full_like(skip, _NEG)
    start[:, 2:4] = 0.0

    # (t, b, s) <-> (T_b - 1 - t, b, L_b - 1 - s) as flat indices of (T, B, L)
    time = torch.arange(frames, device=device)
    last = (input_lengths - 1) * batch + torch.arange(batch, device=device)
    flip_index = (last * states + ext_lengths - 1)[:, None] - positions
    flip_index = flip_index - (time * batch * states)[:, None, None]
    flip_index.clamp_(0, frames * batch * states - 1)
    flip_mask = (time[:, None] < input_lengths)[..., None] & (
        positions < ext_lengths[:, None]
    )

    last = (input_lengths - 1).clamp(min=0)[:, None]
    final_state = ext_lengths[:, None] - torch.tensor([1, 2], device=device)
    final_row = last * 2 * batch + torch.arange(batch, device=device)[:, None]
    final_index = final_row * width + 2 + final_state.clamp(min=0)
    final_mask = (input_lengths[:, None] > 0) & (final_state >= 0)

    plan = _Plan(
        batch=batch,
        rows=2 * batch,
        width=width,
        flip_index=flip_index,
        flip_mask=flip_mask,
        skip=skip.reshape(-1)[2:],
        start=start.reshape(-1),
        final_index=final_index,
        final_mask=final_mask,
        input_lengths=input_lengths,
        target_lengths=target_lengths,
    )
    return extended, plan


def _layout(emissions: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Emissions ``(T, B, L)`` and their reversal in the flat ``(T, N)`` layout."""
    reversed_emissions = torch.where(
        plan.flip_mask, emissions.take(plan.flip_index), _NEG
    )
    both = torch.cat([emissions, reversed_emissions], dim=1)
    return F.pad(both, (2, 0), value=_NEG).flatten(1)


def _recursion(flat_emissions: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Log-space alphas ``(T, N)`` of every row, without autograd.

    ``alpha[t, s] = logsumexp(alpha[t-1, s], alpha[t-1, s-1],
    alpha[t-1, s-2] + skip[s]) + emission[t, s]``, written into one buffer
    through views made once, four in-place kernels per time step.
    """
    frames = flat_emissions.shape[0]
    alpha = torch.empty_like(flat_emissions)
    alpha[:, :2] = _NEG
    alpha[0] = flat_emissions[0] + plan.start
    current = alpha[:, 2:].unbind(0)
    previous_1 = alpha[:, 1:-1].unbind(0)
    previous_2 = alpha[:, :-2].unbind(0)
    emissions = flat_emissions[:, 2:].unbind(0)
    skipped = torch.empty_like(current[0])
    for t in range(1, frames):
        out = current[t]
        torch.add(previous_2[t - 1], plan.skip, out=skipped)
        torch.logaddexp(current[t - 1], previous_1[t - 1], out=out)
        torch.logaddexp(out, skipped, out=out)
        out.add_(emissions[t])
    return alpha


def _log_likelihood(alpha: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``log p(target | input)`` per sample from the alphas, ``_NEG`` if none.

    A sample of input length 0 has likelihood 1 for the empty target, 0 else.
    """
    final = alpha.take(plan.final_index).masked_fill(~plan.final_mask, _NEG)
    log_likelihood = final.logsumexp(1)
    empty = torch.where(plan.target_lengths == 0, 0.0, _NEG).to(alpha.dtype)
    return torch.where(plan.input_lengths > 0, log_likelihood, empty)


def _split(flat: torch.Tensor, plan: _Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Alpha-half and beta-half of a flat ``(T, N)`` tensor, both ``(T, B, L)``.

    The beta half is flipped back to the original time and label order.
    """
    rows = flat.unflatten(1, (plan.rows, plan.width))[:, :, 2:]
    return rows[:, : plan.batch], rows[:, plan.batch :].take(plan.flip_index)


def _exp(log_values: torch.Tensor) -> torch.Tensor:
    """In-place ``exp`` that flushes results below the smallest normal to 0.

    Those are negligible next to the other terms, and subnormal arithmetic
    is slow on CPUs.
    """
    tiny = torch.finfo(log_values.dtype).tiny
    return F.threshold_(log_values, math.log(tiny), float("-inf")).exp_()


def _posterior_weights(
    emissions: torch.Tensor,
    alpha: torch.Tensor,
    log_likelihood: torch.Tensor,
    plan: _Plan,
) -> torch.Tensor:
    """Posterior of every state ``(T, B, L)``: d log-likelihood / d emission."""
    forward, backward = _split(alpha, plan)
    log_post = forward + backward - emissions - log_likelihood[:, None]
    mask = plan.flip_mask & (log_likelihood > _NEG / 2)[:, None]
    return _exp(log_post.masked_fill_(~mask, float("-inf")))


def _posterior_graph(
    emissions: torch.Tensor,
    alpha: torch.Tensor,
    log_likelihood: torch.Tensor,
    plan: _Plan,
) -> torch.Tensor:
    """The posteriors as a differentiable function of ``emissions``.

    The recursions run again in probability space, every quantity divided by
    its value at the current point (``alpha`` and ``log_likelihood``, known
    from the forward pass): ``p[t, s] = exp(alpha(e)[t, s] - alpha[t, s])``
    obeys ``p[t, s] = q[t, s] sum_k w[t, s, k] p[t-1, s-2+k]`` with constant
    transition weights ``w = exp(alpha[t-1, s-2+k] + e[t, s] - alpha[t, s])``
    (the skip mask included; each at most 1) and ``q = exp(e - e.detach())``.
    This is the log-space function itself, so all its derivatives are exact,
    while every value stays close to 1: nothing under- or overflows and each
    time step costs a multiply and a sum.
    """
    flat = _layout(emissions, plan)
    point = flat.detach()
    scale = torch.exp(flat - point)
    with torch.no_grad():
        # log sum_k exp(alpha[t-1, s-2+k]); +inf where alpha[t, s] is impossible
        incoming = (alpha[1:, 2:] - point[1:, 2:]).masked_fill_(
            alpha[1:, 2:] <= _NEG / 2, float("inf")
        )
        log_weights = alpha[:-1].unfold(1, 3, 1) - incoming[..., None]
        log_weights[..., 0] += plan.skip
        weights = _exp(log_weights)
        start = ((plan.start == 0) & (alpha[0] > _NEG / 2)).to(alpha.dtype)
    weights = weights * scale[1:, 2:, None]
    state = scale[0] * start
    states = [state]
    for step_weights in weights.unbind(0):
        state = F.pad((step_weights * state.unfold(0, 3, 1)).sum(-1), (2, 0))
        states.append(state)
    states = torch.stack(states)
    forward, backward = _split(states, plan)

    # log_likelihood(e) - log_likelihood = log(ratio)
    final_mask = plan.final_mask & (log_likelihood > _NEG / 2)[:, None]
    final_weights = (alpha.take(plan.final_index) - log_likelihood[:, None]).exp()
    final_weights = final_weights.masked_fill(~final_mask, 0.0)
    ratio = (final_weights * states.take(plan.final_index)).sum(1)
    ratio = ratio + (~final_mask.any(1)).to(ratio.dtype)

    point = emissions.detach()
    posterior = _posterior_weights(point, alpha, log_likelihood, plan)
    unscale = torch.exp(point - emissions) / ratio[:, None]
    return posterior * forward * backward * unscale


class _LogLikelihood(torch.autograd.Function):
    """CTC log-likelihood per sample of the emissions ``(T, B, L)``."""

    @staticmethod
    def forward(ctx, emissions: torch.Tensor, plan: _Plan) -> torch.Tensor:
        alpha = _recursion(_layout(emissions, plan), plan)
        ctx.save_for_backward(emissions, alpha)
        ctx.plan = plan
        return _log_likelihood(alpha, plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        emissions, alpha = ctx.saved_tensors
        log_likelihood = _log_likelihood(alpha, ctx.plan)
        if torch.is_grad_enabled():  # create_graph=True: keep it differentiable
            posterior = _posterior_graph(emissions, alpha, log_likelihood, ctx.plan)
        else:
            posterior = _posterior_weights(emissions, alpha, log_likelihood, ctx.plan)
        return posterior * grad[:, None], None


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
        gradients with zeros.

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
    labels = _padded_targets(targets.long(), target_lengths, int(target_lengths.max()))
    extended, plan = _make_plan(
        labels, input_lengths, target_lengths, steps, blank, dtype
    )
    emissions = log_probs[:steps].to(dtype).gather(2, extended.expand(steps, -1, -1))
    # Frames past each input length: constant, so that any value they hold
    # (NaN included) reaches neither the loss nor its derivatives.
    in_input = (
        torch.arange(steps, device=device)[:, None, None] < input_lengths[:, None]
    )
    emissions = torch.where(in_input, emissions.clamp(min=_NEG), 0.0)
    log_likelihood = _LogLikelihood.apply(emissions, plan)

    feasible = log_likelihood.detach() > _NEG / 2
    fallback = 0.0 if zero_infinity else float("inf")
    loss = torch.where(feasible, -log_likelihood, fallback).to(log_probs.dtype)
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
    :func:`ctc_loss_differentiable`.

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


_patch_lock = threading.Lock()
_patch_depth = 0
_replaced_ctc_loss = F.ctc_loss


@contextlib.contextmanager
def twice_differentiable_ctc() -> Iterator[None]:
    """Make every CTC loss computed inside the context twice differentiable.

    ``torch.nn.functional.ctc_loss`` is replaced with
    :func:`ctc_loss_differentiable` for the duration of the context, and
    restored on exit, also when an exception leaves it. Everything that looks
    the function up at call time follows: ``speechbrain.nnet.losses.ctc_loss``
    and ``torch.nn.CTCLoss`` included. The context is re-entrant (the native
    function comes back when the outermost context exits) and process-wide:
    other threads see the replacement too.

    This is how the meta-learning Brains differentiate through CTC: their
    second-order steps run inside this context
    (:func:`speechbrain_meta.functional.second_order_context`), so a recipe's
    ``compute_objectives`` that calls SpeechBrain's ``ctc_loss`` needs no
    change.

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
    global _patch_depth, _replaced_ctc_loss
    with _patch_lock:
        if _patch_depth == 0:
            _replaced_ctc_loss = F.ctc_loss
            F.ctc_loss = ctc_loss_differentiable
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                F.ctc_loss = _replaced_ctc_loss

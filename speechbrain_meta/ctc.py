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
in Python overhead. On CPU tensors the same three computations (the
log-likelihood, its gradient, the Hessian-vector product) are each one call
of a C kernel instead (:mod:`speechbrain_meta.ctc_kernel`: sample by
sample, the beta recursion run directly), where it can be built; both are
tested against each other. The derivatives are those of the log-likelihood with
respect to ``log_probs`` (tested against autograd on a textbook
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
import math
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from speechbrain_meta import ctc_kernel
from speechbrain_meta.patching import ThreadLocalPatch

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
    outside: torch.Tensor  # (T, B, L): t >= T_b or s >= L_b
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
    if targets.dim() == 2:
        return targets[:, :max_length]
    if targets.numel() == 0:
        return targets.new_zeros(target_lengths.numel(), max_length)
    offsets = target_lengths.cumsum(0) - target_lengths
    positions = torch.arange(max_length, device=targets.device)
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
    last_row = (input_lengths - 1) * batch + torch.arange(batch, device=device)
    flip_index = (last_row * states + ext_lengths - 1)[:, None] - positions
    flip_index = flip_index - (time * batch * states)[:, None, None]
    flip_index.clamp_(0, frames * batch * states - 1)
    outside = (time[:, None] >= input_lengths)[..., None] | (
        positions >= ext_lengths[:, None]
    )

    last_frame = (input_lengths - 1).clamp(min=0)[:, None]
    final_state = ext_lengths[:, None] - torch.tensor([1, 2], device=device)
    final_row = last_frame * 2 * batch + torch.arange(batch, device=device)[:, None]
    final_index = final_row * width + 2 + final_state.clamp(min=0)
    final_mask = (input_lengths[:, None] > 0) & (final_state >= 0)

    plan = _Plan(
        batch=batch,
        rows=2 * batch,
        width=width,
        flip_index=flip_index,
        outside=outside,
        skip=skip.reshape(-1)[2:],
        start=start.reshape(-1),
        final_index=final_index,
        final_mask=final_mask,
        input_lengths=input_lengths,
        target_lengths=target_lengths,
    )
    return extended, plan


def _layout(values: torch.Tensor, plan: _Plan, fill: float) -> torch.Tensor:
    """Values ``(T, B, L)`` and their reversal in the flat ``(T, N)`` layout.

    Padding entries and reversed entries outside the sequences hold ``fill``.
    """
    flat = values.new_empty(values.shape[0], plan.rows, plan.width)
    flat[:, :, :2] = fill
    flat[:, : plan.batch, 2:] = values
    reversed_values = flat[:, plan.batch :, 2:]
    torch.take(values, plan.flip_index, out=reversed_values)
    reversed_values.masked_fill_(plan.outside, fill)
    return flat.flatten(1)


def _compiled(function: Callable) -> Callable:
    """``function`` compiled by TorchScript once, on first use.

    A compiled time loop runs its few kernels per step without returning to
    Python: 2 to 3 times faster on a CPU, the same results. Where TorchScript
    cannot compile it (it is deprecated in favour of ``torch.compile``, which
    unrolls a loop over time and recompiles for every length), ``function``
    runs as it is.
    """
    compiled = []

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        if not compiled:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    compiled.append(torch.jit.script(function))
            except Exception:  # noqa: BLE001 - any failure: run it in Python
                compiled.append(function)
        return compiled[0](*tensors)

    call.python = function
    return call


def _alpha_loop(
    flat_emissions: torch.Tensor, skip: torch.Tensor, start: torch.Tensor
) -> torch.Tensor:
    """The loop of :func:`_recursion` (tensors only, for TorchScript)."""
    frames = flat_emissions.shape[0]
    alpha = torch.empty_like(flat_emissions)
    # _NEG, from start's first entry (row 0's padding) in the emissions'
    # dtype: TorchScript would round the literal through float32.
    alpha[:, :2] = start[0]
    alpha[0] = flat_emissions[0] + start
    current = alpha[:, 2:].unbind(0)
    previous_1 = alpha[:, 1:-1].unbind(0)
    previous_2 = alpha[:, :-2].unbind(0)
    emissions = flat_emissions[:, 2:].unbind(0)
    skipped = torch.empty_like(current[0])
    for t in range(1, frames):
        out = current[t]
        torch.add(previous_2[t - 1], skip, out=skipped)
        torch.logaddexp(current[t - 1], previous_1[t - 1], out=out)
        torch.logaddexp(out, skipped, out=out)
        out.add_(emissions[t])
    return alpha


_alpha_recursion = _compiled(_alpha_loop)


def _recursion(flat_emissions: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Log-space alphas ``(T, N)`` of every row, without autograd.

    ``alpha[t, s] = logsumexp(alpha[t-1, s], alpha[t-1, s-1],
    alpha[t-1, s-2] + skip[s]) + emission[t, s]``, written into one buffer
    through views made once, four in-place kernels per time step, the loop
    compiled by TorchScript (:func:`_compiled`).
    """
    return _alpha_recursion(flat_emissions, plan.skip, plan.start)


def _log_likelihood(alpha: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``log p(target | input)`` per sample from the alphas, ``_NEG`` if none.

    A sample of input length 0 has likelihood 1 for the empty target, 0 else.
    """
    final = alpha.take(plan.final_index).masked_fill(~plan.final_mask, _NEG)
    log_likelihood = final.logsumexp(1)
    empty = torch.where(plan.target_lengths == 0, 0.0, _NEG).to(alpha.dtype)
    return torch.where(plan.input_lengths > 0, log_likelihood, empty)


def _states(flat: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The ``(T, R, L)`` label positions of a flat ``(T, N)`` tensor (a view)."""
    return flat.unflatten(1, (plan.rows, plan.width))[:, :, 2:]


def _split(flat: torch.Tensor, plan: _Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Alpha-half and beta-half of a flat ``(T, N)`` tensor, both ``(T, B, L)``.

    The beta half is flipped back to the original time and label order.
    """
    states = _states(flat, plan)
    return states[:, : plan.batch], states[:, plan.batch :].take(plan.flip_index)


def _exp(log_values: torch.Tensor) -> torch.Tensor:
    """In-place ``exp`` that flushes results below the smallest normal to 0.

    Those are negligible next to the other terms, and subnormal arithmetic
    is slow on CPUs.
    """
    tiny = torch.finfo(log_values.dtype).tiny
    return F.threshold_(log_values, math.log(tiny), float("-inf")).exp_()


def _posterior_weights(
    flat_emissions: torch.Tensor,
    alpha: torch.Tensor,
    log_likelihood: torch.Tensor,
    plan: _Plan,
) -> torch.Tensor:
    """Posterior of every state ``(T, B, L)``: d log-likelihood / d emission.

    ``exp(alpha + beta - emission - log_likelihood)``, zero outside the
    sequences and for infeasible ones, computed as a softmax over the states
    of each frame (at every frame, the path is in exactly one of them) of
    ``alpha`` and ``beta`` relative to their maxima over those states. In
    float32, the rounding of alphas and betas in the thousands then cancels
    out instead of reaching the posteriors through ``log_likelihood``.
    """
    forward, backward = _split(alpha, plan)
    emissions = _states(flat_emissions, plan)[:, : plan.batch]
    log_post = forward - forward.amax(2, keepdim=True)
    log_post += backward.sub_(backward.amax(2, keepdim=True))
    log_post -= emissions
    log_post.masked_fill_(plan.outside, float("-inf"))
    log_post -= log_post.amax(2, keepdim=True).clamp_(min=_NEG)
    posterior = _exp(log_post)
    # The likelihood, up to the shifts: at least 1 (the maximum's term) inside
    # the input, 0 past it (made 1), inf where infeasible (all posteriors 0).
    total = posterior.sum(2, keepdim=True).clamp_(min=1.0)
    infeasible = log_likelihood <= _NEG / 2
    return posterior.div_(total.masked_fill_(infeasible[:, None], float("inf")))


def _transition_weights(alpha: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Posterior transition probabilities ``(3, T - 1, N - 2)``.

    ``w[k, t - 1, s] = P(state s - 2 + k at t - 1 | state s at t, frames up to
    t)``, the softmax over ``k`` of ``alpha[t-1, s-2+k]`` (plus ``skip`` for
    ``k = 0``). Normalised over the three predecessors, rather than with
    ``alpha[t, s] - emission[t, s]``, they sum to one up to a rounding of
    their own size: in float32, the rounding of alphas in the thousands would
    otherwise build up along the recursions of the Hessian-vector product.
    Where ``s`` is impossible at ``t`` they are arbitrary (a third each when
    all three predecessors are impossible): what the recursion carries there
    only reaches impossible states, whose posteriors are zero.
    """
    columns = alpha.shape[1]
    weights = alpha.new_empty(3, alpha.shape[0] - 1, columns - 2)
    torch.add(alpha[:-1, :-2], plan.skip, out=weights[0])
    weights[1] = alpha[:-1, 1:-1]
    weights[2] = alpha[:-1, 2:]
    weights -= torch.maximum(torch.maximum(weights[0], weights[1]), weights[2])
    weights = _exp(weights)
    weights /= weights.sum(0)
    return F.threshold_(weights, torch.finfo(weights.dtype).tiny, 0.0)


def _prefix_sum_loop(weights: torch.Tensor, flat_values: torch.Tensor) -> torch.Tensor:
    """The loop of :func:`_expected_prefix_sums` (tensors only, for TorchScript)."""
    sums = torch.zeros_like(flat_values)
    before = torch.empty_like(flat_values[0])
    previous_2, previous_1, previous_0 = before[:-2], before[1:-1], before[2:]
    rows, values = sums.unbind(0), flat_values.unbind(0)
    current = sums[:, 2:].unbind(0)
    from_2, from_1, from_0 = (
        weights[0].unbind(0),
        weights[1].unbind(0),
        weights[2].unbind(0),
    )
    for t in range(1, flat_values.shape[0]):
        out = current[t]
        torch.add(rows[t - 1], values[t - 1], out=before)
        torch.mul(from_2[t - 1], previous_2, out=out)
        out.addcmul_(from_1[t - 1], previous_1).addcmul_(from_0[t - 1], previous_0)
    return sums


_prefix_sums = _compiled(_prefix_sum_loop)


def _expected_prefix_sums(
    alpha: torch.Tensor, flat_values: torch.Tensor, plan: _Plan
) -> torch.Tensor:
    """``E[sum of values along the path before t | state s at t]``, ``(T, N)``.

    The recursion ``f[t, s] = sum_k w[k, t-1, s] (f + values)[t-1, s-2+k]``,
    linear, with the transition weights of :func:`_transition_weights`,
    written in place like :func:`_recursion` and compiled by TorchScript.
    """
    return _prefix_sums(_transition_weights(alpha, plan), flat_values)


class _Targets(NamedTuple):
    """The targets of one batch, as both computations of the loss take them."""

    labels: torch.Tensor  # (B, S) int64, rows contiguous
    input_lengths: torch.Tensor  # (B,) int64
    target_lengths: torch.Tensor  # (B,) int64
    blank: int


class _TensorLoops:
    """The log-likelihood and its derivatives as tensor operations, on any device.

    The interface of :class:`speechbrain_meta.ctc_kernel.CompiledCTC` (which
    computes the same in C, on CPU tensors): ``forward`` returns the
    log-likelihoods, which samples hold a NaN, the tensors that the
    derivatives need (``saved``) and what else they need (``context``: here
    the plan and the extended labels).
    """

    @staticmethod
    def forward(
        log_probs: torch.Tensor, targets: _Targets
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...], tuple]:
        frames, _, classes = log_probs.shape
        extended, plan = _make_plan(
            *targets[:3], frames, targets.blank, log_probs.dtype
        )
        low, high = (int(x) for x in extended.aminmax()) if extended.numel() else (0, 0)
        if low < 0 or high >= classes:
            raise ValueError(f"targets must be class indices below {classes}")
        emissions = log_probs.gather(2, extended.expand(frames, -1, -1))
        # -inf becomes _NEG; entries outside the sequences become constants, so
        # that whatever they hold (NaN included) reaches neither the loss nor
        # its derivatives, which are zero there.
        clean = emissions.clamp(min=_NEG).masked_fill_(plan.outside, 0.0)
        # A NaN inside a sequence is zeroed for the recursions, which run over
        # all the samples in one buffer and would carry it into the next ones.
        nan_entries = clean.isnan()
        nan_samples = nan_entries.flatten(2).any(2).any(0)
        clean.masked_fill_(nan_entries, 0.0)
        flat_emissions = _layout(clean, plan, _NEG)
        alpha = _recursion(flat_emissions, plan)
        saved = (flat_emissions, alpha)
        return _log_likelihood(alpha, plan), nan_samples, saved, (plan, extended)

    @staticmethod
    def gradient(
        context: tuple,
        saved: Tuple[torch.Tensor, ...],
        shape: torch.Size,
        log_likelihood: torch.Tensor,
        grad: torch.Tensor,
        keep_posterior: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        plan, extended = context
        posterior = _posterior_weights(*saved, log_likelihood, plan)
        weighted = posterior * grad[:, None]
        index = extended.expand(shape[0], -1, -1)
        gradient = weighted.new_zeros(shape).scatter_add_(2, index, weighted)
        return gradient, posterior

    @staticmethod
    def hvp(
        context: tuple,
        saved: Tuple[torch.Tensor, ...],
        posterior: torch.Tensor,
        upstream: torch.Tensor,
        grad: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        plan, extended = context
        index = extended.expand(upstream.shape[0], -1, -1)
        cotangent = upstream.gather(2, index).masked_fill_(plan.outside, 0.0)
        expected = (posterior * cotangent).sum((0, 2))  # E[U] per sample
        before, after = _split(
            _expected_prefix_sums(saved[1], _layout(cotangent, plan, 0.0), plan), plan
        )
        centred = cotangent.add_(before).add_(after).sub_(expected[:, None])
        weighted = centred.mul_(posterior).mul_(grad[:, None])
        hvp = weighted.new_zeros(upstream.shape).scatter_add_(2, index, weighted)
        return hvp, expected


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

    ``computation`` is :class:`_TensorLoops` or the C kernel's
    :class:`speechbrain_meta.ctc_kernel.CompiledCTC`. The forward pass
    computes what the backward pass needs; a backward with
    ``create_graph=True`` returns the gradient through :class:`_Gradient`,
    whose own backward is the Hessian-vector product. A NaN inside a sample's
    sequence makes that sample's loss and derivatives NaN, as natively.
    """

    @staticmethod
    def forward(
        ctx, log_probs: torch.Tensor, targets: _Targets, computation
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
    batch_targets = _Targets(
        *(t.contiguous() for t in (labels, input_lengths, target_lengths)), blank
    )
    kernel = ctc_kernel.kernel()
    computation = kernel if kernel and kernel.accepts(computed) else _TensorLoops
    log_likelihood = _LogLikelihood.apply(computed, batch_targets, computation)

    # NaN is not infeasible: it stays NaN, as with the native loss, so that a
    # non-finite input is seen (and its task skipped) rather than zeroed.
    infeasible = log_likelihood.detach() <= _NEG / 2
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

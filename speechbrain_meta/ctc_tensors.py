"""The CTC log-likelihood and its derivatives as tensor operations, on any device.

What :mod:`speechbrain_meta.ctc` computes where its C kernel does not run
(CUDA tensors, no compiler, ``SPEECHBRAIN_META_CTC_KERNEL=0``):
:class:`TensorLoops`, with the interface of
:class:`speechbrain_meta.ctc_kernel.CompiledCTC`. The recursions run on a flat
layout of the whole batch (:class:`_Plan`), the beta recursion as more rows
of the alpha one (the time- and label-reversed problem), each time step a
few in-place kernels on buffers, the loops over time compiled by TorchScript
(:func:`_compiled`).

Example
-------
>>> log_probs = torch.randn(6, 1, 3, dtype=torch.float64).log_softmax(-1)
>>> targets = Targets(
...     torch.tensor([[1, 2]]), torch.tensor([6]), torch.tensor([2]), blank=0
... )
>>> log_likelihood = TensorLoops.forward(log_probs, targets)[0]
>>> native = torch.nn.functional.ctc_loss(
...     log_probs, targets.labels, [6], [2], reduction="none"
... )
>>> torch.allclose(-log_likelihood, native)
True
"""

import math
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["NEG", "Targets", "TensorLoops"]

# Log-probability of impossible states. A finite stand-in for -inf keeps every
# exp, log and difference of the recursions finite (logsumexp of all -inf has a
# NaN gradient); paths through it stay below NEG / 2, which marks them
# infeasible.
NEG = -1e30


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
    skip: torch.Tensor  # (N - 2,): 0 where s - 2 -> s is allowed, else NEG
    start: torch.Tensor  # (N,): 0 on the positions 0 and 1 of each row
    final_index: torch.Tensor  # (B, 2): flat index of alpha[T_b - 1, L_b - {1, 2}]
    final_mask: torch.Tensor  # (B, 2): which of the two final states exist
    input_lengths: torch.Tensor  # (B,)
    target_lengths: torch.Tensor  # (B,)


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
    skip = torch.zeros(skip.shape, dtype=dtype, device=device).masked_fill_(~skip, NEG)
    skip = F.pad(skip, (2, 0), value=NEG)
    start = torch.full_like(skip, NEG)
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
    # NEG, from start's first entry (row 0's padding) in the emissions'
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
    """``log p(target | input)`` per sample from the alphas, ``NEG`` if none.

    A sample of input length 0 has likelihood 1 for the empty target, 0 else.
    """
    final = alpha.take(plan.final_index).masked_fill(~plan.final_mask, NEG)
    log_likelihood = final.logsumexp(1)
    empty = torch.where(plan.target_lengths == 0, 0.0, NEG).to(alpha.dtype)
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
    log_post -= log_post.amax(2, keepdim=True).clamp_(min=NEG)
    posterior = _exp(log_post)
    # The likelihood, up to the shifts: at least 1 (the maximum's term) inside
    # the input, 0 past it (made 1), inf where infeasible (all posteriors 0).
    total = posterior.sum(2, keepdim=True).clamp_(min=1.0)
    infeasible = log_likelihood <= NEG / 2
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


class Targets(NamedTuple):
    """The targets of one batch, as both computations of the loss take them."""

    labels: torch.Tensor  # (B, S) int64, rows contiguous
    input_lengths: torch.Tensor  # (B,) int64
    target_lengths: torch.Tensor  # (B,) int64
    blank: int


class TensorLoops:
    """The log-likelihood and its derivatives as tensor operations, on any device.

    The interface of :class:`speechbrain_meta.ctc_kernel.CompiledCTC` (which
    computes the same in C, on CPU tensors): ``forward`` returns the
    log-likelihoods, which samples hold a NaN, the tensors that the
    derivatives need (``saved``) and what else they need (``context``: here
    the plan and the extended labels).
    """

    @staticmethod
    def forward(
        log_probs: torch.Tensor, targets: Targets
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...], tuple]:
        """Log-likelihoods, samples holding a NaN, ``saved`` and ``context``."""
        frames, _, classes = log_probs.shape
        extended, plan = _make_plan(
            *targets[:3], frames, targets.blank, log_probs.dtype
        )
        low, high = (int(x) for x in extended.aminmax()) if extended.numel() else (0, 0)
        if low < 0 or high >= classes:
            raise ValueError(f"targets must be class indices below {classes}")
        emissions = log_probs.gather(2, extended.expand(frames, -1, -1))
        # -inf becomes NEG; entries outside the sequences become constants, so
        # that whatever they hold (NaN included) reaches neither the loss nor
        # its derivatives, which are zero there.
        clean = emissions.clamp(min=NEG).masked_fill_(plan.outside, 0.0)
        # A NaN (or +inf: no log-probability) inside a sequence makes its
        # sample NaN, as in the C kernel; it is zeroed for the recursions, which
        # run over all the samples in one buffer and would carry it on.
        nan_entries = ~clean.isfinite()
        nan_samples = nan_entries.flatten(2).any(2).any(0)
        clean.masked_fill_(nan_entries, 0.0)
        flat_emissions = _layout(clean, plan, NEG)
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
        """``grad`` times d log-likelihood / d log_probs, and the posteriors."""
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
        """The Hessian-vector product times ``grad``, and ``E[U]`` per sample."""
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

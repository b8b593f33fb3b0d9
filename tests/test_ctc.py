import pytest
import speechbrain.nnet.losses
import torch
import torch.nn.functional as F
from hyperpyyaml import load_hyperpyyaml

from speechbrain_meta.ctc import (
    ctc_loss,
    ctc_loss_differentiable,
    twice_differentiable_ctc,
)

NO_DOUBLE_BACKWARD = "derivative for aten::_ctc_loss_backward is not implemented"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and stall
    badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(dtype=torch.float64, blank=0, classes=6, seed=0):
    """Logits (T, B, C) and targets covering the corner cases.

    Samples: full length; shorter input with repeated labels (a label
    repeated needs a blank in between); empty target; a target that is
    exactly as long as its input allows (repeats included); input of length
    0 with an empty target; a single frame.
    """
    generator = torch.Generator().manual_seed(seed)
    frames = 12
    labels = [c for c in range(classes) if c != blank]
    targets = [
        [labels[0], labels[1], labels[2], labels[3], labels[1]],
        [labels[2], labels[2], labels[2], labels[0]],
        [],
        [labels[1], labels[1], labels[3], labels[3]],  # needs 6 frames
        [],
        [labels[4]],
    ]
    input_lengths = torch.tensor([12, 10, 7, 6, 0, 1])
    target_lengths = torch.tensor([len(t) for t in targets])
    padded = torch.full((len(targets), 5), blank)  # padding value is arbitrary
    for row, target in enumerate(targets):
        padded[row, : len(target)] = torch.tensor(target, dtype=torch.long)
    logits = torch.randn(frames, len(targets), classes, generator=generator)
    logits = logits.to(dtype).requires_grad_()
    return logits, padded, input_lengths, target_lengths


def concatenated(padded, target_lengths):
    return torch.cat([row[:n] for row, n in zip(padded, target_lengths)])


def loss_and_grad(loss_fn, logits, *args, **kwargs):
    loss = loss_fn(logits.log_softmax(-1), *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("form", ["padded", "concatenated"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_native_loss_and_gradient(dtype, blank, form, reduction):
    logits, targets, input_lengths, target_lengths = make_batch(dtype, blank)
    if form == "concatenated":
        targets = concatenated(targets, target_lengths)
    args = (targets, input_lengths, target_lengths, blank, reduction)
    loss, grad = loss_and_grad(ctc_loss_differentiable, logits, *args)
    ref_loss, ref_grad = loss_and_grad(F.ctc_loss, logits, *args)
    tolerance = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    torch.testing.assert_close(grad, ref_grad, **tolerance)


@pytest.mark.parametrize("seed", range(4))
def test_matches_native_on_random_batches(seed):
    """Few classes (many repeated labels), random lengths, some infeasible."""
    generator = torch.Generator().manual_seed(seed)
    frames, batch, classes = 15, 7, 3
    blank = seed % classes
    logits = torch.randn(frames, batch, classes, generator=generator)
    logits = logits.double().requires_grad_()
    targets = torch.randint(0, classes - 1, (batch, 9), generator=generator)
    targets += (targets >= blank).long()
    input_lengths = torch.randint(0, frames + 1, (batch,), generator=generator)
    target_lengths = torch.randint(0, 10, (batch,), generator=generator)
    args = (targets, input_lengths, target_lengths, blank, "none", True)
    loss, grad = loss_and_grad(ctc_loss_differentiable, logits, *args)
    ref_loss, ref_grad = loss_and_grad(F.ctc_loss, logits, *args)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_matches_native_on_realistic_sizes():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(80, 4, 30, generator=generator, dtype=torch.float64)
    targets = torch.randint(1, 30, (4, 25), generator=generator)
    args = (targets, [80, 71, 64, 50], [25, 20, 25, 3], 0, "none")
    ref_loss, ref_grad = loss_and_grad(F.ctc_loss, logits.requires_grad_(), *args)
    loss, grad = loss_and_grad(ctc_loss_differentiable, logits, *args)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)
    # float32 rounding over 80 frames: the native float32 gradient is itself
    # 5e-5 away from the float64 one, so compare both against float64.
    logits = logits.detach().float().requires_grad_()
    loss, grad = loss_and_grad(ctc_loss_differentiable, logits, *args)
    native_loss, native_grad = loss_and_grad(F.ctc_loss, logits, *args)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(native_loss.double(), ref_loss, rtol=1e-6, atol=0)
    error = (grad.double() - ref_grad).abs().max()
    native_error = (native_grad.double() - ref_grad).abs().max()
    assert error < max(2 * native_error, 1e-5)


def test_unbatched_input_and_length_types():
    logits, targets, input_lengths, target_lengths = make_batch()
    log_probs = logits[:, 0].log_softmax(-1)
    for lengths in [(torch.tensor(12), torch.tensor(5)), ((12,), (5,))]:
        loss = ctc_loss_differentiable(log_probs, targets[0], *lengths, 0, "none")
        ref = F.ctc_loss(log_probs, targets[0], *lengths, 0, "none")
        assert loss.shape == ref.shape == ()
        torch.testing.assert_close(loss, ref)
    loss = ctc_loss_differentiable(
        logits.log_softmax(-1), targets, input_lengths.tolist(), target_lengths
    )
    ref = F.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths)
    torch.testing.assert_close(loss, ref)


def test_infeasible_samples():
    logits, targets, input_lengths, target_lengths = make_batch()
    input_lengths[3] = 5  # [a, a, b, b] needs 6 frames
    args = (targets, input_lengths, target_lengths, 0, "none")
    loss = ctc_loss_differentiable(logits.log_softmax(-1), *args)
    assert torch.isinf(loss[3]) and torch.isfinite(loss[torch.arange(6) != 3]).all()
    assert torch.isinf(ctc_loss_differentiable(logits.log_softmax(-1), *args[:3]))
    torch.testing.assert_close(loss, F.ctc_loss(logits.log_softmax(-1), *args))

    (grad,) = torch.autograd.grad(loss[torch.arange(6) != 3].sum(), logits)
    assert torch.isfinite(grad).all() and (grad[:, 3] == 0).all()

    for reduction in ["none", "mean", "sum"]:
        loss, grad = loss_and_grad(
            ctc_loss_differentiable, logits, *args[:3], 0, reduction, True
        )
        ref_loss, ref_grad = loss_and_grad(
            F.ctc_loss, logits, *args[:3], 0, reduction, True
        )
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
        assert (grad[:, 3] == 0).all()
        if reduction == "none":
            assert loss[3] == 0


def test_nan_inside_a_sequence_is_nan_for_that_sample_only():
    """NaN is not "infeasible": its loss and gradient stay NaN, as natively."""
    logits, targets, input_lengths, target_lengths = make_batch()
    where = torch.zeros(logits.shape, dtype=torch.bool)
    where[2, 1, 3] = True  # inside sample 1 (10 frames)
    args = (targets, input_lengths, target_lengths, 0, "none", True)
    losses, grads = [], []
    for loss_fn in (ctc_loss_differentiable, F.ctc_loss):
        log_probs = logits.log_softmax(-1).masked_fill(where, float("nan"))
        losses.append(loss_fn(log_probs, *args))
        grads.append(torch.autograd.grad(losses[-1].nansum(), logits)[0])
    others = torch.arange(6) != 1
    assert torch.isnan(losses[0][1]) and torch.isnan(losses[1][1])
    torch.testing.assert_close(losses[0][others], losses[1][others])
    assert torch.isnan(grads[0][:, 1]).any()
    torch.testing.assert_close(grads[0][:, others], grads[1][:, others])
    log_probs = logits.detach().log_softmax(-1).masked_fill(where, float("nan"))
    assert torch.isnan(ctc_loss_differentiable(log_probs, *args[:4], "mean", True))


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_plus_infinity_inside_a_sequence_is_nan_for_that_sample(kernel, monkeypatch):
    """+inf is no log-probability: like NaN, with the C kernel and without."""
    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", kernel)
    logits, targets, input_lengths, target_lengths = make_batch()
    log_probs = logits.detach().log_softmax(-1)
    log_probs[2, 1] = float("inf")  # inside sample 1, every class
    log_probs[11, 1] = float("inf")  # and past its input length (10): ignored
    loss = ctc_loss_differentiable(
        log_probs, targets, input_lengths, target_lengths, reduction="none"
    )
    assert torch.isnan(loss[1]) and torch.isfinite(loss[torch.arange(6) != 1]).all()


def test_second_derivatives_stay_finite_with_infeasible_and_padding():
    """No NaN in first or second derivatives, whatever the padded frames hold."""
    logits, targets, input_lengths, target_lengths = make_batch()
    input_lengths[3] = 5
    log_probs = logits.detach().log_softmax(-1).requires_grad_()
    padded = log_probs.detach().clone()
    padded[10:, 1] = float("nan")  # past input length 10
    padded[:, 4] = float("nan")  # input length 0
    padded.requires_grad_()
    vector = torch.randn_like(log_probs)
    results = []
    for x in [log_probs, padded]:
        loss = ctc_loss_differentiable(
            x, targets, input_lengths, target_lengths, zero_infinity=True
        )
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * vector).sum(), x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.isfinite(hvp).all() and (hvp[:, 3] == 0).all()
        results.append((loss.detach(), grad.detach(), hvp))
    torch.testing.assert_close(results[0], results[1])


def test_minus_infinity_log_probs():
    logits, targets, input_lengths, target_lengths = make_batch()
    log_probs = logits.detach().log_softmax(-1)
    log_probs[:, :, 5] = float("-inf")  # a class that no target uses
    log_probs.requires_grad_()
    args = (targets, input_lengths, target_lengths, 0, "sum")
    loss = ctc_loss_differentiable(log_probs, *args)
    torch.testing.assert_close(loss, F.ctc_loss(log_probs, *args))
    (grad,) = torch.autograd.grad(loss, log_probs, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), log_probs)
    assert torch.isfinite(grad).all() and torch.isfinite(hvp).all()


def test_half_precision_is_computed_in_float32():
    logits, targets, input_lengths, target_lengths = make_batch(torch.float32)
    log_probs = logits.detach().log_softmax(-1)
    args = (targets, input_lengths, target_lengths, 0, "none")
    loss = ctc_loss_differentiable(log_probs.half(), *args)
    assert loss.dtype == torch.float16
    ref = ctc_loss_differentiable(log_probs.half().float(), *args)
    torch.testing.assert_close(loss, ref.half())


def test_create_graph_gradient_equals_first_order_gradient():
    logits, targets, input_lengths, target_lengths = make_batch()
    args = (targets, input_lengths, target_lengths)
    loss = ctc_loss_differentiable(logits.log_softmax(-1), *args)
    (fast,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (graph,) = torch.autograd.grad(loss, logits, create_graph=True)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), fast)


@pytest.mark.parametrize("wrt", ["log_probs", "logits"])
def test_gradcheck_and_gradgradcheck(wrt):
    generator = torch.Generator().manual_seed(2)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0], [1, 1, 0], [0, 0, 0]])
    input_lengths, target_lengths = [6, 5, 4, 2], [3, 2, 2, 0]
    x = torch.randn(6, 4, 4, generator=generator, dtype=torch.float64)
    if wrt == "log_probs":
        x = x.log_softmax(-1)
    x.requires_grad_()

    def loss_fn(x):
        log_probs = x if wrt == "log_probs" else x.log_softmax(-1)
        return ctc_loss_differentiable(
            log_probs, targets, input_lengths, target_lengths, reduction="none"
        )

    assert torch.autograd.gradcheck(loss_fn, (x,))
    assert torch.autograd.gradgradcheck(loss_fn, (x,))


def reference_losses(log_probs, targets, input_lengths, target_lengths, blank):
    """Textbook CTC forward recursion, one sample at a time, in plain torch ops
    that autograd differentiates (twice): the oracle for the derivatives.

    Impossible states hold -1e4 rather than -inf (no NaN gradients); feasible
    samples with at least one frame only."""
    losses = []
    for b, (frames, length) in enumerate(zip(input_lengths, target_lengths)):
        extended = [blank]
        for label in targets[b, :length].tolist():
            extended += [label, blank]
        emissions = log_probs[:frames, b, extended]
        impossible = torch.full((2,), -1e4, dtype=log_probs.dtype)
        skip = torch.tensor(
            [
                s % 2 == 1 and s > 1 and extended[s] != extended[s - 2]
                for s in range(len(extended))
            ]
        )
        alpha = torch.cat([emissions[0, :2], impossible[:1].expand(len(extended) - 2)])
        alpha = alpha[: len(extended)]
        for t in range(1, frames):
            padded = torch.cat([impossible, alpha])
            two_back = torch.where(skip, padded[:-2], impossible[0])
            terms = torch.stack([alpha, padded[1:-1], two_back])
            alpha = terms.logsumexp(0) + emissions[t]
        losses.append(-alpha[-2:].logsumexp(0) if length else -alpha[-1])
    return torch.stack(losses)


@pytest.mark.parametrize("blank", [0, 2])
def test_second_derivatives_match_autograd_reference(blank):
    generator = torch.Generator().manual_seed(5)
    log_probs = torch.randn(9, 4, 5, generator=generator, dtype=torch.float64)
    log_probs = log_probs.log_softmax(-1).requires_grad_()
    labels = [1, 3, 4] if blank == 2 else [1, 2, 3]
    a, c, d = labels
    targets = torch.tensor([[a, c, c, d], [d, d, a, 0], [c, 0, 0, 0], [0, 0, 0, 0]])
    input_lengths, target_lengths = [9, 8, 4, 6], [4, 3, 1, 0]
    vector = torch.randn(9, 4, 5, generator=generator, dtype=torch.float64)
    # Per-sample weights that depend on the inputs too, as in a weighted loss.
    weights = torch.rand(4, generator=generator, dtype=torch.float64)
    weights.requires_grad_()
    results = []
    for loss_fn in [ctc_loss_differentiable, reference_losses]:
        args = (targets, input_lengths, target_lengths, blank)
        if loss_fn is ctc_loss_differentiable:
            args += ("none",)
        loss = (loss_fn(log_probs, *args) * weights.exp()).sum()
        grads = torch.autograd.grad(loss, (log_probs, weights), create_graph=True)
        projection = (grads[0] * vector).sum() + grads[1].pow(2).sum()
        hvps = torch.autograd.grad(projection, (log_probs, weights))
        results.append((loss.detach(), [g.detach() for g in grads], hvps))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-9)


def long_batch(regime):
    """Logits of 1000 frames, 3 utterances of 50, 35 and 20 labels, 30 classes.

    ``"aligned"``: logits that favour one alignment of each target, as a
    trained model's do; ``"uninformative"``: random logits, whose alphas reach
    -3000, where consecutive float32 numbers are 2.4e-4 apart.
    """
    generator = torch.Generator().manual_seed(7)
    frames, classes = 1000, 30
    input_lengths, target_lengths = [1000, 900, 640], [50, 35, 20]
    logits = torch.randn(frames, 3, classes, generator=generator)
    targets = torch.randint(1, classes, (3, 50), generator=generator)
    if regime == "aligned":
        for b, (length, labels) in enumerate(zip(input_lengths, target_lengths)):
            extended = torch.zeros(2 * labels + 1, dtype=torch.long)
            extended[1::2] = targets[b, :labels]
            states = torch.arange(length) * len(extended) // length
            logits[torch.arange(length), b, extended[states]] += 4.0
    vector = torch.randn(logits.shape, generator=generator)
    return logits, targets, input_lengths, target_lengths, vector


def loss_grad_and_hvp(loss_fn, logits, vector, *args):
    logits = logits.clone().requires_grad_()
    loss = loss_fn(logits.log_softmax(-1), *args).sum()
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * vector).sum(), logits)
    return loss.detach(), grad.detach(), hvp


@pytest.mark.parametrize(
    "regime, hvp_tolerance", [("aligned", 1e-3), ("uninformative", 5e-3)]
)
def test_float32_hessian_vector_product_over_1000_frames(regime, hvp_tolerance):
    """The float32 HVP through log_softmax against float64 autograd on the
    textbook recursion, relative to its norm. Uninformative logits are the
    worst case for float32 (the textbook recursion run in float32 is 1e-3 to
    2e-2 off there); the gradient is also closer than the native float32 one."""
    logits, targets, input_lengths, target_lengths, vector = long_batch(regime)
    args = (targets, input_lengths, target_lengths, 0)
    loss, grad, hvp = loss_grad_and_hvp(
        ctc_loss_differentiable, logits, vector, *args, "none"
    )
    ref_loss, ref_grad, ref_hvp = loss_grad_and_hvp(
        reference_losses, logits.double(), vector.double(), *args
    )
    native = loss_and_grad(F.ctc_loss, logits.requires_grad_(), *args, "none")

    def error(value, reference):
        return ((value.double() - reference).norm() / reference.norm()).item()

    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    assert error(hvp, ref_hvp) < hvp_tolerance
    assert error(grad, ref_grad) < min(error(native[1], ref_grad), 1e-3)


@pytest.mark.parametrize("wrt", ["log_probs", "logits"])
def test_third_derivative_fails_loudly(wrt):
    logits, targets, input_lengths, target_lengths = make_batch()
    x = logits if wrt == "logits" else logits.detach().log_softmax(-1)
    x.requires_grad_()
    log_probs = x.log_softmax(-1) if wrt == "logits" else x
    loss = ctc_loss_differentiable(log_probs, targets, input_lengths, target_lengths)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative is not implemented"):
        torch.autograd.grad(hvp.sum(), x)


def test_hessian_vector_product_of_a_linear_model():
    """Second order through a linear layer: HVP = finite difference of grads."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(15, 3, 4, generator=generator, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3], [2, 2, 0], [4, 0, 0]])
    args = (targets, [15, 12, 9], [3, 2, 1])
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    vector = torch.randn(5, 4, generator=generator, dtype=torch.float64)

    def gradient(weight, create_graph=False):
        weight = weight if create_graph else weight.detach().requires_grad_()
        log_probs = (features @ weight.T).log_softmax(-1)
        loss = ctc_loss_differentiable(log_probs, *args)
        return torch.autograd.grad(loss, weight, create_graph=create_graph)[0]

    weight.requires_grad_()
    (hvp,) = torch.autograd.grad(
        (gradient(weight, create_graph=True) * vector).sum(), weight
    )
    eps = 1e-5
    finite_difference = (
        gradient(weight + eps * vector) - gradient(weight - eps * vector)
    ) / (2 * eps)
    torch.testing.assert_close(hvp, finite_difference, rtol=1e-6, atol=1e-8)
    assert hvp.abs().max() > 1e-3


def speechbrain_batch(seed=4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 16, 6, generator=generator, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3, 3], [4, 5, 0, 0], [2, 0, 0, 0]])
    input_lens = torch.tensor([1.0, 0.75, 0.5])
    target_lens = torch.tensor([1.0, 0.5, 0.25])
    return logits.requires_grad_(), targets, input_lens, target_lens


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch", "batchmean", "none"])
def test_speechbrain_wrapper_matches_speechbrain(reduction):
    logits, targets, input_lens, target_lens = speechbrain_batch()
    input_lens[2] = 0.125  # 2 frames for 1 label: fine; then infeasible below
    targets[2, :2] = torch.tensor([2, 2])
    target_lens[2] = 0.5  # [2, 2] needs 3 frames: zeroed by zero_infinity
    args = (targets, input_lens, target_lens, 0, reduction)
    loss, grad = loss_and_grad(ctc_loss, logits, *args)
    native = speechbrain.nnet.losses.ctc_loss
    ref_loss, ref_grad = loss_and_grad(native, logits, *args)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def double_backward_of_speechbrain_ctc(logits, targets, input_lens, target_lens):
    log_probs = logits.log_softmax(-1)
    loss = speechbrain.nnet.losses.ctc_loss(
        log_probs, targets, input_lens, target_lens, blank_index=0
    )
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    return torch.autograd.grad(grad.pow(2).sum(), logits)[0]


def uses_native_ctc(loss):
    """Whether the autograd graph of ``loss`` holds the native CTC's node."""
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "CtcLossBackward0":
            return True
        pending.extend(function for function, _ in node.next_functions)
    return False


def torch_ctc_loss(batch, loss_fn=None):
    """``torch.nn.CTCLoss`` (or ``loss_fn``) on a SpeechBrain-style batch."""
    logits, targets, input_lens, target_lens = batch
    loss_fn = loss_fn or torch.nn.CTCLoss()
    frames = (input_lens * logits.shape[1]).round().int()
    labels = (target_lens * targets.shape[1]).round().int()
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    return loss_fn(log_probs, targets, frames, labels)


def test_context_manager_makes_speechbrain_ctc_twice_differentiable():
    batch = speechbrain_batch()
    native = F.ctc_loss
    with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD):
        double_backward_of_speechbrain_ctc(*batch)
    assert uses_native_ctc(torch_ctc_loss(batch))
    with twice_differentiable_ctc():
        # A dispatcher that wraps the native function (same name and doc)
        assert F.ctc_loss.__wrapped__ is native
        assert F.ctc_loss.__name__ == "ctc_loss"
        hvp = double_backward_of_speechbrain_ctc(*batch)
        # torch.nn.CTCLoss looks the function up at call time as well
        loss = torch_ctc_loss(batch)
        assert not uses_native_ctc(loss)
        torch.testing.assert_close(loss, torch_ctc_loss(batch, native))
    assert F.ctc_loss is native
    assert uses_native_ctc(torch_ctc_loss(batch))
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
    with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD):
        double_backward_of_speechbrain_ctc(*batch)


def test_context_manager_restores_after_exception_and_when_nested():
    native = F.ctc_loss
    batch = speechbrain_batch()
    with pytest.raises(ValueError, match="inside"):
        with twice_differentiable_ctc():
            raise ValueError("inside")
    assert F.ctc_loss is native
    with twice_differentiable_ctc():
        with twice_differentiable_ctc():
            assert not uses_native_ctc(torch_ctc_loss(batch))
        # not restored too early
        assert not uses_native_ctc(torch_ctc_loss(batch))
        double_backward_of_speechbrain_ctc(*batch)
    assert F.ctc_loss is native
    assert uses_native_ctc(torch_ctc_loss(batch))


def test_yaml_choice_is_twice_differentiable_without_any_patch(monkeypatch):
    """``ctc_cost: !name:speechbrain_meta.ctc.ctc_loss`` needs no context and
    never goes through torch.nn.functional.ctc_loss."""
    hparams = load_hyperpyyaml(
        "blank_index: 0\n"
        "ctc_cost: !name:speechbrain_meta.ctc.ctc_loss\n"
        "    blank_index: !ref <blank_index>\n"
    )
    batch = speechbrain_batch()
    logits, targets, input_lens, target_lens = batch
    native_loss = speechbrain.nnet.losses.ctc_loss(
        logits.log_softmax(-1), targets, input_lens, target_lens, blank_index=0
    )
    with twice_differentiable_ctc():
        reference_hvp = double_backward_of_speechbrain_ctc(*batch)

    def tripwire(*args, **kwargs):
        raise AssertionError("torch.nn.functional.ctc_loss was called")

    monkeypatch.setattr(F, "ctc_loss", tripwire)
    loss = hparams["ctc_cost"](logits.log_softmax(-1), targets, input_lens, target_lens)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), logits)
    assert F.ctc_loss is tripwire
    torch.testing.assert_close(loss, native_loss)
    torch.testing.assert_close(hvp, reference_hvp)


def test_invalid_arguments_are_rejected():
    logits, targets, input_lengths, target_lengths = make_batch()
    log_probs = logits.log_softmax(-1)
    args = (targets, input_lengths, target_lengths)
    with pytest.raises(ValueError, match="reduction"):
        ctc_loss_differentiable(log_probs, *args, reduction="average")
    with pytest.raises(ValueError, match="blank"):
        ctc_loss_differentiable(log_probs, *args, blank=6)
    with pytest.raises(ValueError, match="input_lengths"):
        ctc_loss_differentiable(log_probs, targets, input_lengths + 1, target_lengths)
    with pytest.raises(ValueError, match="target_lengths"):
        ctc_loss_differentiable(log_probs, targets, input_lengths, target_lengths + 1)


def test_compiled_time_loops_equal_the_python_loops():
    """The TorchScript-compiled recursions compute exactly what the Python
    loops do (float32 and float64)."""
    from speechbrain_meta import ctc_tensors

    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        emissions = torch.randn(30, 14, generator=generator, dtype=dtype)
        skip = torch.randn(12, generator=generator, dtype=dtype)
        start = torch.randn(14, generator=generator, dtype=dtype)
        weights = torch.rand(3, 29, 12, generator=generator, dtype=dtype)
        for compiled, inputs in (
            (ctc_tensors._alpha_recursion, (emissions, skip, start)),
            (ctc_tensors._prefix_sums, (weights, emissions)),
        ):
            assert torch.equal(compiled(*inputs), compiled.python(*inputs))


def second_order_values(**batch):
    """Loss, gradient and a Hessian-vector product of the corner-case batch."""
    logits, targets, input_lengths, target_lengths = make_batch(**batch)
    log_probs = logits.log_softmax(-1).detach().requires_grad_()
    loss = ctc_loss_differentiable(log_probs, targets, input_lengths, target_lengths)
    (grad,) = torch.autograd.grad(loss, log_probs, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.cos(log_probs)).sum(), log_probs)
    return loss, grad, hvp


def test_the_loops_run_in_python_where_torchscript_fails(monkeypatch):
    from speechbrain_meta import ctc_tensors

    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", "0")  # the tensor loops
    compiled = second_order_values()
    scripted = []

    def unavailable(function):
        scripted.append(function)
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", unavailable)
    loops = (ctc_tensors._alpha_loop, ctc_tensors._prefix_sum_loop)
    for name, loop in zip(("_alpha_recursion", "_prefix_sums"), loops):
        monkeypatch.setattr(ctc_tensors, name, ctc_tensors._compiled(loop))
    in_python = second_order_values()
    assert scripted == list(loops)  # tried, once each
    for value, expected in zip(in_python, compiled):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def realistic_second_order_values(dtype):
    """Per-sample losses, gradient and a Hessian-vector product of a random
    batch of realistic sizes (repeated labels, an empty target)."""
    generator = torch.Generator().manual_seed(5)
    frames, batch, classes, labels = 90, 5, 30, 25
    log_probs = torch.randn(frames, batch, classes, generator=generator)
    log_probs = (3 * log_probs).log_softmax(-1).to(dtype).requires_grad_()
    targets = torch.randint(1, classes, (batch, labels), generator=generator)
    targets[0, 5:8] = 7
    input_lengths = torch.tensor([90, 80, 70, 60, 55])
    target_lengths = torch.tensor([25, 20, 25, 10, 0])
    vector = torch.randn(log_probs.shape, generator=generator).to(dtype)
    loss = ctc_loss_differentiable(
        log_probs, targets, input_lengths, target_lengths, reduction="none"
    )
    (grad,) = torch.autograd.grad(loss.sum(), log_probs, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * vector).sum(), log_probs)
    return loss.detach(), grad.detach(), hvp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_c_kernel_computes_what_the_tensor_operations_do(dtype, monkeypatch):
    """ctc_loops.c, built with the system's compiler: the loss, gradient and
    Hessian-vector product on a batch of realistic sizes, against the tensor
    operations in float64: to 1e-10 in float64, and in float32 as closely as
    the tensor operations themselves come (4e-5 of the largest value for
    the Hessian-vector product; 9e-5 were the kernel to add alphas and betas
    before taking their maxima out)."""
    from speechbrain_meta import ctc_kernel

    assert ctc_kernel.compiler() is not None, "the project's set-up installs one"
    kernel = ctc_kernel.kernel()
    assert kernel is not None and kernel.accepts(torch.zeros(1, 1, 1, dtype=dtype))
    compiled = realistic_second_order_values(dtype)
    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", "0")
    reference = realistic_second_order_values(torch.float64)
    tolerance = 6e-5 if dtype == torch.float32 else 1e-10
    for value, expected in zip(compiled, reference):
        scale = expected.abs().max()
        torch.testing.assert_close(
            value.double(), expected, rtol=0, atol=tolerance * scale
        )


def test_the_c_kernel_reads_strided_inputs(monkeypatch):
    """Batch-first log-probabilities seen as (T, B, C) and the expanded
    cotangent that ``sum()`` sends back: the kernel reads them through their
    strides, without copies, as the tensor operations do."""
    logits, targets, input_lengths, target_lengths = make_batch()
    batch_first = logits.detach().transpose(0, 1).contiguous().requires_grad_()

    def values():
        log_probs = batch_first.log_softmax(-1).transpose(0, 1)
        loss = ctc_loss_differentiable(
            log_probs, targets, input_lengths, target_lengths
        )
        (grad,) = torch.autograd.grad(loss, batch_first, create_graph=True)
        (hvp,) = torch.autograd.grad(grad.sum(), batch_first)
        return loss, grad, hvp

    compiled = values()
    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", "0")
    for value, expected in zip(compiled, values()):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_a_label_outside_the_classes_is_an_error(kernel, monkeypatch):
    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", kernel)
    log_probs = torch.randn(10, 2, 5).log_softmax(-1)
    for label in (5, -1):
        targets = torch.tensor([[1, 2], [3, label]])
        with pytest.raises(ValueError, match="class indices below 5"):
            ctc_loss_differentiable(log_probs, targets, [10, 10], [2, 2])
    # past the target's length, the padding may hold anything
    targets = torch.tensor([[1, 2], [3, 99]])
    assert torch.isfinite(ctc_loss_differentiable(log_probs, targets, [10, 10], [2, 1]))


def test_the_loss_is_the_same_with_and_without_the_c_kernel(monkeypatch):
    with_kernel = second_order_values()
    monkeypatch.setenv("SPEECHBRAIN_META_CTC_KERNEL", "0")
    for value, expected in zip(with_kernel, second_order_values()):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_without_a_compiler_the_tensor_loops_run(monkeypatch, tmp_path):
    from speechbrain_meta import ctc_kernel

    expected = second_order_values()
    monkeypatch.setattr(ctc_kernel, "compiler", lambda: None)
    monkeypatch.setattr(ctc_kernel, "_LOADED", [])
    monkeypatch.setenv("SPEECHBRAIN_META_CACHE", str(tmp_path))
    assert ctc_kernel.kernel() is None
    assert list(tmp_path.iterdir()) == []
    for value, reference in zip(second_order_values(), expected):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)


def test_a_failed_build_leaves_no_file_and_a_rebuild_reuses_it(monkeypatch, tmp_path):
    from speechbrain_meta import ctc_kernel

    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert ctc_kernel.build(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("CC")
    built = ctc_kernel.build(tmp_path)
    assert built is not None and [p.name for p in tmp_path.iterdir()] == [built.name]
    assert ctc_kernel.build(tmp_path) == built
    assert built.stat().st_mtime_ns == ctc_kernel.build(tmp_path).stat().st_mtime_ns


def test_the_kernel_follows_the_instruction_set_torch_is_pinned_to(
    monkeypatch, tmp_path
):
    """cpu_isa sets ATEN_CPU_CAPABILITY for the same results on every
    machine: the kernel is then built for that set, not for this CPU."""
    from speechbrain_meta import ctc_kernel

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert "-march=native" in ctc_kernel.flags()[0]
    native = ctc_kernel.build(tmp_path)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert ctc_kernel.flags()[0][-2:] == ["-mavx2", "-mfma"]
    assert "-march=native" not in ctc_kernel.flags()[0]
    pinned = ctc_kernel.build(tmp_path)
    assert native is not None and pinned is not None and pinned != native


def test_a_library_that_does_not_load_leaves_the_tensor_loops(monkeypatch, tmp_path):
    from speechbrain_meta import ctc_kernel

    broken = tmp_path / "broken.so"
    broken.write_text("not a shared library")
    monkeypatch.setattr(ctc_kernel, "build", lambda folder: broken)
    monkeypatch.setattr(ctc_kernel, "_LOADED", [])
    assert ctc_kernel.kernel() is None


def test_loading_the_c_kernel_keeps_subnormal_numbers(tmp_path):
    """Linked without fast math: loading it does not switch on flush-to-zero
    for the whole process (GCC's crtfastmath.o would)."""
    import subprocess
    import sys

    code = (
        "import torch; from speechbrain_meta import ctc_kernel\n"
        "assert ctc_kernel.kernel() is not None\n"
        "print((torch.tensor([1e-39]) * 1.0).item() > 0)"
    )
    env = {**__import__("os").environ, "SPEECHBRAIN_META_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"

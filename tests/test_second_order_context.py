"""What second_order_context and fast_weight_context touch, and in which
thread."""

import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import speechbrain.nnet.losses
import torch
import torch.nn.functional as F
from test_ctc import NO_DOUBLE_BACKWARD, speechbrain_batch, uses_native_ctc
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from speechbrain_meta import ctc
from speechbrain_meta.inner_loop import fast_weight_context, second_order_context

RNN_KERNELS = {torch.nn.GRU: "gru", torch.nn.LSTM: "lstm", torch.nn.RNN: "rnn_tanh"}
FLASH = "ScaledDotProductFlashAttentionForCpuBackward0"
TIMEOUT = 30  # seconds to wait for the other thread


class CudnnAtEachCall(TorchFunctionMode):
    """Records ``torch.backends.cudnn.enabled`` when each torch function is
    called (in this thread only), where the kernels are chosen."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.seen.setdefault(name, set()).add(torch.backends.cudnn.enabled)
        return func(*args, **(kwargs or {}))


def cudnn_seen_by(rnn_class):
    """cuDNN's flag as a Conv1d and a recurrent layer see it, by kernel."""
    conv, rnn = torch.nn.Conv1d(3, 3, 3), rnn_class(3, 4)
    with CudnnAtEachCall() as mode:
        rnn(conv(torch.randn(1, 3, 8)).permute(2, 0, 1))
    return mode.seen["conv1d"], mode.seen[RNN_KERNELS[rnn_class]]


def attention_backward_name():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    return F.scaled_dot_product_attention(q, q, q).grad_fn.name()


def patched_attributes():
    """The attributes that the contexts may patch, and cuDNN's and SDPA's
    process-wide flags."""
    return (
        F.ctc_loss,
        F.scaled_dot_product_attention,
        torch.nn.RNNBase.flatten_parameters,
        *(vars(rnn)["forward"] for rnn in RNN_KERNELS),
        torch.backends.cudnn.enabled,
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )


def ctc_args(batch):
    """torch.nn.functional.ctc_loss's arguments for a SpeechBrain-style batch."""
    logits, targets, input_lens, target_lens = batch
    frames = (input_lens * logits.shape[1]).round().long()
    labels = (target_lens * targets.shape[1]).round().long()
    return logits.log_softmax(-1).transpose(0, 1), targets, frames, labels


def fast_gru():
    """A GRU whose weights carry autograd history, as functional_call's."""
    gru = torch.nn.GRU(3, 4)
    for name, parameter in list(gru.named_parameters()):
        delattr(gru, name)
        setattr(gru, name, parameter * 1.0)
    return gru


@pytest.fixture
def fast_switching():
    """Switch threads as often as possible, for the races to show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("rnn_class", list(RNN_KERNELS))
def test_cudnn_is_off_for_recurrent_forwards_only(rnn_class, cudnn):
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = cudnn
    try:
        assert cudnn_seen_by(rnn_class) == ({cudnn}, {cudnn})
        with second_order_context():
            assert cudnn_seen_by(rnn_class) == ({cudnn}, {False})
            assert torch.backends.cudnn.enabled is cudnn
        assert cudnn_seen_by(rnn_class) == ({cudnn}, {cudnn})
    finally:
        torch.backends.cudnn.enabled = enabled


class GruCtc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(6, 5, batch_first=True)
        self.out = torch.nn.Linear(5, 6)

    def forward(self, features):
        return self.out(self.rnn(features)[0]).log_softmax(-1)


def meta_gradient(loss_fn):
    """d query loss / d theta after one SGD step on the support loss, the
    model called with fast weights as the meta-learners do."""
    torch.manual_seed(0)
    model = GruCtc().double()
    theta = dict(model.named_parameters())

    def loss(weights, seed):
        features, targets, input_lens, target_lens = speechbrain_batch(seed)
        with fast_weight_context():
            log_probs = functional_call(model, weights, (features.detach(),))
        return loss_fn(log_probs, targets, input_lens, target_lens, 0)

    grads = torch.autograd.grad(loss(theta, 1), list(theta.values()), create_graph=True)
    fast = {name: p - 0.5 * g for (name, p), g in zip(theta.items(), grads)}
    return torch.autograd.grad(loss(fast, 2), list(theta.values()))


def test_second_order_through_a_gru_and_speechbrain_ctc():
    with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD):
        meta_gradient(speechbrain.nnet.losses.ctc_loss)
    with second_order_context():
        grads = meta_gradient(speechbrain.nnet.losses.ctc_loss)
    # the same with speechbrain_meta.ctc.ctc_loss, as chosen in a YAML: no context
    torch.testing.assert_close(grads, meta_gradient(ctc.ctc_loss))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_second_order_through_multihead_attention():
    """torch.nn.MultiheadAttention looks scaled_dot_product_attention up at
    call time: the context puts it on the math backend, which has a double
    backward (the fused CPU kernel has none)."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(4, 2)
    x = torch.randn(5, 1, 4, requires_grad=True)

    def hvp():
        y = attention(x, x, x, need_weights=False)[0]
        (grad,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.sum(), x)[0]

    with pytest.raises(RuntimeError, match="flash_attention.*not implemented"):
        hvp()
    with second_order_context():
        result = hvp()
    assert torch.isfinite(result).all() and result.abs().sum() > 0


def test_contexts_are_reentrant_and_restore_everything():
    before = patched_attributes()
    batch = speechbrain_batch()
    with second_order_context():
        with second_order_context(), fast_weight_context():
            assert not uses_native_ctc(F.ctc_loss(*ctc_args(batch)))
        # the outer context is still in force
        assert not uses_native_ctc(F.ctc_loss(*ctc_args(batch)))
        assert cudnn_seen_by(torch.nn.GRU)[1] == {False}
        assert attention_backward_name() != FLASH
        with pytest.raises(ValueError, match="inside"):
            with second_order_context(), fast_weight_context():
                raise ValueError("inside")
        assert not uses_native_ctc(F.ctc_loss(*ctc_args(batch)))
    after = patched_attributes()
    assert all(a is b for a, b in zip(after, before)), (before, after)
    assert uses_native_ctc(F.ctc_loss(*ctc_args(batch)))
    assert attention_backward_name() == FLASH
    # nothing is left for TorchScript to trip over
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(torch.nn.CTCLoss())
    torch.testing.assert_close(scripted(*ctc_args(batch)), F.ctc_loss(*ctc_args(batch)))


def test_other_threads_keep_the_originals_meanwhile(monkeypatch):
    """While one thread is inside both contexts, another one gets native CTC,
    cuDNN for its RNN (outside the first one's recurrent forwards), fused
    attention and flatten_parameters on its fast weights; then the first
    thread, still inside, gets the replacements."""
    flattened = []
    native_flatten = torch.nn.RNNBase.flatten_parameters

    def flatten_spy(rnn):
        if any(w.grad_fn is not None for w in rnn._flat_weights):
            flattened.append(threading.get_ident())
        native_flatten(rnn)

    monkeypatch.setattr(torch.nn.RNNBase, "flatten_parameters", flatten_spy)
    batch = speechbrain_batch()
    native_ctc = F.ctc_loss
    inside, outside_done = threading.Event(), threading.Event()

    def observe():
        gru = fast_gru()
        gru.flatten_parameters()
        return {
            "native ctc": uses_native_ctc(F.ctc_loss(*ctc_args(batch))),
            "cudnn in gru": cudnn_seen_by(torch.nn.GRU)[1],
            "attention": attention_backward_name() == FLASH,
            "fast weights flattened": threading.get_ident() in flattened,
        }

    def inside_thread():
        with second_order_context(), fast_weight_context():
            inside.set()
            assert outside_done.wait(TIMEOUT)
            return observe()

    def outside_thread():
        assert inside.wait(TIMEOUT)
        try:
            # the dispatcher is in place, for this thread too
            assert F.ctc_loss is not native_ctc
            assert F.ctc_loss.__wrapped__ is native_ctc
            return observe()
        finally:
            outside_done.set()

    with ThreadPoolExecutor(2) as pool:
        inside_result = pool.submit(inside_thread)
        outside_result = pool.submit(outside_thread)
        inside_result, outside_result = inside_result.result(), outside_result.result()
    assert outside_result == {
        "native ctc": True,
        "cudnn in gru": {True},
        "attention": True,
        "fast weights flattened": True,
    }
    assert inside_result == {
        "native ctc": False,
        "cudnn in gru": {False},
        "attention": False,
        "fast weights flattened": False,
    }


def test_ctc_loss_replacement_is_thread_safe(fast_switching):
    """One thread enters and leaves second_order_context over and over while
    another calls torch.nn.functional.ctc_loss outside: each always gets its
    own loss."""
    batch = speechbrain_batch()
    native = F.ctc_loss
    reference = F.ctc_loss(*ctc_args(batch)).detach()
    started, stop = threading.Event(), threading.Event()

    def inside_thread():
        results = []
        try:
            for _ in range(300):
                with second_order_context():
                    started.set()
                    with second_order_context():
                        loss = F.ctc_loss(*ctc_args(batch))
                    results.append(uses_native_ctc(loss))
                    torch.testing.assert_close(loss.detach(), reference)
        finally:
            stop.set()
        return results

    def outside_thread():
        assert started.wait(TIMEOUT)
        results, dispatched = [], 0
        while not stop.is_set():
            dispatched += F.ctc_loss is not native
            loss = F.ctc_loss(*ctc_args(batch))
            results.append(uses_native_ctc(loss) and torch.equal(loss, reference))
        return results, dispatched

    with ThreadPoolExecutor(2) as pool:
        inside = pool.submit(inside_thread)
        outside = pool.submit(outside_thread)
        inside, (outside, dispatched) = inside.result(), outside.result()
    assert not any(inside)
    assert outside and all(outside)
    assert dispatched > 0  # the outside calls did overlap the contexts
    assert F.ctc_loss is native


def test_flatten_parameters_replacement_is_thread_safe(monkeypatch, fast_switching):
    """One thread flattens fast and leaf weights in and out of
    fast_weight_context, another fast weights outside: only the first
    thread's fast weights are left alone."""
    calls = []
    native_flatten = torch.nn.RNNBase.flatten_parameters

    def flatten_spy(rnn):
        fast = any(w.grad_fn is not None for w in rnn._flat_weights)
        calls.append((threading.get_ident(), fast))
        native_flatten(rnn)

    monkeypatch.setattr(torch.nn.RNNBase, "flatten_parameters", flatten_spy)
    started, stop = threading.Event(), threading.Event()

    def inside_thread():
        fast, leaf = fast_gru(), torch.nn.GRU(3, 4)
        calls.clear()  # the GRUs' constructors flatten too
        try:
            for _ in range(3000):
                with fast_weight_context():
                    started.set()
                    with fast_weight_context():
                        fast.flatten_parameters()
                    leaf.flatten_parameters()
        finally:
            stop.set()
        return threading.get_ident()

    def outside_thread():
        gru = fast_gru()
        assert started.wait(TIMEOUT)
        count = 0
        while not stop.is_set():
            gru.flatten_parameters()
            count += 1
        return threading.get_ident(), count

    with ThreadPoolExecutor(2) as pool:
        inside = pool.submit(inside_thread)
        outside = pool.submit(outside_thread)
        inside, (outside, count) = inside.result(), outside.result()
    assert calls.count((inside, False)) == 3000  # leaf weights: flattened
    assert calls.count((inside, True)) == 0  # fast weights: left alone
    assert calls.count((outside, True)) >= count > 0
    assert torch.nn.RNNBase.flatten_parameters is flatten_spy


def test_concurrent_second_order_threads_restore_the_flags(fast_switching):
    """Two threads in second_order_context, recurrent and attention calls
    interleaved: cuDNN and the attention backends end up as they were (saving
    and restoring them around each call would leave them switched off)."""
    before = patched_attributes()
    gru, barrier = torch.nn.GRU(3, 4), threading.Barrier(2, timeout=TIMEOUT)

    def worker():
        barrier.wait()
        seen = set()
        for _ in range(200):
            with second_order_context():
                with CudnnAtEachCall() as mode:
                    gru(torch.randn(4, 1, 3))
                seen |= mode.seen["gru"]
                assert attention_backward_name() != FLASH
        return seen

    with ThreadPoolExecutor(2) as pool:
        results = [pool.submit(worker) for _ in range(2)]
        assert [result.result() for result in results] == [{False}, {False}]
    after = patched_attributes()
    assert all(a is b for a, b in zip(after, before)), (before, after)

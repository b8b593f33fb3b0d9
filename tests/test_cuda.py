"""What only a CUDA device can check (marker ``cuda``; skipped without one).

Second order through cuDNN-capable layers (cuDNN RNNs switched off by
``second_order_context``), attention on the math backend, bf16 meta-steps,
recomputed inner steps replaying the CUDA random state, and the
twice-differentiable CTC against PyTorch's native CUDA loss. Each compares the
GPU with the CPU on the same float64 (or float32) inputs.

    pytest -m cuda            # what benchmarks/gpu_check.py runs
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_algorithms import (
    TinyCTC,
    bf16_meta_step,
    ctc_task,
    make_brain,
    speech_like_net,
)
from test_inner_checkpoint import DropoutCTC

from speechbrain_meta import MAML, Task
from speechbrain_meta.ctc import ctc_loss_differentiable
from speechbrain_meta.inner_loop import second_order_context

DEVICE = "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def on(device, task):
    """The task's tensors on ``device``."""
    move = lambda batch: tuple(t.to(device) for t in batch)  # noqa: E731
    return Task(task.name, move(task.support), move(task.query))


def meta_gradient(recipe, net, task, device, seed=0, **hparams):
    """The meta-gradient of one task on ``device``, as CPU tensors."""
    brain = make_brain(MAML, recipe, net=copy.deepcopy(net), **hparams)
    brain.device = device
    brain.modules.to(device)
    brain.modules.zero_grad()
    torch.manual_seed(seed)
    brain.task_step(on(device, task))
    return [p.grad.cpu() for p in brain.modules.parameters()]


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_through_conv_layernorm_gru_and_ctc_matches_cpu(steps):
    """The default model's layers: cuDNN convolutions, the GRU without cuDNN."""
    net, task = speech_like_net(), ctc_task(1)
    cpu = meta_gradient(TinyCTC, net, task, "cpu", inner_steps=steps)
    gpu = meta_gradient(TinyCTC, net, task, DEVICE, inner_steps=steps)
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g, c, rtol=1e-7, atol=1e-10)


def test_second_order_attention_runs_on_the_math_backend_and_matches_cpu():
    """float32, where CUDA would pick a fused kernel (no double backward)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 16, 8, generator=generator)
    vector = torch.randn(2, 4, 16, 8, generator=generator)

    def hessian_vector_product(device, dtype):
        q = query.to(device, dtype).requires_grad_()
        fused = F.scaled_dot_product_attention(q, q.tanh(), q.sin()).grad_fn.name()
        assert fused.startswith("ScaledDotProduct")  # no double backward
        with second_order_context():
            out = F.scaled_dot_product_attention(q, q.tanh(), q.sin())
            assert not out.grad_fn.name().startswith("ScaledDotProduct")
            (grad,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
            (hvp,) = torch.autograd.grad((grad * vector.to(device, dtype)).sum(), q)
        return hvp.double().cpu()

    torch.testing.assert_close(
        hessian_vector_product(DEVICE, torch.float32),
        hessian_vector_product("cpu", torch.float32).double(),
        rtol=1e-3,
        atol=1e-4,
    )


def test_bf16_second_order_meta_step_on_cuda():
    bf16_meta_step(MAML, DEVICE, inner_steps=2)


@pytest.mark.parametrize("steps", [1, 3])
def test_checkpointed_inner_steps_replay_the_cuda_random_state(steps):
    net, task = speech_like_net(), ctc_task(1)
    plain = meta_gradient(DropoutCTC, net, task, DEVICE, inner_steps=steps)
    checkpointed = meta_gradient(
        DropoutCTC, net, task, DEVICE, inner_steps=steps, checkpoint_inner_steps=True
    )
    for g, c in zip(checkpointed, plain):
        torch.testing.assert_close(g, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_differentiable_ctc_matches_native_cuda_loss(dtype):
    generator = torch.Generator().manual_seed(0)
    frames, batch, classes, labels = 120, 6, 30, 35
    logits = torch.randn(frames, batch, classes, generator=generator)
    targets = torch.randint(1, classes, (batch, labels), generator=generator)
    input_lengths = torch.tensor([120, 110, 100, 90, 80, 75])
    target_lengths = torch.tensor([35, 30, 30, 20, 10, 1])
    vector = torch.randn(frames, batch, classes, generator=generator)

    def loss_grad(loss_fn, device):
        x = logits.to(device, dtype).requires_grad_()
        loss = loss_fn(
            x.log_softmax(-1),
            targets.to(device),
            input_lengths.to(device),
            target_lengths.to(device),
        )
        (grad,) = torch.autograd.grad(loss, x, create_graph=loss_fn is not F.ctc_loss)
        return x, loss, grad

    _, native, native_grad = loss_grad(F.ctc_loss, DEVICE)
    x, ours, grad = loss_grad(ctc_loss_differentiable, DEVICE)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours, native, **tolerance)
    torch.testing.assert_close(grad, native_grad, **tolerance)
    (hvp,) = torch.autograd.grad((grad * vector.to(DEVICE, dtype)).sum(), x)
    cpu_x, _, cpu_grad = loss_grad(ctc_loss_differentiable, "cpu")
    (cpu_hvp,) = torch.autograd.grad((cpu_grad * vector.to(dtype)).sum(), cpu_x)
    torch.testing.assert_close(hvp.cpu(), cpu_hvp, **tolerance)

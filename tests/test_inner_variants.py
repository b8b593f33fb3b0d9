"""Inner-loop variants: partial inner loops (ANIL), frozen parameters, adapters,
learnt inner rates (Meta-SGD, LSLR) and the multi-step loss."""

import copy

import pytest
import torch
from speechbrain.nnet.adapters import AdaptedModel, LoRA
from speechbrain.utils.checkpoints import Checkpointer
from test_algorithms import INNER_LR, Regression, regression_task
from torch.func import functional_call

from speechbrain_meta import FOMAML, MAML, MetaBatch, MultiTask, Reptile
from speechbrain_meta.errors import SetupError
from speechbrain_meta.inner_rates import InnerRates

ALGORITHMS = [MAML, FOMAML, Reptile, MultiTask]


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def brain_of(algorithm, modules=None, opt_class=None, **hparams):
    brain = type("Brain", (Regression, algorithm), {})(
        modules or {"net": net()},
        opt_class=opt_class or (lambda params: torch.optim.SGD(params, lr=1.0)),
        hparams={"inner_lr": INNER_LR, **hparams},
        run_opts={"max_grad_norm": 1e9},
    )
    brain.init_optimizers()
    return brain


def adapted_query_loss(brain, task, theta, log_rates=None):
    """The query loss after the inner loop, by hand, for finite differences.

    ``theta``: every parameter by name; ``log_rates``: name -> (steps, ...)
    log-rates, or None for ``inner_lr``.
    """
    model = brain.modules.net

    def loss(params, batch):
        names = {n[len("net.") :]: p for n, p in params.items()}
        return ((functional_call(model, names, (batch[0],)) - batch[1]) ** 2).mean()

    params = dict(theta)
    for step in range(brain.inner_steps):
        fast = {n: params[n].detach().requires_grad_() for n in brain.fast_weight_names}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss({**params, **fast}, task.support), [
                fast[n] for n in brain.fast_weight_names
            ])  # fmt: skip
        for name, grad in zip(brain.fast_weight_names, grads):
            if log_rates is None:
                rate = INNER_LR
            else:
                rates = log_rates[name]
                rate = rates[min(step, rates.shape[0] - 1)].exp()
            params[name] = params[name] - rate * grad
    return loss(params, task.query)


def finite_differences(function, tensors, eps=1e-6):
    """d function / d tensors (a dict of float64 tensors), entry by entry."""
    grads = {}
    for name, tensor in tensors.items():
        grad = torch.zeros_like(tensor)
        for index in range(tensor.numel()):
            values = {}
            for sign in (1, -1):
                shifted = {n: t.clone() for n, t in tensors.items()}
                shifted[name].view(-1)[index] += sign * eps
                values[sign] = function(shifted)
            grad.view(-1)[index] = (values[1] - values[-1]) / (2 * eps)
        grads[name] = grad
    return grads


def theta_of(brain):
    return {n: p.detach().clone() for n, p in brain.meta_parameters().items()}


@pytest.mark.parametrize("steps", [1, 2])
def test_partial_inner_loop_meta_gradient_matches_finite_differences(steps):
    """ANIL: the head adapts, the body learns through the adapted head."""
    brain = brain_of(MAML, inner_params=["net.2"], inner_steps=steps)
    assert brain.fast_weight_names == ["net.2.weight", "net.2.bias"]
    task = regression_task(4)
    brain.task_step(task)
    expected = finite_differences(
        lambda theta: adapted_query_loss(brain, task, theta), theta_of(brain)
    )
    for name, p in brain.meta_parameters().items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mode", ["tensor", "element", "layer_step"])
def test_learnt_rates_meta_gradient_matches_finite_differences(steps, mode):
    brain = brain_of(MAML, inner_steps=steps, learn_inner_lr=mode)
    brain.inner_rates.double()
    with torch.no_grad():  # rates that differ per tensor, element and step
        for i, log_rate in enumerate(brain.inner_rates.log_rates):
            log_rate.add_(0.1 * torch.randn(log_rate.shape).double() + 0.05 * i)
    task = regression_task(5)
    brain.task_step(task)
    theta = theta_of(brain)
    names = brain.inner_rates.names
    log_rates = {
        n: r.detach().clone() for n, r in zip(names, brain.inner_rates.log_rates)
    }
    expected = finite_differences(
        lambda rates: adapted_query_loss(brain, task, theta, rates), log_rates
    )
    for name, log_rate in zip(names, brain.inner_rates.log_rates):
        torch.testing.assert_close(log_rate.grad, expected[name], rtol=1e-6, atol=1e-9)
    expected = finite_differences(
        lambda theta: adapted_query_loss(brain, task, theta, log_rates), theta
    )
    for name, p in brain.meta_parameters().items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-9)


def test_the_inner_loop_adapts_only_the_inner_params():
    brain = brain_of(MAML, inner_params=["net.2"])
    before = copy.deepcopy(brain.modules.state_dict())
    adapted = brain.inner_loop(regression_task(6).support, 2, INNER_LR)
    assert set(adapted.parameters) == {"net.2.weight", "net.2.bias"}
    for name, value in brain.modules.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_frozen_parameters_stay_bit_identical_through_training(algorithm):
    brain = brain_of(
        algorithm,
        opt_class=lambda params: torch.optim.Adam(params, weight_decay=0.1),
        meta_params=["net.2"],
        inner_params=["net.2"],
    )
    body = copy.deepcopy(brain.modules.net[0].state_dict())
    head = copy.deepcopy(brain.modules.net[2].state_dict())
    for seed in range(3):
        brain.fit_batch(MetaBatch([regression_task(seed), regression_task(seed + 9)]))
    for name, value in brain.modules.net[0].state_dict().items():
        assert torch.equal(value, body[name]), name
    assert any(
        not torch.equal(value, head[name])
        for name, value in brain.modules.net[2].state_dict().items()
    )


def test_bad_parameter_selections_are_refused():
    with pytest.raises(SetupError, match="inner_params pattern 'nett.2'"):
        brain_of(MAML, inner_params=["nett.2"])
    with pytest.raises(SetupError, match="inner_params select frozen parameters"):
        brain_of(MAML, inner_params=["net.0"], meta_params=["net.2"])
    with pytest.raises(SetupError, match="learn_inner_lr needs MAML or FOMAML"):
        brain_of(Reptile, learn_inner_lr="tensor")
    with pytest.raises(SetupError, match="learn_inner_lr must be one of"):
        brain_of(MAML, learn_inner_lr="per_parameter")


def lora_modules():
    """A two-layer model whose first layer gets a LoRA adapter (base frozen)."""
    model = net()
    adapted = AdaptedModel(model, LoRA, target_layers=["0"], adapter_kwargs={"rank": 2})
    adapted.double()
    return {"net": model}, adapted


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_adapters_adapt_and_the_base_stays_as_configured(algorithm):
    modules, _ = lora_modules()
    base = {n: p.detach().clone() for n, p in modules["net"].named_parameters()}
    adapters_and_head = ["*adapter*", "net.2"]
    brain = brain_of(
        algorithm,
        modules,
        inner_params=adapters_and_head,
        meta_params=adapters_and_head,  # AdaptedModel froze everything
        inner_lr=0.5,
    )
    assert set(brain.meta_parameters()) == {
        "net.0.adapter_down_proj.weight", "net.0.adapter_up_proj.weight",
        "net.2.weight", "net.2.bias",
    }  # fmt: skip
    task = regression_task(7)
    if algorithm is not MultiTask:  # its training has no inner loop
        adapted = brain.inner_loop(task.support, 1, 0.5)
        assert "net.0.adapter_up_proj.weight" in adapted.parameters
    for seed in range(3):
        brain.fit_batch(MetaBatch([regression_task(seed)]))
    for name, p in modules["net"].named_parameters():
        if "adapter" in name or name.startswith("2."):
            assert not torch.equal(p, base[name]), name  # meta-learnt
        else:
            assert torch.equal(p, base[name]), name  # the frozen base

    # Or the base meta-learnt too, the adapters adapted in the inner loop.
    modules, _ = lora_modules()
    brain = brain_of(MAML, modules, inner_params=["*adapter*"], meta_params=["*"])
    brain.fit_batch(MetaBatch([regression_task(3)]))
    weight = modules["net"][0].pretrained_module.weight
    assert not torch.equal(weight, base["0.pretrained_module.weight"])


def test_learnt_rates_are_checkpointed_and_resumed(tmp_path):
    brain = brain_of(MAML, inner_steps=2, learn_inner_lr="layer_step")
    checkpointer = Checkpointer(tmp_path, {"net": brain.modules.net})
    brain.checkpointer = checkpointer
    checkpointer.add_recoverable("inner_rates", brain.inner_rates)
    for seed in range(3):
        brain.fit_batch(MetaBatch([regression_task(seed)]))
    learnt = [r.detach().clone() for r in brain.inner_rates.log_rates]
    assert all(not torch.allclose(r.exp(), torch.tensor(INNER_LR)) for r in learnt)
    checkpointer.save_checkpoint()
    (saved,) = tmp_path.glob("CKPT+*/inner_rates.ckpt")
    with torch.no_grad():
        for rate in brain.inner_rates.log_rates:
            rate.zero_()
    checkpointer.recover_if_possible()
    for rate, value in zip(brain.inner_rates.log_rates, learnt):
        assert torch.equal(rate.detach(), value)
    rates = InnerRates.from_file(str(saved))
    assert rates.names == brain.fast_weight_names and rates.mode == "layer_step"
    assert torch.equal(
        rates.rate("net.2.bias", 1), brain.inner_rates.rate("net.2.bias", 1)
    )
    assert set(brain.train_log_stats()) == {
        "inner_lr_min", "inner_lr_mean", "inner_lr_max",
    }  # fmt: skip


def test_learnt_rates_are_used_by_test_time_adaptation():
    brain = brain_of(MAML, inner_steps=2, adapt_steps=7, learn_inner_lr="tensor")
    assert brain._adaptation() == (2, brain.inner_rates.rate)
    brain.hparams.adapt_with_learnt_rates = False
    assert brain._adaptation() == (7, INNER_LR)


def test_multi_step_loss_with_weight_on_the_last_step_only_is_maml():
    task = regression_task(8)
    maml = brain_of(MAML, inner_steps=3)
    msl = brain_of(MAML, inner_steps=3, msl_steps=4)
    msl.optimizer_step = 4  # past the annealing: only the last step counts
    assert msl.multi_step_weights() == [0.0, 0.0, 1.0]
    for brain in (maml, msl):
        brain.modules.zero_grad()
        brain.task_step(task)
    for p, q in zip(maml.modules.parameters(), msl.modules.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    msl.optimizer_step = 0  # uniform weights: another gradient
    msl.modules.zero_grad()
    msl.task_step(task)
    assert any(
        not torch.allclose(p.grad, q.grad)
        for p, q in zip(maml.modules.parameters(), msl.modules.parameters())
    )


def test_a_skipped_task_leaves_no_gradient_on_the_learnt_rates():
    """A skipped task leaves no gradient on the learnt rates either."""
    brain = brain_of(MAML, learn_inner_lr="tensor")
    good = regression_task(9)
    bad = type(good)(
        "bad", (good.support[0] * float("nan"), good.support[1]), good.query
    )
    reference = brain_of(MAML, learn_inner_lr="tensor")
    brain.fit_batch(MetaBatch([good, bad]))
    reference.fit_batch(MetaBatch([good]))
    assert brain.nonfinite_count == 1
    for r, s in zip(brain.inner_rates.log_rates, reference.inner_rates.log_rates):
        torch.testing.assert_close(r, s)

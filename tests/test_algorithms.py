"""Meta-gradients of MAML, FOMAML and Reptile against independent computations."""

import copy

import pytest
import speechbrain as sb
import torch

from speechbrain_meta import FOMAML, MAML, MetaBatch, MultiTask, Reptile, Task

INNER_LR = 0.2


class Regression:
    """A recipe: an MLP regressor, batches are (inputs, targets) tuples."""

    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return ((predictions - batch[1]) ** 2).mean()


class TinyCTC:
    """A recipe with SpeechBrain's CTC loss: frames -> linear -> log-softmax."""

    def compute_forward(self, batch, stage):
        return torch.log_softmax(self.modules.net(batch[0]), dim=-1)

    def compute_objectives(self, predictions, batch, stage):
        tokens = batch[1]
        ones = torch.ones(tokens.shape[0], dtype=predictions.dtype)
        return sb.nnet.losses.ctc_loss(predictions, tokens, ones, ones, 0)


def make_brain(algorithm, recipe=Regression, net=None, **hparams):
    torch.manual_seed(0)
    if net is None:
        net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        )
    hparams = {"inner_lr": INNER_LR, **hparams}
    brain_class = type("Brain", (recipe, algorithm), {})
    brain = brain_class(
        {"net": net.double()},
        opt_class=lambda params: torch.optim.SGD(params, lr=1.0),
        hparams=hparams,
        run_opts={"max_grad_norm": 1e9},
    )
    brain.init_optimizers()
    return brain


def regression_task(seed):
    g = torch.Generator().manual_seed(seed)
    support = (torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g))
    query = (torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g))
    return Task(str(seed), *(tuple(t.double() for t in b) for b in (support, query)))


def ctc_task(seed):
    g = torch.Generator().manual_seed(seed)
    frames = lambda: torch.randn(2, 6, 3, generator=g).double()  # noqa: E731
    labels = lambda: torch.randint(1, 3, (2, 2), generator=g)  # noqa: E731
    return Task(str(seed), (frames(), labels()), (frames(), labels()))


def adapted_query_loss(brain, task, steps, vector=None):
    """Query loss after `steps` plain SGD steps on a copy of the network."""
    net = copy.deepcopy(brain.modules.net)
    if vector is not None:
        torch.nn.utils.vector_to_parameters(vector, net.parameters())
    recipe = lambda batch: brain.compute_objectives(  # noqa: E731
        torch.log_softmax(net(batch[0]), -1)
        if isinstance(brain, TinyCTC)
        else net(batch[0]),
        batch,
        sb.Stage.TRAIN,
    )
    for _ in range(steps):
        net.zero_grad()
        with torch.enable_grad():
            recipe(task.support).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= INNER_LR * p.grad
    with torch.no_grad():
        return recipe(task.query)


def finite_difference_gradient(brain, task, steps, eps=1e-6):
    theta = torch.nn.utils.parameters_to_vector(brain.modules.net.parameters())
    grad = torch.zeros_like(theta)
    for i in range(theta.numel()):
        shift = torch.zeros_like(theta)
        shift[i] = eps
        plus = adapted_query_loss(brain, task, steps, theta.detach() + shift)
        minus = adapted_query_loss(brain, task, steps, theta.detach() - shift)
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def meta_gradient(brain, task):
    brain.modules.zero_grad()
    brain.task_step(task)
    return torch.cat([p.grad.flatten() for p in brain.modules.net.parameters()])


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    "recipe, make_task", [(Regression, regression_task), (TinyCTC, ctc_task)]
)
def test_maml_gradient_matches_finite_differences(steps, recipe, make_task):
    net = torch.nn.Linear(3, 3) if recipe is TinyCTC else None
    brain = make_brain(MAML, recipe, net=net, inner_steps=steps)
    task = make_task(1)
    expected = finite_difference_gradient(brain, task, steps)
    torch.testing.assert_close(
        meta_gradient(brain, task), expected, rtol=1e-6, atol=1e-8
    )


def speech_like_net():
    """The layers of the recipe's model, small: Conv1d, LayerNorm, BiGRU, Linear."""
    torch.manual_seed(0)
    net = sb.nnet.containers.Sequential(input_shape=[None, None, 3])
    net.append(sb.nnet.CNN.Conv1d, out_channels=4, kernel_size=3, layer_name="conv")
    net.append(sb.nnet.normalization.LayerNorm, layer_name="norm")
    net.append(torch.nn.LeakyReLU(), layer_name="act")
    net.append(sb.nnet.RNN.GRU, hidden_size=3, bidirectional=True, layer_name="rnn")
    net.append(sb.nnet.linear.Linear, n_neurons=3, layer_name="out")
    return net


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_gradient_through_the_recipe_layers(steps):
    """Directional finite differences through SpeechBrain's Conv1d, LayerNorm,
    GRU and the CTC loss: the layers of the default model."""
    brain = make_brain(MAML, TinyCTC, net=speech_like_net(), inner_steps=steps)
    task = ctc_task(1)
    gradient = meta_gradient(brain, task)
    theta = torch.nn.utils.parameters_to_vector(brain.modules.net.parameters())
    theta = theta.detach()
    direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3))
    direction = direction.double()
    eps = 1e-6
    plus = adapted_query_loss(brain, task, steps, theta + eps * direction)
    minus = adapted_query_loss(brain, task, steps, theta - eps * direction)
    expected = (plus - minus) / (2 * eps)
    torch.testing.assert_close(gradient @ direction, expected, rtol=1e-6, atol=1e-9)


def test_maml_runs_first_order_for_its_first_order_steps():
    """Derivative-order annealing: FOMAML's gradient, then MAML's."""
    task = regression_task(2)
    fomaml = meta_gradient(make_brain(FOMAML, inner_steps=2), task)
    maml = meta_gradient(make_brain(MAML, inner_steps=2), task)
    brain = make_brain(MAML, inner_steps=2, first_order_steps=1)
    torch.testing.assert_close(meta_gradient(brain, task), fomaml)
    brain.optimizer_step = 1  # one meta-step done
    torch.testing.assert_close(meta_gradient(brain, task), maml)


def test_fomaml_is_the_query_gradient_at_the_adapted_weights():
    brain = make_brain(FOMAML, inner_steps=2)
    task = regression_task(2)
    # Adapt a copy by hand, then take the plain gradient of the query loss there.
    net = copy.deepcopy(brain.modules.net)
    for _ in range(2):
        net.zero_grad()
        ((net(task.support[0]) - task.support[1]) ** 2).mean().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= INNER_LR * p.grad
    net.zero_grad()
    ((net(task.query[0]) - task.query[1]) ** 2).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(meta_gradient(brain, task), expected)
    # ... and it differs from the second-order MAML gradient.
    maml = meta_gradient(make_brain(MAML, inner_steps=2), task)
    assert (maml - expected).abs().max() > 1e-4


def test_reptile_moves_theta_towards_the_mean_adapted_weights():
    meta_lr = 0.25
    brain = make_brain(Reptile, inner_steps=3)
    brain.opt_class = lambda params: torch.optim.SGD(params, lr=meta_lr)
    brain.init_optimizers()
    tasks = [regression_task(s) for s in (3, 4, 5)]
    theta = torch.nn.utils.parameters_to_vector(brain.modules.net.parameters())
    adapted = []
    for task in tasks:  # phi_i by plain SGD on a copy
        net = copy.deepcopy(brain.modules.net)
        for _ in range(3):
            net.zero_grad()
            ((net(task.support[0]) - task.support[1]) ** 2).mean().backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= INNER_LR * p.grad
        adapted.append(torch.nn.utils.parameters_to_vector(net.parameters()))
    expected = theta + meta_lr * (torch.stack(adapted).mean(0) - theta)
    brain.fit_batch(MetaBatch(tasks))
    after = torch.nn.utils.parameters_to_vector(brain.modules.net.parameters())
    torch.testing.assert_close(after, expected.detach())


@pytest.mark.parametrize("algorithm", [MAML, FOMAML, Reptile, MultiTask])
def test_task_step_leaves_parameters_and_buffers_untouched(algorithm):
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    brain = make_brain(algorithm, net=net, inner_steps=2)
    before = copy.deepcopy(brain.modules.state_dict())
    outcome = brain.task_step(regression_task(6))
    assert outcome is not None and torch.isfinite(outcome[0])
    after = brain.modules.state_dict()
    # The updated statistics are returned, not written.
    assert not torch.equal(
        outcome[1]["net.1.running_mean"], before["net.1.running_mean"]
    )
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_evaluation_adapts_without_touching_the_modules():
    brain = make_brain(MAML, adapt_steps=3)
    before = copy.deepcopy(brain.modules.state_dict())
    task = regression_task(7)
    with torch.no_grad():
        adapted_loss = brain.evaluate_batch(MetaBatch([task]), sb.Stage.VALID)
    expected = adapted_query_loss(brain, task, steps=3)
    torch.testing.assert_close(adapted_loss.double(), expected)
    for name, value in before.items():
        assert torch.equal(brain.modules.state_dict()[name], value)


def test_nonfinite_task_is_skipped_and_counted():
    good = regression_task(8)
    bad = Task("bad", (good.support[0] * float("nan"), good.support[1]), good.query)
    brain = make_brain(FOMAML)
    reference = make_brain(FOMAML)
    loss = brain.fit_batch(MetaBatch([good, bad]))
    reference_loss = reference.fit_batch(MetaBatch([good]))
    assert brain.nonfinite_count == 1
    torch.testing.assert_close(loss, reference_loss)
    for p, q in zip(brain.modules.parameters(), reference.modules.parameters()):
        torch.testing.assert_close(p, q)


def test_all_tasks_nonfinite_leaves_weights_and_raises_after_patience():
    good = regression_task(9)
    bad = Task("bad", (good.support[0] * float("nan"), good.support[1]), good.query)
    brain = make_brain(MAML)
    brain.nonfinite_patience = 1
    before = copy.deepcopy(brain.modules.state_dict())
    assert torch.isnan(brain.fit_batch(MetaBatch([bad])))
    for name, value in before.items():
        assert torch.equal(brain.modules.state_dict()[name], value)
    with pytest.raises(ValueError, match="patience"):
        brain.fit_batch(MetaBatch([bad]))


def test_gradient_accumulation_is_refused():
    with pytest.raises(ValueError, match="tasks_per_batch"):
        type("B", (Regression, MAML), {})(
            {"net": torch.nn.Linear(1, 1)},
            run_opts={"grad_accumulation_factor": 2},
        )


@pytest.mark.parametrize("algorithm", [MAML, FOMAML, Reptile])
def test_bf16_meta_step_runs_under_autocast(algorithm):
    bf16_meta_step(algorithm, "cpu")


def bf16_meta_step(algorithm, device, **hparams):
    """A bf16 meta-step on ``device`` trains fp32 weights under autocast."""
    brain_class = type("Brain", (Regression, algorithm), {})
    torch.manual_seed(0)
    brain = brain_class(
        {"net": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
        hparams={"inner_lr": INNER_LR, **hparams},
        run_opts={"precision": "bf16", "device": device},
    )
    brain.init_optimizers()
    seen = []
    brain.modules.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in brain.modules.parameters()]
    reference = regression_task(10)
    task = Task(
        "t",
        *(
            tuple(t.float().to(device) for t in b)
            for b in (reference.support, reference.query)
        ),
    )
    loss = brain.fit_batch(MetaBatch([task]))
    assert torch.isfinite(loss)
    assert torch.bfloat16 in seen  # the recipe ran under bf16 autocast
    after = list(brain.modules.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # fp32 master weights
    assert all(p.device.type == torch.device(device).type for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))

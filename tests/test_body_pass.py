"""The body computed once per batch when the inner loop adapts only the head."""

import pytest
import torch
from test_algorithms import INNER_LR, Regression, regression_task
from test_attention import float64_brain, in_float64, synthetic_batch
from test_inner_variants import finite_differences, theta_of
from torch.func import functional_call

from speechbrain_meta import FOMAML, MAML, Reptile, Task
from speechbrain_meta.asr import ASR
from speechbrain_meta.hparams import load_hparams


class SplitRegression(Regression):
    """The regression recipe with its forward pass split into body and head."""

    head_modules = ("head",)
    body_calls = 0

    def compute_forward(self, batch, stage):
        return self.compute_head(self.compute_body(batch, stage), batch, stage)

    def compute_body(self, batch, stage):
        SplitRegression.body_calls += 1
        return self.modules.body(batch[0])

    def compute_head(self, body, batch, stage):
        return self.modules.head(body)


def split_modules():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
    return {"body": body, "head": torch.nn.Linear(4, 2).double()}


def split_brain(algorithm=MAML, recipe=SplitRegression, **hparams):
    brain = type("Brain", (recipe, algorithm), {})(
        split_modules(),
        opt_class=lambda params: torch.optim.SGD(params, lr=1.0),
        hparams={"inner_lr": INNER_LR, "inner_params": ["head"], **hparams},
        run_opts={"max_grad_norm": 1e9},
    )
    brain.init_optimizers()
    return brain


def meta_gradient(brain, task):
    brain.modules.zero_grad()
    SplitRegression.body_calls = 0
    brain.task_step(task)
    return {
        n: None if p.grad is None else p.grad.clone()
        for n, p in brain.modules.named_parameters()
    }


def anil_query_loss(brain, task, theta):
    """The ANIL query loss by hand: k steps on the head, body recomputed."""

    def loss(params, batch):
        body = functional_call(
            brain.modules.body, {n[5:]: params[n] for n in params if n[:5] == "body."},
            (batch[0],),
        )  # fmt: skip
        head = {n[5:]: params[n] for n in params if n[:5] == "head."}
        return (
            (functional_call(brain.modules.head, head, (body,)) - batch[1]) ** 2
        ).mean()

    params = {n: t.detach().requires_grad_() for n, t in theta.items()}
    for _ in range(brain.inner_steps):
        head = [n for n in params if n.startswith("head.")]
        grads = torch.autograd.grad(
            loss(params, task.support), [params[n] for n in head], create_graph=True
        )
        params.update({n: params[n] - INNER_LR * g for n, g in zip(head, grads)})
    return loss(params, task.query)


@pytest.mark.parametrize("steps", [1, 2])
def test_the_reused_body_gives_the_anil_meta_gradient(steps):
    brain = split_brain(inner_steps=steps)
    assert brain.reuses_body_pass
    task = regression_task(4)
    grads = meta_gradient(brain, task)
    # Once for the support batch, once for the query batch, whatever the steps.
    assert SplitRegression.body_calls == 2
    expected = finite_differences(
        lambda shifted: anil_query_loss(brain, task, shifted).detach(), theta_of(brain)
    )
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "algorithm, options",
    [
        (MAML, {}),
        (MAML, {"checkpoint_inner_steps": True}),
        (MAML, {"checkpoint_inner_steps": True, "msl_steps": 10}),
        (MAML, {"msl_steps": 10}),
        (MAML, {"learn_inner_lr": "layer_step"}),
        (FOMAML, {}),
        (Reptile, {}),
    ],
)
def test_reusing_the_body_changes_no_gradient(algorithm, options):
    task = regression_task(5)
    reused = meta_gradient(split_brain(algorithm, inner_steps=3, **options), task)
    calls = SplitRegression.body_calls
    plain_brain = split_brain(
        algorithm, inner_steps=3, reuse_body_pass=False, **options
    )
    assert not plain_brain.reuses_body_pass
    plain = meta_gradient(plain_brain, task)
    assert calls < SplitRegression.body_calls
    assert reused.keys() == plain.keys()
    for name in plain:
        if plain[name] is None:  # Reptile: the body gets no pseudo-gradient
            assert reused[name] is None
            continue
        torch.testing.assert_close(reused[name], plain[name], rtol=1e-10, atol=1e-12)


def test_the_body_is_reused_only_when_every_fast_weight_is_in_the_head():
    assert not split_brain(inner_params=None).reuses_body_pass
    assert not split_brain(inner_params=["head", "body.0.bias"]).reuses_body_pass

    class ChangedForward(SplitRegression):
        def compute_forward(self, batch, stage):
            return super().compute_forward((batch[0] * 2, batch[1]), stage)

    # A subclass's own forward pass is never bypassed.
    assert not split_brain(recipe=ChangedForward).reuses_body_pass


def test_validation_adapts_the_head_on_one_body_pass():
    brain = split_brain(adapt_steps=4)
    SplitRegression.body_calls = 0
    adapted = brain.adapt(regression_task(2).support)
    assert SplitRegression.body_calls == 1
    theta = brain.meta_parameters()
    assert adapted.parameters.keys() == {"head.weight", "head.bias"}
    assert not torch.equal(adapted.parameters["head.weight"], theta["head.weight"])


# ---------------------------------------------------------------- the recipe
TINY_CTC = {
    "n_mels": 8, "output_neurons": 12, "speed_perturb": None, "cnn_channels": 8,
    "rnn_size": 6, "rnn_layers": 1, "dropout": 0.0,
}  # fmt: skip


def anil_ctc_brain(tmp_path, **overrides):
    hparams = load_hparams(
        "hparams/maml_anil_ctc.yaml",
        {"output_folder": str(tmp_path), **TINY_CTC, **overrides},
    )
    brain = type("ASRBrain", (ASR, hparams["brain_class"]), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": "cpu", "max_grad_norm": 1e9},
    )
    return in_float64(brain)


def recipe_gradient(brain):
    torch.manual_seed(0)
    brain.modules.zero_grad()
    brain.task_step(Task("t", synthetic_batch(1), synthetic_batch(2)))
    return {n: p.grad.clone() for n, p in brain.modules.named_parameters()}


@pytest.mark.parametrize("model", ["ctc", "ctc recomputed", "transformer"])
def test_anil_on_the_recipes_models_gives_the_same_meta_gradient(model, tmp_path):
    """The ASR recipe's body/head split (CTC and joint models), second order;
    with checkpoint_inner_steps the body pass is recomputed too."""

    def brain(reuse):
        if model.startswith("ctc"):
            return anil_ctc_brain(
                tmp_path,
                inner_steps=2,
                reuse_body_pass=reuse,
                checkpoint_inner_steps=model == "ctc recomputed" and reuse,
            )
        return float64_brain(
            tmp_path, "transformer", inner_params=["ctc_lin", "seq_lin"],
            inner_steps=2, reuse_body_pass=reuse,
        )  # fmt: skip

    reused_brain = brain(True)
    assert reused_brain.reuses_body_pass
    reused = recipe_gradient(reused_brain)
    plain = recipe_gradient(brain(False))
    assert reused.keys() == plain.keys()
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(reused[name], plain[name], rtol=1e-9, atol=1e-12)

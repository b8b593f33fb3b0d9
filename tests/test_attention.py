"""Joint CTC + attention models (Transformer and RNN decoders) meta-learned."""

import re
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from torch.autograd.function import once_differentiable

from speechbrain_meta import FOMAML, MAML, MetaBatch, Task
from speechbrain_meta.asr import ASR, dataio_prepare
from speechbrain_meta.hparams import load_hparams

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from test_recipe import run_train  # noqa: E402

ALGORITHMS = ("maml", "fomaml", "reptile", "multitask")
FAMILIES = ("transformer", "rnn")
# A model small enough for exact float64 checks and fast decoding.
TINY_MODEL = {
    "n_mels": 8,
    "output_neurons": 12,
    "speed_perturb": None,
}
TINY_FAMILY = {
    "transformer": {
        "front_end_channels": 4,
        "d_model": 8,
        "nhead": 2,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "d_ffn": 16,
        "transformer_dropout": 0.0,
    },
    "rnn": {
        "cnn_channels": 8,
        "rnn_size": 6,
        "rnn_layers": 1,
        "emb_size": 5,
        "dec_neurons": 7,
        "attn_dim": 6,
        "attn_type": "content",
        "dropout": 0.0,
    },
}


def yaml_path(algorithm: str) -> Path:
    return REPO / "hparams" / f"{algorithm}_attention.yaml"


def make_brain(tmp_path, algorithm="maml", **overrides) -> sb.Brain:
    """The Brain that train.py builds from an attention YAML."""
    overrides = {"output_folder": str(tmp_path), **overrides}
    hparams = load_hparams(str(yaml_path(algorithm)), overrides)
    brain_class = type("ASRBrain", (ASR, hparams["brain_class"]), {})
    return brain_class(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": "cpu", "max_grad_norm": 1e9},
    )


# ----------------------------------------------------------------- recipes
# Cheap settings of the debug runs; the default model otherwise.
DEBUG = [
    "--debug", "--tasks_per_batch", "2", "--adapt_steps", "1",
    "--max_decode_ratio", "0.3", "--test_beam_size", "2",
]  # fmt: skip
TRANSFORMER = {
    "maml": [],
    "fomaml": [],
    "reptile": ["--inner_steps", "1"],
    "multitask": [],
}
SMALL_RNN = [
    "--cnn_channels", "32", "--rnn_size", "32", "--dec_neurons", "32",
    "--attn_dim", "32", "--emb_size", "16",
]  # fmt: skip


@pytest.mark.parametrize(
    "algorithm, options",
    [(a, ["--decoder_type", "transformer", *TRANSFORMER[a]]) for a in ALGORITHMS]
    + [("maml", ["--decoder_type", "rnn", *SMALL_RNN])],
    ids=[f"{a}-transformer" for a in ALGORITHMS] + ["maml-rnn"],
)
def test_attention_recipe_runs_debug_to_the_end(
    algorithm, options, tiny_corpus, tmp_path
):
    run_train(yaml_path(algorithm), tiny_corpus, tmp_path, *DEBUG, *options)
    for name in ("wer.txt", "cer.txt"):
        text = (tmp_path / name).read_text()
        assert re.search(r"%WER \d+\.\d+", text), text[:200]
    log = (tmp_path / "train_log.txt").read_text()
    assert "epoch: 2" in log and "valid CER" in log and "test CER" in log


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("decoder_type", FAMILIES)
def test_decoder_type_selects_modules_and_searchers(algorithm, decoder_type, tmp_path):
    brain = make_brain(tmp_path, algorithm, decoder_type=decoder_type)
    searchers = (brain.hparams.valid_search, brain.hparams.test_search)
    if decoder_type == "transformer":
        assert set(brain.modules) == {"CNN", "Transformer", "ctc_lin", "seq_lin"}
        for searcher in searchers:
            assert searcher.model is brain.modules.Transformer
    else:
        assert set(brain.modules) == {
            "encoder", "embedding", "decoder", "ctc_lin", "seq_lin"
        }  # fmt: skip
        for searcher in searchers:
            assert searcher.dec is brain.modules.decoder
            assert searcher.emb is brain.modules.embedding
    for searcher in searchers:
        assert searcher.fc is brain.modules.seq_lin
        ctc = searcher.scorer.full_scorers["ctc"]
        assert ctc.ctc_fc is brain.modules.ctc_lin
        assert searcher.ctc_weight == brain.hparams.ctc_weight_decode
    assert brain.hparams.test_search.beam_size == brain.hparams.test_beam_size
    assert dict(brain.hparams.model.items()) == dict(brain.modules.items())


# ------------------------------------------------------ exact meta-gradient
def synthetic_batch(seed: int, dtype=torch.float64) -> PaddedBatch:
    """Three short random 'utterances' with 2 to 4 labels (1 bos, 2 eos)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, (samples, labels) in enumerate([(4800, 4), (4000, 3), (3200, 2)]):
        tokens = torch.randint(3, 12, (labels,), generator=g)
        examples.append(
            {
                "id": f"u{i}",
                "sig": torch.randn(samples, generator=g, dtype=dtype) * 0.1,
                "wrd": "x",
                "tokens": tokens,
                "tokens_bos": torch.cat([torch.tensor([1]), tokens]),
                "tokens_eos": torch.cat([tokens, torch.tensor([2])]),
            }
        )
    return PaddedBatch(examples)


def tiny_brain(tmp_path, decoder_type, **overrides):
    return make_brain(
        tmp_path,
        "maml",
        decoder_type=decoder_type,
        **TINY_MODEL,
        **TINY_FAMILY[decoder_type],
        **overrides,
    )


def float64_brain(tmp_path, decoder_type, **overrides):
    return in_float64(tiny_brain(tmp_path, decoder_type, **overrides))


def in_float64(brain: sb.Brain) -> sb.Brain:
    """The recipe's modules and log-softmax in float64, for exact checks."""
    brain.modules.double()
    # Features are constants of the meta-gradient: float32 filters are fine.
    fbank = brain.hparams.compute_features
    brain.hparams.compute_features = lambda wavs: fbank(wavs.float()).double()
    brain.hparams.log_softmax = sb.nnet.activations.Softmax(
        apply_log=True, dtype=torch.float64
    )
    return brain


def adapted_query_loss(brain, task, theta, steps):
    """Query loss after ``steps`` SGD steps of the modules themselves.

    No fast weights: the modules' own parameters are overwritten, stepped
    with plain autograd, and restored.
    """
    params = dict(brain.modules.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}

    def loss(batch):
        predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
        return brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(theta[name])
    for _ in range(steps):
        grads = torch.autograd.grad(loss(task.support), list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= brain.inner_lr * g
    with torch.no_grad():
        value = loss(task.query)
        for name, p in params.items():
            p.copy_(saved[name])
    return value


@pytest.mark.parametrize("decoder_type", FAMILIES)
def test_maml_joint_loss_gradient_matches_finite_differences(decoder_type, tmp_path):
    torch.manual_seed(0)
    brain = float64_brain(tmp_path, decoder_type, inner_steps=2, inner_lr=0.5)
    task = Task("t", synthetic_batch(1), synthetic_batch(2))
    brain.modules.zero_grad()
    brain.task_step(task)
    theta = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    grad = {n: p.grad for n, p in brain.modules.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grad.values())
    eps = 1e-6
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        direction = {
            n: torch.randn(t.shape, generator=g, dtype=t.dtype)
            for n, t in theta.items()
        }
        shifted = [
            {n: t + sign * eps * direction[n] for n, t in theta.items()}
            for sign in (1, -1)
        ]
        plus, minus = (adapted_query_loss(brain, task, s, 2) for s in shifted)
        expected = (plus - minus) / (2 * eps)
        computed = sum((grad[n] * direction[n]).sum() for n in theta)
        torch.testing.assert_close(computed, expected, rtol=1e-5, atol=1e-8)


# --------------------------------------------------- decoding, fast weights
def recorded_hypotheses(brain, run):
    """The test searcher's hypotheses while ``run()`` runs."""
    search, hypotheses = brain.hparams.test_search, []

    def record(*args):
        result = search(*args)
        hypotheses.extend(result[0])
        return result

    brain.hparams.test_search = record
    try:
        with torch.no_grad():
            run()
    finally:
        brain.hparams.test_search = search
    return hypotheses


@pytest.mark.parametrize("decoder_type", FAMILIES)
def test_beam_search_decodes_with_the_adapted_weights(decoder_type, tmp_path):
    torch.manual_seed(0)
    brain = tiny_brain(tmp_path, decoder_type, adapt_steps=3, adapt_lr=1.0)
    brain.tokenizer = sb.dataio.encoder.CTCTextEncoder()
    brain.tokenizer.update_from_iterable("_<>abcdefghi")
    support, query = (synthetic_batch(seed, torch.float32) for seed in (1, 2))
    episode = MetaBatch([Task("t", support, query)])
    brain.modules.eval()
    brain.on_stage_start(sb.Stage.TEST)

    def evaluate():
        return brain.evaluate_batch(episode, sb.Stage.TEST)

    adapted = recorded_hypotheses(brain, evaluate)
    weights = brain.adapt(episode.tasks[0].support).parameters
    brain.hparams.adapt_steps = 0
    unadapted = recorded_hypotheses(brain, evaluate)
    assert adapted != unadapted
    # The modules holding the adapted weights as their own decode the same.
    with torch.no_grad():
        for name, p in brain.meta_parameters().items():
            p.copy_(weights[name])
    assert recorded_hypotheses(brain, evaluate) == adapted


# --------------------------------------------------------------- learning
SMALL_MODEL = {
    "d_model": 32,
    "d_ffn": 64,
    "front_end_channels": 8,
    "transformer_dropout": 0.0,
    "speed_perturb": None,
}


def test_short_maml_training_lowers_the_joint_loss(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    brain = make_brain(
        tmp_path,
        "maml",
        data_folder=tiny_corpus["data_folder"],
        tasks_per_batch=2,
        support_size=2,
        query_size=2,
        eval_support_size=2,
        eval_query_size=2,
        adapt_steps=1,
        meta_lr=0.003,
        **SMALL_MODEL,
    )
    datasets, brain.tokenizer = dataio_prepare(vars(brain.hparams))
    brain.init_optimizers()

    def loader(sampler):
        return brain.make_dataloader(
            datasets["train"], sb.Stage.TRAIN, batch_sampler=sampler
        )

    evaluation = list(loader(brain.hparams.eval_sampler(datasets["train"])))[:4]

    def joint_loss():
        losses = []
        for task in (episode.tasks[0] for episode in evaluation):
            adapted = brain.adapt(task.support)
            with torch.no_grad():
                losses.append(
                    brain.task_loss(adapted.parameters, adapted.buffers, task.query)
                )
        return torch.stack(losses).mean()

    before = joint_loss()
    training = loader(brain.hparams.train_sampler(datasets["train"]))
    for _, episode in zip(range(10), training):
        brain.fit_batch(episode)
    assert joint_loss() < 0.8 * before


# ------------------------------------------------------------ diagnostics
class OnceDifferentiableSquare(torch.autograd.Function):
    """x ** 2 with a backward that autograd cannot differentiate again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Square(torch.nn.Module):
    def forward(self, x):
        return OnceDifferentiableSquare.apply(x)


class Regression:
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return ((predictions - batch[1]) ** 2).mean()


def regression_brain(algorithm):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.Sequential(torch.nn.Linear(4, 4), Square()),
        torch.nn.Linear(4, 1),
    )
    brain_class = type("Brain", (Regression, algorithm), {})
    return brain_class({"net": net}, hparams={"inner_lr": 0.1})


def test_second_order_error_names_the_module_and_suggests_first_order():
    batch = (torch.randn(5, 3), torch.randn(5, 1))
    task = Task("t", batch, batch)
    brain = regression_brain(MAML)
    with pytest.raises(RuntimeError) as error:
        brain.task_step(task)
    message = str(error.value)
    assert "module 'net.1.1' (Square)" in message
    assert "first_order: True" in message
    assert "@once_differentiable" in message
    # The suggestion works: first order needs no double backward.
    brain = regression_brain(FOMAML)
    loss, _ = brain.task_step(task)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in brain.modules.parameters())


def test_unknown_token_ids_are_skipped_in_decoding(tmp_path):
    brain = make_brain(tmp_path)
    brain.tokenizer = sb.dataio.encoder.CTCTextEncoder()
    brain.tokenizer.update_from_iterable("ab c")
    ids = brain.tokenizer.encode_sequence(list("ab c"))
    assert brain.to_words(torch.tensor(ids[:2] + [99] + ids[2:])) == ["ab", "c"]

"""Pretrained self-supervised encoders (wav2vec2, HuBERT) under meta-learning.

Every model here is a tiny random stand-in (speechbrain_meta.tiny_ssl) loaded
from a local folder with the hub switched off; the scripts' runs also fail on
any attempt to open a network connection.
"""

import copy
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch

pytest.importorskip("transformers")

from speechbrain.dataio.batch import PaddedBatch  # noqa: E402
from speechbrain.nnet.activations import Softmax  # noqa: E402
from speechbrain.nnet.adapters import LoRA  # noqa: E402

from speechbrain_meta.asr import ASR, insert_adapters  # noqa: E402
from speechbrain_meta.errors import SetupError  # noqa: E402
from speechbrain_meta.hparams import load_hparams  # noqa: E402
from speechbrain_meta.inner_loop import second_order_context  # noqa: E402
from speechbrain_meta.sampler import MetaBatch, Task  # noqa: E402
from speechbrain_meta.tiny_ssl import build_tiny_ssl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HPARAMS = REPO / "hparams"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAINING = ["maml", "fomaml", "reptile", "multitask", "maml_lora", "maml_anil"]
# The tiny corpus has 8 train and 2 dev/test utterances per language.
TINY = [
    "--support_size", "2", "--query_size", "2", "--tasks_per_batch", "2",
    "--eval_support_size", "1", "--eval_query_size", "1", "--noprogressbar",
]  # fmt: skip
# Run in every script the tests start: a connection attempt (or a name
# look-up) is written to $NETWORK_LOG and refused.
NO_NETWORK = """import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["NETWORK_LOG"], "a") as log:
        log.write(repr(args) + "\\n")
    raise OSError("network call refused by the test")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = socket.create_connection = _refuse
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def tiny_ssl(tmp_path_factory) -> dict:
    """Folders of a tiny wav2vec2 and a tiny HuBERT, by family."""
    root = tmp_path_factory.mktemp("tiny_ssl")
    return {f: build_tiny_ssl(f, str(root / f)) for f in ("wav2vec2", "hubert")}


@pytest.fixture(scope="session")
def no_network(tmp_path_factory) -> str:
    """A folder whose sitecustomize.py makes every socket connection fail."""
    folder = tmp_path_factory.mktemp("no_network")
    (folder / "sitecustomize.py").write_text(NO_NETWORK)
    return str(folder)


def guarded_env(no_network: str, log: Path) -> dict:
    """The environment of a script whose network calls are logged and refused."""
    path = os.pathsep.join([no_network, str(REPO)])
    return {**os.environ, **OFFLINE, "PYTHONPATH": path, "NETWORK_LOG": str(log)}


def run_script(script, yaml, no_network, *options):
    log = Path(no_network) / f"calls-{os.getpid()}-{len(options)}.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, script, str(yaml), *options], cwd=REPO,
        env=guarded_env(no_network, log), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert not log.exists(), f"network calls attempted: {log.read_text()[:500]}"
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def brain_of(yaml: str, source: str, tmp_path, **overrides):
    """The Brain train.py builds from a YAML, in float64, in training mode."""
    hparams = load_hparams(
        str(HPARAMS / yaml),
        {
            "ssl_source": source,
            "output_folder": str(tmp_path),
            "speed_perturb": None,
            **overrides,
        },
    )
    hparams["log_softmax"] = Softmax(apply_log=True, dtype=torch.float64)
    insert_adapters(hparams)
    brain = type("ASRBrain", (ASR, hparams["brain_class"]), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"max_grad_norm": 1e9},
    )
    brain.init_optimizers()
    brain.modules.double()
    brain.modules.train()
    return brain


def batch(seed: int) -> PaddedBatch:
    """Two utterances of random audio (0.5 s and 0.6 s) and characters."""
    g = torch.Generator().manual_seed(seed)
    return PaddedBatch(
        [
            {
                "id": f"{seed}-{i}",
                "sig": torch.randn(8000 + 1600 * i, generator=g).double(),
                "tokens": torch.randint(3, 20, (5 + i,), generator=g),
            }
            for i in range(2)
        ]
    )


def task(seed: int) -> Task:
    return Task(str(seed), batch(seed), batch(seed + 100))


def adapted_query_loss(brain, task, theta) -> float:
    """The query loss after the inner loop, at meta-parameters ``theta``."""
    with torch.no_grad():
        for name, p in brain.meta_parameters().items():
            p.copy_(theta[name])
    adapted = brain.inner_loop(task.support, brain.inner_steps, brain.inner_lr)
    weights = {n: w.detach() for n, w in adapted.parameters.items()}
    with torch.no_grad():
        return float(brain.task_loss(weights, adapted.buffers, task.query))


@pytest.mark.parametrize(
    "yaml", ["maml_lora_ssl_ctc.yaml", "maml_ssl_ctc.yaml", "maml_anil_ssl_ctc.yaml"]
)
def test_maml_meta_gradient_through_the_encoder_matches_finite_differences(
    yaml, tiny_ssl, tmp_path
):
    """Second order through LoRA, attention, the weight-normalised positional
    convolution and the head: directional derivatives in float64."""
    brain = brain_of(yaml, tiny_ssl["wav2vec2"], tmp_path, inner_steps=2)
    if yaml == "maml_ssl_ctc.yaml":  # the positional convolution adapts too
        assert any("pos_conv_embed" in n for n in brain.fast_weight_names)
    one = task(1)
    brain.task_step(one)
    theta = {n: p.detach().clone() for n, p in brain.meta_parameters().items()}
    grads = {n: p.grad for n, p in brain.meta_parameters().items()}
    assert all(g is not None for n, g in grads.items() if "masked_spec" not in n)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = {n: torch.randn(t.shape, generator=g).double() for n, t in theta.items()}
        losses = [
            adapted_query_loss(
                brain, one, {n: theta[n] + sign * 1e-6 * v[n] for n in theta}
            )
            for sign in (1, -1)
        ]
        numeric = (losses[0] - losses[1]) / 2e-6
        analytic = sum(
            float((grads[n] * v[n]).sum()) for n in theta if grads[n] is not None
        )
        assert numeric == pytest.approx(analytic, rel=1e-6)


def test_weight_norm_is_twice_differentiable_in_the_second_order_context():
    """The fused torch._weight_norm's double backward is wrong; the context's
    replacement is right (wav2vec2's positional convolution uses it)."""
    conv = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv1d(3, 4, 5, padding=2).double(), name="weight", dim=2
    )
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    params = conv.parametrizations.weight

    def out(g, v):
        tensors = {
            "parametrizations.weight.original0": g,
            "parametrizations.weight.original1": v,
        }
        return torch.func.functional_call(conv, tensors, (x,))

    inputs = (params.original0.detach().clone(), params.original1.detach().clone())
    inputs = tuple(t.requires_grad_() for t in inputs)
    with second_order_context():
        assert torch.autograd.gradgradcheck(out, inputs)


def test_frozen_weights_stay_bit_identical_and_lr_scales_make_groups(
    tiny_ssl, tmp_path
):
    """The feature encoder (every algorithm) and the pretrained weights under
    LoRA keep their values, bit for bit; what is learnt moves."""
    for yaml, frozen in (
        ("maml_ssl_ctc.yaml", "encoder.model.feature_extractor."),
        ("reptile_ssl_ctc.yaml", "encoder.model.feature_extractor."),
        ("maml_lora_ssl_ctc.yaml", "encoder."),
    ):
        brain = brain_of(yaml, tiny_ssl["wav2vec2"], tmp_path / yaml)
        before = copy.deepcopy(brain.modules.state_dict())
        for seed in range(2):
            brain.fit_batch(MetaBatch([task(seed), task(seed + 10)]))
        after = brain.modules.state_dict()
        learnt = set(brain.meta_parameters())
        for name, value in after.items():
            if name.startswith(frozen) and "adapter" not in name:
                assert torch.equal(value, before[name]), (yaml, name)
                assert name not in learnt
        moved = [n for n in learnt if not torch.equal(after[n], before[n])]
        assert any(n.startswith("ctc_lin") for n in moved), yaml
        assert any(n.startswith("encoder") for n in moved), yaml
    # LoRA: the adapters learn at the head's rate; otherwise the encoder at 0.05x.
    lrs = [g["lr"] for g in brain.optimizer.param_groups]
    assert lrs == [0.001, 0.001]
    full = brain_of("fomaml_ssl_ctc.yaml", tiny_ssl["wav2vec2"], tmp_path / "f")
    groups = full.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.001, pytest.approx(0.00005)]
    head = {id(p) for p in full.modules.ctc_lin.parameters()}
    assert {id(p) for p in groups[0]["params"]} == head


def test_lora_wraps_the_attention_and_feed_forward_linears(tiny_ssl, tmp_path):
    brain = brain_of("maml_lora_ssl_ctc.yaml", tiny_ssl["hubert"], tmp_path)
    layer = brain.modules.encoder.model.encoder.layers[1]
    for linear in (
        layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj,
        layer.attention.out_proj, layer.feed_forward.intermediate_dense,
        layer.feed_forward.output_dense,
    ):  # fmt: skip
        assert isinstance(linear, LoRA)
    assert type(brain.modules.encoder.model).__name__ == "HubertModel"


def test_a_frozen_feature_encoder_keeps_no_graph(tiny_ssl, tmp_path):
    """Its input does not ask a gradient (transformers would, in training)."""
    top = ["*.layers.1.feed_forward.*_dense"]
    lora = brain_of(
        "maml_lora_ssl_ctc.yaml", tiny_ssl["wav2vec2"], tmp_path, lora_layers=top
    )
    model = lora.modules.encoder.model
    wavs = torch.randn(2, 4000, dtype=torch.float64)
    assert not model.feature_extractor(wavs).requires_grad
    # Below the adapted layer, nothing asks a gradient: no graph is kept.
    states = model(wavs, output_hidden_states=True).hidden_states
    assert not states[1].requires_grad and states[-1].requires_grad
    # A trainable feature encoder still gets its gradient.
    whole = brain_of(
        "maml_ssl_ctc.yaml", tiny_ssl["wav2vec2"], tmp_path / "whole",
        freeze_feature_extractor=False,
    )  # fmt: skip
    assert whole.modules.encoder.model.feature_extractor(wavs).requires_grad


def test_the_command_line_builds_a_resized_encoder(tmp_path, capsys):
    """``python -m speechbrain_meta.tiny_ssl --config`` changes the fields given."""
    import transformers

    from speechbrain_meta import tiny_ssl

    out = str(tmp_path / "w2v")
    tiny_ssl.main(["--out", out, "--config", "num_hidden_layers=3", "hidden_act=relu"])
    assert capsys.readouterr().out.strip() == out
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_act) == (3, "relu")
    with pytest.raises(SystemExit):
        tiny_ssl.main(["--out", out, "--config", "num_hidden_layers"])


def test_activation_checkpointing_is_refused(tiny_ssl, tmp_path):
    """Recomputed forwards would see the modules' weights, not the fast ones."""
    hparams = load_hparams(
        str(HPARAMS / "fomaml_ssl_ctc.yaml"),
        {"ssl_source": tiny_ssl["wav2vec2"], "output_folder": str(tmp_path)},
    )
    hparams["encoder"].model.gradient_checkpointing_enable()
    with pytest.raises(
        SetupError, match="Module 'encoder.model.feature_extractor' has activation"
    ):
        type("ASRBrain", (ASR, hparams["brain_class"]), {})(
            modules=hparams["modules"], hparams=hparams, opt_class=None
        )


def test_the_network_guard_logs_and_refuses_connections(no_network, tmp_path):
    """The guard of the script runs below is active in them."""
    log = tmp_path / "calls.log"
    code = "import socket; socket.socket().connect(('huggingface.co', 443))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=guarded_env(no_network, log),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "refused by the test" in result.stderr
    assert "huggingface.co" in log.read_text()


@pytest.mark.parametrize("name", TRAINING)
def test_each_ssl_yaml_runs_debug_offline(
    name, tiny_ssl, tiny_corpus, no_network, tmp_path
):
    family = "hubert" if name == "fomaml" else "wav2vec2"  # another family
    run_script(
        "train.py", HPARAMS / f"{name}_ssl_ctc.yaml", no_network,
        "--ssl_source", tiny_ssl[family], "--debug",
        "--data_folder", tiny_corpus["data_folder"], "--skip_prep", "True",
        "--output_folder", str(tmp_path), *TINY,
    )  # fmt: skip
    log = (tmp_path / "train_log.txt").read_text()
    assert "epoch: 2" in log and "valid CER" in log and "test CER" in log


@pytest.mark.parametrize("variant", ["", "lora_"])
def test_adapt_extends_the_head_of_a_meta_trained_ssl_model(
    variant, tiny_ssl, tiny_corpus, no_network, tmp_path
):
    algorithm = "maml_lora" if variant else "maml_anil"
    data = ["--data_folder", tiny_corpus["data_folder"]]
    run_script(
        "train.py", HPARAMS / f"{algorithm}_ssl_ctc.yaml", no_network,
        "--ssl_source", tiny_ssl["wav2vec2"], *data, "--skip_prep", "True",
        "--output_folder", str(tmp_path / "train"), "--number_of_epochs", "1",
        "--episodes_per_epoch", "1", "--eval_episodes", "1", *TINY,
    )  # fmt: skip
    out = tmp_path / "adapt"
    run_script(
        "adapt.py", HPARAMS / f"adapt_{variant}ssl_ctc.yaml", no_network,
        "--ssl_source", tiny_ssl["wav2vec2"], *data, "--output_folder", str(out),
        "--init_checkpoint", str(tmp_path / "train"), "--target", "cs",
        "--budget", "4", "--budget_unit", "utterances", "--curve_steps", "[0, 2]",
        "--noprogressbar",
    )  # fmt: skip
    rows = (out / "curve.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].split(",")[3] == "2", rows
    encoder = sb.dataio.encoder.CTCTextEncoder.from_saved(
        str(out / "save" / "label_encoder.txt")
    )
    assert "ř" in encoder.lab2ind  # Czech letters were added to the head
    (paramfile,) = (out / "save").glob("CKPT+adapted/model.ckpt")
    saved = torch.load(paramfile)
    initial = torch.load(next((tmp_path / "train" / "save").glob("CKPT+*/model.ckpt")))
    head = [n for n in saved if n.endswith("w.bias")]
    assert head and not torch.equal(saved[head[0]], initial[head[0]])
    adapters = [n for n in saved if "adapter" in n]
    assert bool(adapters) == bool(variant)


def test_real_size_script_runs_tiny_on_cpu():
    spec = importlib.util.spec_from_file_location(
        "ssl_real_size", REPO / "benchmarks" / "ssl_real_size.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--tiny", "--utterances", "2", "--seconds", "1"])
    rows = [line.split("|")[1:-1] for line in report.splitlines()[-3:]]
    assert [r[0].strip() for r in rows] == list(module.CONFIGS)
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)


PROTOCOL = """
seed: 1234
title: SSL on Common Voice (tiny)
output_folder: {out}/protocol
data_folder: {out}/cv
data_preparation:
    - !name:recipes.common_voice.prepare.prepare_common_voice
        data_folder: {release}
        save_folder: {out}/cv
        locales: [en, fr, sv-SE, cs]
        target_locales: [cs]
inits:
    pretrain: hparams/multitask_ssl_ctc.yaml
    maml_lora: hparams/maml_lora_ssl_ctc.yaml
    random: null
adapted_inits: [maml_lora, random]
train_overrides:
    data_folder: {out}/cv
    skip_prep: True
    number_of_epochs: 1
    episodes_per_epoch: 2
    support_size: 3
    query_size: 3
    eval_support_size: 1
    eval_query_size: 1
    tasks_per_batch: 2
    ssl_source: {source}
    ssl_cache: {out}/ssl_cache
init_overrides:
    maml_lora: {{init_from: {out}/protocol/train/pretrain}}
targets:
    cs: {{data_folder: {out}/cv, task: cs}}
budgets: ["4 utterances"]
budget_unit: minutes
curve_steps: [0, 2]
adapt_hparams: hparams/adapt_ssl_ctc.yaml
adapt_overrides: {{ssl_source: {source}, ssl_cache: {out}/ssl_cache}}
adapt_hparams_of: {{maml_lora: hparams/adapt_lora_ssl_ctc.yaml}}
comparisons: [[maml_lora, random]]
"""


def test_the_protocol_on_common_voice_manifests_with_an_ssl_encoder(
    tiny_ssl, tiny_corpus, no_network, tmp_path
):
    """A Common Voice release, an SSL multitask pre-training continued by LoRA
    MAML, adapted with its own YAML: the whole protocol, offline."""
    from release_fixtures import build_common_voice_release

    release = build_common_voice_release(tmp_path, tiny_corpus)
    yaml = tmp_path / "protocol.yaml"
    yaml.write_text(
        PROTOCOL.format(
            out=tmp_path, release=release.folder, source=tiny_ssl["wav2vec2"]
        )
    )
    run_script("evaluate_adaptation.py", yaml, no_network, "--noprogressbar")
    with open(tmp_path / "protocol" / "adaptation.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["init"], r["step"]) for r in rows} == {
        (init, step) for init in ("maml_lora", "random") for step in ("0", "2")
    }
    adapted = tmp_path / "protocol" / "adapt" / "cs" / "4utt" / "maml_lora"
    assert "adapter" in "".join(torch.load(adapted / "save/CKPT+adapted/model.ckpt"))
    assert (adapted / "inference" / "hyperparams.yaml").is_file()
    assert str(tiny_ssl["wav2vec2"]) in (adapted / "hyperparams.yaml").read_text()


def autograd_nodes(tensors) -> set:
    """The names of the autograd nodes the tensors' graph holds."""
    seen, names = set(), set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return names


def test_second_order_anil_runs_the_encoder_on_the_fused_attention(tiny_ssl, tmp_path):
    """ANIL's shared body pass is differentiated once: in second order too
    its attention keeps no attention maps (the math backend's softmax and
    matrix products)."""
    brain = brain_of("maml_anil_ssl_ctc.yaml", tiny_ssl["wav2vec2"], tmp_path)
    with second_order_context():
        states = brain.body_pass(batch(0), brain.copy_buffers())
    names = autograd_nodes(s for s in states if isinstance(s, torch.Tensor))
    assert any("ScaledDotProduct" in name for name in names), sorted(names)
    assert "SoftmaxBackward0" not in names


def test_a_recomputed_anil_body_pass_gives_the_same_gradient(tiny_ssl, tmp_path):
    """checkpoint_inner_steps recomputes the body pass in the backward pass
    of a second-order step: with the same kernels as its first run."""
    brain = brain_of("maml_anil_ssl_ctc.yaml", tiny_ssl["wav2vec2"], tmp_path)
    encoder = [p for p in brain.modules.parameters() if p.requires_grad]

    def gradient(recompute: bool) -> list:
        torch.manual_seed(0)
        with second_order_context():
            buffers = brain.copy_buffers()
            states = brain.body_pass(batch(0), buffers, recompute=recompute)
            loss = sum(s.pow(2).sum() for s in states if isinstance(s, torch.Tensor))
            return torch.autograd.grad(loss, encoder, allow_unused=True)

    for plain, recomputed in zip(gradient(False), gradient(True)):
        assert (plain is None) == (recomputed is None)
        if plain is not None:
            torch.testing.assert_close(recomputed, plain, rtol=1e-10, atol=1e-12)

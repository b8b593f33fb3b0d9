r"""SpeechBrain inference interfaces for the models of ``train.py`` and ``adapt.py``.

:func:`export_inference` writes an inference folder from a run (its
checkpoint of lowest validation CER, or an ``adapt.py`` run's adapted model)
or from one ``CKPT+`` folder, as SpeechBrain's pretrained models are: an
inference ``hyperparams.yaml`` whose ``pretrainer`` loads ``model.ckpt`` (the
run's weights, adapters included) and ``tokenizer.ckpt`` (the character
encoder) from the folder itself, and ``lm.arpa`` (or ``lm.bin``) when the
decoding uses an n-gram. ``train.py`` and ``adapt.py`` write one into
``<output_folder>/inference/``; the command exports any other::

    python -m speechbrain_meta.inference results/maml_ctc/1234 models/maml_ctc

The folder loads with SpeechBrain's ``EncoderASR.from_hparams`` (CTC models)
and with :class:`CTCASR` / :class:`AttentionASR`, small subclasses of
``EncoderASR`` and ``EncoderDecoderASR`` that read audio as the recipe does
(:func:`speechbrain_meta.audio.read_audio`: any format, rate and channel
count) and decode as its evaluation does (:class:`~speechbrain_meta.decoding.CTCDecoder`
for CTC, the YAML's ``test_search`` for joint CTC + attention models), so that
they return exactly the hypotheses the evaluation scored, words joined by one
space. :func:`load_asr` picks the class. ``run_opts={"device": "cuda"}`` runs
them on a GPU.

Example
-------
>>> from speechbrain_meta.hparams import load_hparams, resolve_hparams
>>> run = getfixture("tmp_path") / "run"
>>> hparams = load_hparams("hparams/maml_ctc.yaml", {"output_folder": str(run)})
>>> encoder = sb.dataio.encoder.CTCTextEncoder()
>>> encoder.update_from_iterable(["ahoj svete"], sequence_input=True)
>>> encoder.insert_blank(index=hparams["blank_index"])
>>> encoder.save(str(run / "save" / "label_encoder.txt"))
>>> _ = (run / "hyperparams.yaml").write_text(resolve_hparams(
...     "hparams/maml_ctc.yaml", {"output_folder": str(run)}))
>>> _ = hparams["checkpointer"].save_checkpoint(meta={"CER": 50.0})
>>> folder = export_inference(str(run), str(run / "inference"))
>>> sorted(os.listdir(folder))
['hyperparams.yaml', 'model.ckpt', 'tokenizer.ckpt']
>>> asr = load_asr(folder, savedir=str(run / "loaded"))
>>> type(asr).__name__, isinstance(asr, EncoderASR)
('CTCASR', True)
>>> isinstance(asr.transcribe_batch(torch.rand(2, 16000), torch.ones(2))[0][0], str)
True
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
from typing import Optional, Sequence

import ruamel.yaml
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR
from speechbrain.utils.distributed import if_main_process

from speechbrain_meta.adaptation import _resize_rows, _row_holder, find_init_checkpoint
from speechbrain_meta.asr import has_checkpoints
from speechbrain_meta.audio import read_audio
from speechbrain_meta.decoding import CTC_DECODERS, CTCDecoder, label_words
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import run_script

__all__ = [
    "AttentionASR",
    "CTCASR",
    "add_decoding_options",
    "decoding_overrides",
    "export_inference",
    "export_run",
    "fit_rows",
    "load_asr",
    "main",
    "pieces",
    "transcribe_long",
    "write_inference",
]

logger = logging.getLogger(__name__)

# The run's keys that the model and its decoding need (those it has).
MODEL_KEYS = (
    "sample_rate", "blank_index", "bos_index", "eos_index", "pad_index",
    "decoder_type", "model_name", "compute_features", "normalize", "log_softmax",
    "model", "adapters", "token_layers", "test_search",
    "ctc_decoder", "beam_size", "kenlm_model_path", "alpha", "beta",
)  # fmt: skip
DECODING_KEYS = ("ctc_decoder", "beam_size", "kenlm_model_path", "alpha", "beta")

_INFERENCE = {
    None: """
asr_encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <model_modules[encoder]>
    ctc_lin: !ref <model_modules[ctc_lin]>
    log_softmax: !ref <log_softmax>
modules:
    encoder: !ref <asr_encoder>
""",
    "transformer": """
asr_encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    CNN: !ref <model_modules[CNN]>
transformer_beam_search: True
modules:
    encoder: !ref <asr_encoder>
    transformer: !ref <model_modules[Transformer]>
    decoder: !ref <test_search>
""",
    "rnn": """
asr_encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <model_modules[encoder]>
modules:
    encoder: !ref <asr_encoder>
    decoder: !ref <test_search>
""",
}


def fit_rows(layers: Sequence[torch.nn.Module], rows: int) -> None:
    """Grow the token layers to ``rows`` rows, as the vocabulary extension did.

    An inference YAML calls it before the weights load when a run's output
    layers grew past ``output_neurons`` (a target with more new letters than
    spare rows).

    Arguments
    ---------
    layers : sequence of torch.nn.Module
        The YAML's ``token_layers``.
    rows : int
        Their number of rows in the checkpoint.
    """
    for layer in layers:
        _resize_rows(_row_holder(layer), rows)


def _block_style(node) -> None:
    """Drop the comments of a ruamel tree and write it in block style."""
    if isinstance(node, (CommentedMap, CommentedSeq)):
        node.fa.set_block_style()
        node.ca.items.clear()
        node.ca.comment = None
        for child in node.values() if isinstance(node, CommentedMap) else node:
            _block_style(child)


def _inference_yaml(tree, labels: int, grown: bool, overrides: dict) -> str:
    """The inference ``hyperparams.yaml`` of a run's resolved YAML (ruamel tree).

    ``labels``: the size of the character encoder; ``grown``: whether the
    token layers grew to it past ``output_neurons``.
    """
    yaml = ruamel.yaml.YAML()
    selected = CommentedMap()
    for key in tree:
        if key in MODEL_KEYS:
            selected[key] = tree[key]
    selected["model_modules"] = tree["modules"]
    for key in DECODING_KEYS:
        if key in overrides or (key in selected and "test_search" not in selected):
            selected[key] = overrides.get(key, selected.get(key))
    _block_style(selected)
    stream = io.StringIO()
    yaml.dump(selected, stream)
    decoder_type = selected.get("decoder_type")
    if decoder_type not in _INFERENCE:
        raise SetupError(f"Cannot export a model of decoder_type {decoder_type!r}.")
    lines = [
        "# The model's part of the run's hyperparams.yaml (docs/inference.md).",
        stream.getvalue(),
        "# ---------------------------------------------------------------- inference",
        "tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder",
    ]
    if selected.get("adapters") is not None:
        lines.append(
            "__adapters: !apply:speechbrain_meta.asr.insert_adapters "
            "[{adapters: !ref <adapters>}]"
        )
    if grown:
        lines.append(
            "__rows: !apply:speechbrain_meta.inference.fit_rows "
            f"[!ref <token_layers>, {labels}]"
        )
    lines.append(_INFERENCE[decoder_type])
    if decoder_type is None:
        lines.append(_speechbrain_decoding(selected, labels))
    lines.append(
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n"
        "    loadables:\n"
        "        model: !ref <model>\n"
        "        tokenizer: !ref <tokenizer>\n"
    )
    return "\n".join(lines)


def _speechbrain_decoding(hparams: dict, labels: int) -> str:
    """``decoding_function`` (and ``test_beam_search``) for SpeechBrain's EncoderASR."""
    kind = hparams.get("ctc_decoder") or "greedy"
    if kind == "greedy":
        return (
            "decoding_function: !name:speechbrain_meta.decoding.ctc_greedy_labels\n"
            "    blank_id: !ref <blank_index>\n"
            f"    num_labels: {labels}\n"
        )
    searcher = CTC_DECODERS[kind]
    lines = [
        f"decoding_function: !name:{searcher.__module__}.{searcher.__name__}",
        "test_beam_search:",
        "    blank_index: !ref <blank_index>",
        "    space_token: ' '",
    ]
    lines += [
        f"    {key}: !ref <{key}>"
        for key in ("beam_size", "kenlm_model_path", "alpha", "beta")
        if hparams.get(key) is not None
    ]
    return "\n".join(lines) + "\n"


def write_inference(
    run_yaml: str,
    paramfile: str,
    label_encoder_file: str,
    folder: str,
    overrides: Optional[dict] = None,
) -> str:
    """Write an inference folder from a run's YAML, weights and encoder.

    Arguments
    ---------
    run_yaml : str
        The run's resolved ``hyperparams.yaml`` (text).
    paramfile : str
        The ``model.ckpt`` of the checkpoint.
    label_encoder_file : str
        The run's ``label_encoder.txt``.
    folder : str
        The inference folder to write (created; files replaced).
    overrides : dict, optional
        Decoding keys to set (``ctc_decoder``, ``beam_size``,
        ``kenlm_model_path``, ``alpha``, ``beta``); an n-gram file is copied
        into the folder.

    Returns
    -------
    str
        ``folder``.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the weights do not load into the model the YAML describes.
    """
    overrides = dict(overrides or {})
    encoder = sb.dataio.encoder.CTCTextEncoder.from_saved(label_encoder_file)
    tree = ruamel.yaml.YAML().load(run_yaml)
    lm = overrides.get("kenlm_model_path", tree.get("kenlm_model_path"))
    os.makedirs(folder, exist_ok=True)
    if lm is not None:
        name = "lm" + (".arpa" if lm.endswith(".arpa") else ".bin")
        shutil.copyfile(lm, os.path.join(folder, name))
        overrides["kenlm_model_path"] = os.path.join(os.path.abspath(folder), name)
    # Token layers that grew past output_neurons have one row per label.
    grown = len(encoder) > tree.get("output_neurons", len(encoder))
    text = _inference_yaml(tree, len(encoder), grown, overrides)
    hparams = load_hyperpyyaml(text)
    state = torch.load(paramfile, map_location="cpu", weights_only=True)
    try:
        hparams["model"].load_state_dict(state)
    except RuntimeError as error:
        raise SetupError(
            f"The weights {paramfile} do not load into the model of the run's "
            f"hyperparams.yaml: {error}"
        ) from error
    with open(os.path.join(folder, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(text)
    shutil.copyfile(paramfile, os.path.join(folder, "model.ckpt"))
    encoder.save(os.path.join(folder, "tokenizer.ckpt"))
    return folder


def export_inference(
    path: str,
    folder: str,
    min_key: Optional[str] = "CER",
    overrides: Optional[dict] = None,
) -> str:
    """Export the inference folder of a run or of one checkpoint.

    Arguments
    ---------
    path : str
        A ``train.py`` or ``adapt.py`` output folder (the checkpoint of lowest
        ``min_key``), its ``save/`` folder or one ``CKPT+`` folder; the run's
        ``hyperparams.yaml`` is the one beside ``save/``.
    folder : str
        The inference folder to write.
    min_key : str, optional
        Which checkpoint of a folder (None: the latest).
    overrides : dict, optional
        Decoding keys (see :func:`write_inference`).

    Returns
    -------
    str
        ``folder``.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If there is no checkpoint, run YAML or label encoder there.
    """
    try:
        init = find_init_checkpoint(path, min_key=min_key)
    except FileNotFoundError as error:
        raise SetupError(str(error)) from error
    run_yaml = os.path.join(os.path.dirname(init.save_folder), "hyperparams.yaml")
    for needed in (run_yaml, init.label_encoder_file):
        if not os.path.isfile(needed):
            raise SetupError(
                f"Cannot export {path}: {needed} does not exist (a train.py or "
                "adapt.py output folder has it)."
            )
    with open(run_yaml, encoding="utf-8") as stream:
        text = stream.read()
    return write_inference(
        text, init.paramfile, init.label_encoder_file, folder, overrides
    )


def export_run(hparams: dict, checkpoint: Optional[str] = None) -> None:
    """Export ``<output_folder>/inference`` at the end of a script (main process).

    Arguments
    ---------
    hparams : dict
        The script's loaded YAML (``output_folder``, ``save_folder``).
    checkpoint : str, optional
        The ``CKPT+`` folder in ``save_folder`` to export (``adapt.py``:
        ``CKPT+adapted``); None: the one of lowest validation CER. A run
    without checkpoints (``--debug``) writes none, with a warning.
    """
    if not if_main_process():
        return
    folder, save_folder = hparams["output_folder"], hparams["save_folder"]
    if not has_checkpoints(save_folder):  # SpeechBrain's --debug saves none
        logger.warning(f"No checkpoint in {save_folder}: no inference folder.")
        return
    path = folder if checkpoint is None else os.path.join(save_folder, checkpoint)
    export_inference(path, os.path.join(folder, "inference"))


class _FolderMixin:
    """Audio read as the recipe reads it; the folder's n-gram wherever it is."""

    @classmethod
    def from_hparams(cls, source, hparams_file="hyperparams.yaml", **kwargs):
        """SpeechBrain's ``from_hparams``, with the ``lm.*`` of a local ``source``.

        The exported YAML names the n-gram by its path at export; a folder
        moved since finds its own.
        """
        overrides = dict(kwargs.pop("overrides", None) or {})
        for name in ("lm.arpa", "lm.bin"):
            lm = os.path.join(str(source), name)
            if os.path.isfile(lm):
                overrides.setdefault("kenlm_model_path", os.path.abspath(lm))
        return super().from_hparams(source, hparams_file, overrides=overrides, **kwargs)

    def load_audio(self, path, savedir=None):
        """Read ``path`` as the recipe does: any format, resampled, down-mixed."""
        return read_audio(str(path), self.hparams.sample_rate).to(self.device)


class CTCASR(_FolderMixin, EncoderASR):
    """``EncoderASR`` that decodes exactly as the evaluation (:class:`CTCDecoder`).

    ``transcribe_batch`` returns the words of the YAML's ``ctc_decoder``
    joined by one space, and the decoded words as lists.
    """

    def set_decoding_function(self):
        """The evaluation's decoder over the tokenizer's labels."""
        self.decoding_function = CTCDecoder.from_hparams(
            vars(self.hparams), self.tokenizer
        )

    def transcribe_batch(self, wavs, wav_lens):
        """Transcribe a batch of waveforms at the model's sample rate.

        Arguments
        ---------
        wavs : torch.Tensor
            ``(batch, samples)``, padded.
        wav_lens : torch.Tensor
            Relative lengths.

        Returns
        -------
        list of str
            The transcripts.
        list of list of str
            Their words.
        """
        with torch.no_grad():
            log_probs = self.encode_batch(wavs, wav_lens.to(self.device))
            words = self.decoding_function(log_probs, wav_lens)
        return [" ".join(w) for w in words], words


class AttentionASR(_FolderMixin, EncoderDecoderASR):
    """``EncoderDecoderASR`` of a joint CTC + attention model of the plugin.

    Decodes with the YAML's ``test_search`` (as the test stage does) and maps
    the tokens to words with the character encoder. The weights keep
    ``requires_grad`` (transcription runs under ``torch.no_grad`` anyway):
    frozen, torch's ``MultiheadAttention`` takes its fused fast path, which
    rounds differently (about 1e-6) from the evaluation's and flips near ties
    of the beam search.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for parameter in self.mods.parameters():
            parameter.requires_grad_(True)

    def transcribe_batch(self, wavs, wav_lens):
        """Transcribe a batch (see :meth:`CTCASR.transcribe_batch`)."""
        with torch.no_grad():
            wav_lens = wav_lens.to(self.device)
            encoded = self.encode_batch(wavs, wav_lens)
            tokens, _, _, _ = self.mods.decoder(encoded, wav_lens)
        words = [label_words(seq, self.tokenizer.ind2lab) for seq in tokens]
        return [" ".join(w) for w in words], words


def load_asr(folder: str, savedir: Optional[str] = None, **kwargs):
    """Load an inference folder with :class:`CTCASR` or :class:`AttentionASR`.

    Arguments
    ---------
    folder : str
        The inference folder.
    savedir : str, optional
        Where SpeechBrain links the files (default: ``<folder>/.loaded``).
    **kwargs
        Passed to ``from_hparams`` (e.g. ``run_opts={"device": "cuda"}``).

    Returns
    -------
    CTCASR or AttentionASR

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If ``folder`` is not an inference folder.
    """
    yaml = os.path.join(folder, "hyperparams.yaml")
    missing = [
        name
        for name in ("hyperparams.yaml", "model.ckpt", "tokenizer.ckpt")
        if not os.path.isfile(os.path.join(folder, name))
    ]
    if missing:
        raise SetupError(
            f"{folder} is not a speechbrain-meta model folder (no "
            f"{', '.join(missing)}): give the inference/ folder of a train.py or "
            "adapt.py run, or export one with python -m speechbrain_meta.inference."
        )
    with open(yaml, encoding="utf-8") as stream:
        attention = "\ntest_search:" in stream.read()
    cls = AttentionASR if attention else CTCASR
    savedir = savedir or os.path.join(folder, ".loaded")
    return cls.from_hparams(source=os.path.abspath(folder), savedir=savedir, **kwargs)


def pieces(signal: torch.Tensor, sample_rate: int, max_seconds: float) -> list:
    """Cut a long signal into pieces of at most ``max_seconds``, at quiet points.

    Each cut is at the centre of the quietest 10 ms in the second half of the
    remaining window, so that a word is rarely cut (no overlap: nothing to
    merge).

    Arguments
    ---------
    signal : torch.Tensor
        ``(samples,)``.
    sample_rate : int
        Its rate.
    max_seconds : float
        The longest piece.

    Returns
    -------
    list of tuple
        ``(start, end)`` sample indices, covering the signal.

    Example
    -------
    >>> speech = torch.ones(1000)
    >>> speech[300:320] = 0  # a pause at 0.3 s, and at 1.3 s once doubled
    >>> pieces(torch.cat([speech, speech]), 1000, 1.5)
    [(0, 1305), (1305, 2000)]
    """
    window, limit = max(1, sample_rate // 100), int(max_seconds * sample_rate)
    cuts, start = [], 0
    while len(signal) - start > limit:
        low = start + limit // 2
        energy = signal[low : start + limit].unfold(0, window, window).pow(2).mean(-1)
        cut = low + int(energy.argmin()) * window + window // 2
        cuts.append((start, cut))
        start = cut
    return [*cuts, (start, len(signal))]


def transcribe_long(asr, path: str, max_seconds: float) -> str:
    """Transcribe a file of any length: whole, or in :func:`pieces` if longer.

    Arguments
    ---------
    asr : CTCASR or AttentionASR
        The model.
    path : str
        An audio file (any format, rate and channel count).
    max_seconds : float
        Longer files are transcribed in pieces of at most this length.

    Returns
    -------
    str
        The words, joined by one space.
    """
    signal = asr.load_audio(path)
    rate = asr.hparams.sample_rate
    texts = [
        asr.transcribe_batch(signal[None, start:end], torch.ones(1))[0][0]
        for start, end in pieces(signal.cpu(), rate, max_seconds)
    ]
    return " ".join(text for text in texts if text)


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """The command-line options of the CTC decoding keys (:data:`DECODING_KEYS`)."""
    parser.add_argument("--ctc_decoder", choices=list(CTC_DECODERS))
    parser.add_argument("--beam_size", type=int)
    parser.add_argument("--kenlm_model_path")
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--beta", type=float)


def decoding_overrides(args: dict) -> dict:
    """The decoding keys given on a command line (see :func:`add_decoding_options`)."""
    return {key: args[key] for key in DECODING_KEYS if args[key] is not None}


def main(argv: Optional[Sequence[str]] = None) -> str:
    """``python -m speechbrain_meta.inference export PATH FOLDER [--key value]``."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_meta.inference",
        description="Export a SpeechBrain inference folder (docs/inference.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a run or a checkpoint")
    export.add_argument("path", help="run folder, save/ folder or CKPT+ folder")
    export.add_argument("folder", help="the inference folder to write")
    export.add_argument("--min_key", default="CER", help="checkpoint to take")
    add_decoding_options(export)
    args = vars(parser.parse_args(argv))
    overrides = decoding_overrides(args)
    folder = export_inference(args["path"], args["folder"], args["min_key"], overrides)
    print(f"Inference folder: {folder}")
    return folder


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

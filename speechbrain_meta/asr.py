"""The ASR recipe that every script of speechbrain-meta shares.

:class:`ASR` holds an ordinary SpeechBrain recipe's methods
(``compute_forward``, ``compute_objectives``, ``on_stage_start``,
``on_stage_end``) for the CTC and the joint CTC + attention models of
``hparams/models/``; ``train.py`` mixes it into the YAML's ``brain_class``
(a meta-learning Brain), ``adapt.py`` into a plain ``speechbrain.Brain``. The
functions below are its data and initialisation steps:

* :func:`dataio_prepare`: the manifests checked and read
  (:func:`read_manifests`), the source and target tasks (:func:`read_tasks`),
  the audio and character pipelines (:func:`add_pipelines`) and the character
  encoder, rebuilt when its record says other sources made it;
* :func:`warm_start`: the parameters and encoder of another run
  (``init_from``), loaded with :func:`load_parameters` around the YAML's
  ``adapters`` (:func:`insert_adapters`);
* :func:`load_initialisation` and :func:`target_datasets`: what ``adapt.py``
  starts from and adapts to.

Example
-------
>>> import speechbrain as sb
>>> from speechbrain_meta import MAML
>>> brain_class = type("ASRBrain", (ASR, MAML), {})
>>> [c.__name__ for c in brain_class.__mro__[:3]]
['ASRBrain', 'ASR', 'MAML']
"""

import json
import logging
import os
import shutil

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechbrain_meta.adaptation import (
    extend_vocabulary,
    find_init_checkpoint,
    load_init_parameters,
)
from speechbrain_meta.audio import read_audio
from speechbrain_meta.decoding import CTCDecoder, encoder_labels, label_words
from speechbrain_meta.errors import SetupError
from speechbrain_meta.label_encoder import (
    check_encoder_sources,
    missing_labels,
    read_encoder_record,
    write_encoder_record,
)
from speechbrain_meta.manifest_check import check_manifests
from speechbrain_meta.parameters import scale_learning_rates
from speechbrain_meta.task_manifests import (
    load_task_manifests,
    manifests_record,
    task_manifests,
)

__all__ = [
    "ASR",
    "add_pipelines",
    "dataio_prepare",
    "extend_warm_start_vocabulary",
    "has_checkpoints",
    "insert_adapters",
    "load_initialisation",
    "load_parameters",
    "read_manifests",
    "read_tasks",
    "special_labels",
    "target_datasets",
    "warm_start",
]

logger = logging.getLogger(__name__)


class ASR:
    """ASR recipe methods, mixed into the Brain class named in the YAML.

    Without a YAML ``decoder_type`` the model is CTC only (modules ``encoder``
    and ``ctc_lin``; with ``encoder_lengths: True`` the encoder also gets the
    relative lengths, as SpeechBrain's Hugging Face wrappers take them). With
    ``decoder_type: transformer`` (modules ``CNN``,
    ``Transformer``, ``ctc_lin``, ``seq_lin``) or ``decoder_type: rnn``
    (``encoder``, ``embedding``, ``decoder``, ``ctc_lin``, ``seq_lin``) it is a
    joint CTC + attention model: the loss is ``ctc_weight * CTC +
    (1 - ctc_weight) * NLL`` and evaluation decodes with the YAML's
    ``valid_search`` and ``test_search`` beam searchers.
    """

    # The modules of compute_head: an inner loop that adapts only these
    # (ANIL) computes compute_body once per batch (MetaBrain.body_pass).
    head_modules = ("ctc_lin", "seq_lin")

    def compute_forward(self, batch, stage):
        """Waveforms -> features -> encoder (-> decoder) -> log-probabilities.

        CTC models return ``(p_ctc, wav_lens)``; joint models return
        ``(p_ctc, p_seq, wav_lens, hyps)``, ``hyps`` being the beam search
        hypotheses outside training (None in training). The pass is
        :meth:`compute_body` followed by :meth:`compute_head`.
        """
        return self.compute_head(self.compute_body(batch, stage), batch, stage)

    def compute_body(self, batch, stage) -> tuple:
        """Everything before the output layers (``head_modules``).

        ``(encoded, wav_lens)`` for CTC models, ``(encoded, decoded,
        wav_lens)`` for joint models: the encoder states and the
        teacher-forced decoder states.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        augment = getattr(self.hparams, "speed_perturb", None)
        if stage == sb.Stage.TRAIN and augment is not None:
            wavs = augment(wavs)
        feats = self.hparams.compute_features(wavs)
        feats = self.hparams.normalize(feats, wav_lens)
        decoder_type = getattr(self.hparams, "decoder_type", None)
        if decoder_type is None:
            if getattr(self.hparams, "encoder_lengths", False):
                return self.modules.encoder(feats, wav_lens), wav_lens
            return self.modules.encoder(feats), wav_lens
        encoded, decoded = self.encode_decode(
            decoder_type, feats, batch.tokens_bos.data, wav_lens
        )
        return encoded, decoded, wav_lens

    def compute_head(self, body: tuple, batch, stage):
        """The output layers on :meth:`compute_body`'s states.

        Also the beam search of joint models outside training.
        """
        if len(body) == 2:
            encoded, wav_lens = body
            return self.hparams.log_softmax(self.modules.ctc_lin(encoded)), wav_lens
        encoded, decoded, wav_lens = body
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(encoded))
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(decoded))
        hyps = None
        if stage != sb.Stage.TRAIN:
            search = (
                self.hparams.valid_search
                if stage == sb.Stage.VALID
                else self.hparams.test_search
            )
            hyps, _, _, _ = search(encoded.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def init_optimizers(self):
        """The Brain's optimizer, its learning rates scaled by ``lr_scales``.

        ``lr_scales`` (YAML, optional) maps parameter patterns (module names
        or globs, :mod:`speechbrain_meta.parameters`) to factors of the
        optimizer's learning rate: e.g. ``{encoder: 0.05}`` gives a pretrained
        encoder its own, lower rate (:func:`scale_learning_rates`).
        """
        super().init_optimizers()
        scales = getattr(self.hparams, "lr_scales", None)
        if scales and getattr(self, "optimizer", None) is not None:
            scale_learning_rates(self.optimizer, self.modules, scales)

    def encode_decode(self, decoder_type, feats, tokens_bos, wav_lens):
        """Encoder and teacher-forced decoder states of a joint model."""
        if decoder_type == "transformer":
            return self.modules.Transformer(
                self.modules.CNN(feats),
                tokens_bos,
                wav_lens,
                pad_idx=self.hparams.pad_index,
            )
        if decoder_type == "rnn":
            encoded = self.modules.encoder(feats)
            embedded = self.modules.embedding(tokens_bos)
            decoded, _ = self.modules.decoder(embedded, encoded, wav_lens)
            return encoded, decoded
        raise ValueError(
            f"decoder_type must be transformer or rnn, not {decoder_type!r}."
        )

    def compute_objectives(self, predictions, batch, stage):
        """CTC (+ attention) loss; error rates of the decoding outside training.

        CTC models are decoded with the YAML's ``ctc_decoder`` (greedy by
        default, :meth:`decode_ctc`), joint models by beam search.
        """
        tokens, tokens_lens = batch.tokens
        if len(predictions) == 2:
            p_ctc, wav_lens = predictions
            loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
            if stage != sb.Stage.TRAIN:
                predicted = self.decode_ctc(p_ctc, wav_lens)
        else:
            p_ctc, p_seq, wav_lens, hyps = predictions
            tokens_eos, tokens_eos_lens = batch.tokens_eos
            loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
            loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens)
            weight = self.hparams.ctc_weight
            loss = weight * loss_ctc + (1 - weight) * loss_seq
            if stage != sb.Stage.TRAIN:
                predicted = [self.to_words(seq) for seq in hyps]
        if stage != sb.Stage.TRAIN:
            targets = [text.split() for text in batch.wrd]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
        return loss

    def to_words(self, tokens) -> list:
        """Words of a decoded token sequence.

        Spare output rows (``output_neurons`` above the number of labels) have
        no label yet; an untrained model may still emit them, and they are
        skipped.
        """
        return label_words(tokens, self.tokenizer.ind2lab)

    def decode_ctc(self, p_ctc, wav_lens) -> list:
        """Words of each utterance of a batch of CTC log-probabilities.

        The YAML's ``ctc_decoder`` (:class:`speechbrain_meta.decoding.CTCDecoder`)
        over the labels of ``self.tokenizer``, made again when they change
        (``adapt.py`` adds a target's letters).
        """
        decoder = getattr(self, "_ctc_decoder", None)
        if decoder is None or decoder.labels != encoder_labels(self.tokenizer):
            decoder = CTCDecoder.from_hparams(vars(self.hparams), self.tokenizer)
            self._ctc_decoder = decoder
        return decoder(p_ctc, wav_lens)

    def on_stage_start(self, stage, epoch=None):
        """Fresh error-rate statistics for every evaluation stage."""
        super().on_stage_start(stage, epoch)
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, checkpoint on the validation CER, write the test error rates.

        The training loss is logged under the name the algorithm gives it
        (``train_loss_name``: e.g. ``query_loss`` for MAML, ``loss`` for a
        plain Brain), with what the Brain adds (``train_log_stats``: the
        learnt inner rates); evaluation stages log how many tasks could not be
        scored (``unscored_tasks``), when any.
        """
        if stage == sb.Stage.TRAIN:
            self.train_stats = {getattr(self, "train_loss_name", "loss"): stage_loss}
            self.train_stats.update(getattr(self, "train_log_stats", dict)())
            return
        stats = {"loss": stage_loss}
        unscored = getattr(self, "unscored_tasks", 0)
        if not self.cer_metric.scores:
            raise RuntimeError(
                f"No {stage.name} utterance could be scored ({unscored} tasks were "
                "not scored: non-finite losses, see the warnings above)."
            )
        if unscored:
            stats["unscored_tasks"] = unscored
        stats["CER"] = self.cer_metric.summarize("error_rate")
        stats["WER"] = self.wer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"CER": stats["CER"]}, min_keys=["CER"]
            )
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stats,
            )
            if if_main_process():
                folder = self.hparams.output_folder
                with open(os.path.join(folder, "wer.txt"), "w") as w:
                    self.wer_metric.write_stats(w)
                with open(os.path.join(folder, "cer.txt"), "w") as w:
                    self.cer_metric.write_stats(w)


def read_tasks(hparams: dict, dataset) -> tuple:
    """The source and target tasks, from the YAML or the corpus record.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If a source or target task is not in ``train_csv``, or a task is
        both.
    """
    key = hparams["task_key"]
    present = {str(dataset.data[i][key]) for i in dataset.data_ids}
    targets = hparams["target_tasks"]
    record = os.path.join(hparams["data_folder"], "corpus.json")
    if targets is None and os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            targets = json.load(f)["targets"]
    elif targets is None:
        logger.warning(
            f"No held-out target tasks: target_tasks is null and {record} does "
            "not exist, so every task of train_csv may be a source. Set "
            "--target_tasks to hold languages out."
        )
    targets = [str(t) for t in targets or []]
    sources = hparams["source_tasks"]
    if sources is None:
        sources = sorted(present - set(targets))
    sources = [str(t) for t in sources]
    unknown = sorted(set(sources) - present)
    if unknown:
        raise SetupError(
            f"source_tasks {unknown} are not '{key}' values of "
            f"{hparams['train_csv']} (it has {sorted(present)}): fix --source_tasks."
        )
    overlap = set(sources) & set(targets)
    if overlap:
        raise SetupError(
            f"Tasks {sorted(overlap)} are both source and target: remove them "
            "from --source_tasks or --target_tasks."
        )
    return sources, targets


def read_manifests(hparams: dict, splits=("train", "valid", "test")) -> dict:
    """The train, valid and test data of the YAML, every task included.

    Each of ``train_csv``, ``valid_csv`` and ``test_csv`` is a manifest with
    the task column, a mapping from task to a manifest without it, or a list
    of either (:mod:`speechbrain_meta.task_manifests`). The manifests are
    checked first (:func:`check_manifests`: columns, durations, transcripts,
    audio headers), only those of ``splits``; with ``skip_bad_rows: True``
    the rows with problems are left out and counted, otherwise every problem
    is reported at once. The
    transcripts are then normalised as the recipes' are, unless
    ``keep_text_verbatim: True``.
    """
    splits = {
        split: task_manifests(hparams[f"{split}_csv"], f"{split}_csv")
        for split in splits
        if hparams.get(f"{split}_csv")
    }
    replacements = {"data_root": hparams["data_folder"]}
    skip_bad_rows = hparams.get("skip_bad_rows", False)
    bad = check_manifests(
        {split: [entry.path for entry in entries] for split, entries in splits.items()},
        skip_bad_rows=skip_bad_rows,
        without_task_column=[
            entry.path for entries in splits.values() for entry in entries if entry.task
        ],
        task_key=hparams["task_key"],
        replacements=replacements,
        sample_rate=hparams["sample_rate"],
        convert_audio=hparams.get("convert_audio", True),
    )
    return {
        split: sb.dataio.dataset.DynamicItemDataset(
            load_task_manifests(
                entries,
                task_key=hparams["task_key"],
                option=f"{split}_csv",
                replacements=replacements,
                skip_ids=bad[split],
                keep_text_verbatim=hparams.get("keep_text_verbatim", False),
                skip_bad_rows=skip_bad_rows,
            )
        )
        for split, entries in splits.items()
    }


def add_pipelines(datasets: list, encoder, hparams: dict) -> None:
    """Audio and character pipelines of the recipe, encoded with ``encoder``.

    Audio is read at ``sample_rate``, resampled and down-mixed when needed
    (unless ``convert_audio: False``). The encoder is read when items are
    fetched, so it may still be filled in (``load_or_create``) or extended
    after this call.
    """
    sample_rate = hparams["sample_rate"]
    convert = hparams.get("convert_audio", True)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return read_audio(wav, sample_rate, convert)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides(
        "char_list", "tokens_list", "tokens", "tokens_bos", "tokens_eos"
    )
    def text_pipeline(wrd):
        char_list = list(wrd)
        yield char_list
        tokens_list = encoder.encode_sequence(char_list)
        yield tokens_list
        yield torch.LongTensor(tokens_list)
        yield torch.LongTensor([encoder.get_bos_index()] + tokens_list)
        yield torch.LongTensor(tokens_list + [encoder.get_eos_index()])

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(
        datasets, ["id", "sig", "wrd", "tokens", "tokens_bos", "tokens_eos"]
    )


def special_labels(hparams: dict) -> dict:
    """The blank, bos, eos and unknown labels of the character encoder."""
    return {
        "blank_label": hparams["blank_index"],
        "bos_label": hparams["bos_index"],
        "eos_label": hparams["eos_index"],
        "unk_label": "<unk>",
    }


def has_checkpoints(save_folder: str) -> bool:
    """Whether a run's save folder holds any ``CKPT+`` checkpoint."""
    return os.path.isdir(save_folder) and any(
        name.startswith("CKPT") for name in os.listdir(save_folder)
    )


def _texts(dataset) -> list:
    return [dataset.data[i]["wrd"] for i in dataset.data_ids]


def extend_warm_start_vocabulary(encoder, texts: list, hparams: dict) -> None:
    """Add the letters of ``texts`` that a warm start's encoder lacks.

    As ``adapt.py`` does (:func:`extend_vocabulary`): each new letter gets
    the next label and a row in every ``token_layers`` layer, copied from its
    base letter's row (``é`` from ``e``) or the mean of the letters' rows;
    the layers grow if they have no spare rows. A warning names the letters;
    the run's ``label_encoder.txt`` and its record are rewritten. On a resume
    the encoder already has them, and the layers only grow to fit it, so that
    the run's checkpoint loads.

    Arguments
    ---------
    encoder : speechbrain.dataio.encoder.CTCTextEncoder
        The run's encoder, copied from the initialisation; extended in place.
    texts : list of str
        The transcripts of the source tasks.
    hparams : dict
        The loaded YAML (``label_encoder_file``, ``token_layers``).
    """
    encoder_file = hparams["label_encoder_file"]
    new = extend_vocabulary(encoder, texts, hparams["token_layers"])
    if not new:
        return
    origins = ", ".join(f"{c}<-{b or 'mean'}" for c, b in new.items())
    logger.warning(
        f"The warm start's label encoder has no label for {list(new)} of the "
        f"source tasks: added them (output rows copied from: {origins}) and "
        f"saved the encoder as {encoder_file}."
    )
    record = read_encoder_record(encoder_file) or {}
    run_on_main(encoder.save, args=[encoder_file])
    run_on_main(
        write_encoder_record,
        args=[encoder_file],
        kwargs={
            "copied_from": record.get("copied_from"),
            "added_labels": record.get("added_labels", []) + list(new),
        },
    )


def _warn_unknown_letters(encoder, datasets: dict) -> None:
    for split in ("valid", "test"):
        if split in datasets:
            unknown = missing_labels(encoder, _texts(datasets[split]))
            if unknown:
                logger.warning(
                    f"The {split} transcripts have letters that the source tasks "
                    f"lack, scored as <unk>: {unknown}."
                )


def dataio_prepare(hparams: dict) -> tuple:
    """Datasets of the source tasks and the shared character encoder.

    The encoder file is reused only when it was built from the same sources
    (or copied by a warm start); see :mod:`speechbrain_meta.label_encoder`.
    An encoder copied by a warm start gets the letters of the source tasks
    that it lacks (:func:`extend_warm_start_vocabulary`), so call this before
    the Brain is made: the model's output layers may grow.
    """
    datasets = read_manifests(hparams)
    sources, targets = read_tasks(hparams, datasets["train"])
    logger.info(f"Source tasks: {sources}; held-out targets: {targets}")
    key = hparams["task_key"]
    for split, data in datasets.items():
        datasets[split] = data.filtered_sorted(
            key_test={key: lambda task: str(task) in sources},
            key_max_value={"duration": hparams["max_duration"]},
        )

    encoder_file = hparams["label_encoder_file"]
    built_from = {
        "train_csv": manifests_record(hparams["train_csv"]),
        "task_key": key,
        "source_tasks": sources,
        "max_duration": hparams["max_duration"],
    }
    if hparams.get("keep_text_verbatim", False):
        # Only then: the records of earlier runs, without the key, still match.
        built_from["keep_text_verbatim"] = True
    run_on_main(
        check_encoder_sources,
        args=[encoder_file, built_from, has_checkpoints(hparams["save_folder"])],
    )
    encoder = sb.dataio.encoder.CTCTextEncoder()
    add_pipelines(list(datasets.values()), encoder, hparams)
    encoder.load_or_create(
        path=encoder_file,
        from_didatasets=[datasets["train"]],
        output_key="char_list",
        special_labels=special_labels(hparams),
        sequence_input=True,
    )
    # The main process reads the record and every rank gets its answer: a
    # rank reading it after the main process wrote it would skip the
    # collective of run_on_main below and hang the others.
    record = run_on_main(read_encoder_record, args=[encoder_file])
    if record is None:
        run_on_main(write_encoder_record, args=[encoder_file, built_from])
    texts = _texts(datasets["train"])
    warm_started = record is not None and record.get("copied_from") is not None
    if warm_started:
        extend_warm_start_vocabulary(encoder, texts, hparams)
    missing = missing_labels(encoder, texts)
    if missing:
        raise SetupError(
            f"The label encoder {encoder_file} has no label for {missing} of the "
            f"source tasks (they would be trained as <unk>): warm-start from an "
            "initialisation trained on these letters, or pass another "
            "--output_folder."
        )
    if len(encoder) > hparams["output_neurons"] and not warm_started:
        raise SetupError(
            f"The source tasks have {len(encoder)} tokens but the model has "
            f"output_neurons: {hparams['output_neurons']}; raise it in the YAML."
        )
    _warn_unknown_letters(encoder, datasets)
    return datasets, encoder


def insert_adapters(hparams: dict) -> None:
    """Put the YAML's adapters (key ``adapters``) into the model, once.

    ``adapters`` is a SpeechBrain ``AdaptedModel`` (or a list of them) built
    with ``manual_adapter_insertion: True``, so that an initialisation without
    adapters (a plain multitask pre-training) loads into the model first
    (:func:`load_parameters`).

    Arguments
    ---------
    hparams : dict
        The loaded YAML.
    """
    adapters = hparams.get("adapters")
    if adapters is None:
        return
    for adapted in adapters if isinstance(adapters, list) else [adapters]:
        if not getattr(adapted, "adapters_inserted", False):
            adapted.insert_adapters()
            adapted.adapters_inserted = True


def load_parameters(hparams: dict, path: str, min_key: str):
    """Load an initialisation into ``hparams["model"]``, adapters in place.

    A checkpoint that holds adapter weights (``adapter_`` in a name, as in
    SpeechBrain's ``LoRA`` and ``HoulsbyAdapterLinear``) loads after the
    adapters are inserted, one without them before (the adapters then start
    as SpeechBrain initialises them, LoRA's as the identity).

    Arguments
    ---------
    hparams : dict
        The loaded YAML (``model``, optional ``adapters``).
    path : str
        The initialisation (see
        :func:`~speechbrain_meta.adaptation.find_init_checkpoint`).
    min_key : str
        Which checkpoint of a folder.

    Returns
    -------
    speechbrain_meta.adaptation.InitCheckpoint
        What was loaded.
    """
    paramfile = find_init_checkpoint(path, min_key=min_key).paramfile
    saved = torch.load(paramfile, map_location="cpu", weights_only=True)
    if any("adapter_" in name for name in saved):
        insert_adapters(hparams)
    init = load_init_parameters(hparams["model"], path, min_key)
    insert_adapters(hparams)
    return init


def warm_start(hparams: dict) -> None:
    """Start from the parameters of another run (YAML ``init_from``).

    The model gets the parameters of ``init_from`` (a ``train.py`` output
    folder, a Checkpointer folder, a ``CKPT+`` folder or a ``model.ckpt``;
    in a folder, the checkpoint with the lowest ``init_min_key``) and the run
    its character encoder. A run that has its own checkpoint resumes from it:
    ``Brain.fit`` recovers it over these parameters.

    Arguments
    ---------
    hparams : dict
        The loaded YAML (``init_from``, ``init_min_key``, ``model``,
        ``label_encoder_file``).
    """
    if hparams.get("init_from") is None:
        insert_adapters(hparams)
        return
    init = load_parameters(
        hparams, hparams["init_from"], hparams.get("init_min_key", "CER")
    )
    logger.info(f"Warm start from {init.paramfile}")
    own_encoder = hparams["label_encoder_file"]
    # A run without a checkpoint of its own starts from the initialisation,
    # so the initialisation's encoder is the one to use.
    if os.path.isfile(init.label_encoder_file) and not has_checkpoints(
        hparams["save_folder"]
    ):
        os.makedirs(os.path.dirname(own_encoder), exist_ok=True)
        run_on_main(shutil.copyfile, args=[init.label_encoder_file, own_encoder])
        run_on_main(
            write_encoder_record,
            args=[own_encoder],
            kwargs={"copied_from": os.path.abspath(init.label_encoder_file)},
        )


def load_initialisation(hparams: dict):
    """Load the initialisation's parameters; return its character encoder.

    Arguments
    ---------
    hparams : dict
        The loaded YAML (``init_checkpoint``, ``init_min_key``,
        ``label_encoder_file``, ``model``).

    Returns
    -------
    speechbrain.dataio.encoder.CTCTextEncoder
        The encoder of the initialisation; only the special labels when a
        random initialisation has no ``label_encoder_file``.
    """
    encoder = sb.dataio.encoder.CTCTextEncoder()
    encoder_file = hparams["label_encoder_file"]
    path = hparams["init_checkpoint"]
    if path is not None:
        init = load_parameters(hparams, path, hparams["init_min_key"])
        logger.info(f"Initialisation: {init.paramfile}")
        encoder_file = encoder_file or init.label_encoder_file
    else:
        insert_adapters(hparams)
        logger.info("Initialisation: random")
    if encoder_file is None:
        encoder.handle_special_labels(special_labels(hparams))
    elif not os.path.isfile(encoder_file):
        raise FileNotFoundError(
            f"Label encoder '{encoder_file}' does not exist; set label_encoder_file."
        )
    else:
        encoder.load(encoder_file)
    return encoder


def target_datasets(hparams: dict) -> dict:
    """The train and test utterances of the target language.

    Arguments
    ---------
    hparams : dict
        The loaded YAML (manifests, ``task_key``, ``target``,
        ``max_duration``).

    Returns
    -------
    dict
        ``train`` and ``test`` DynamicItemDatasets.

    Raises
    ------
    ValueError
        If the target has no utterance in one of the two manifests.
    """
    manifests = read_manifests(hparams, ("train", "test"))
    key, target = hparams["task_key"], str(hparams["target"])
    datasets = {}
    for split in ("train", "test"):
        data = manifests[split]
        datasets[split] = data.filtered_sorted(
            key_test={key: lambda task: task == target},
            key_max_value={"duration": hparams["max_duration"]},
        )
        if len(datasets[split]) == 0:
            tasks = sorted({data.data[i][key] for i in data.data_ids})
            raise ValueError(
                f"Target '{target}' has no utterances of at most "
                f"{hparams['max_duration']} s in {hparams[f'{split}_csv']} "
                f"(its '{key}' values: {tasks})."
            )
    return datasets

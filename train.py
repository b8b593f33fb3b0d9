#!/usr/bin/env python3
"""Meta-train a multilingual ASR model, or train the multitask baseline.

The algorithm is the YAML's ``brain_class`` (``speechbrain_meta.MAML``,
``FOMAML``, ``Reptile`` or ``MultiTask``); the methods below are an ordinary
SpeechBrain ASR recipe and run unchanged under every one of them.

Example
-------
python train.py hparams/maml_ctc.yaml
python train.py hparams/reptile_ctc.yaml --data_folder data/embedded --output_folder out

Authors
-------
speechbrain-meta developers
"""

import json
import logging
import os
import shutil
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechbrain_meta.adaptation import load_init_parameters

logger = logging.getLogger(__name__)


class ASR:
    """ASR recipe methods, mixed into the Brain class named in the YAML.

    Without a YAML ``decoder_type`` the model is CTC only (modules ``encoder``
    and ``ctc_lin``). With ``decoder_type: transformer`` (modules ``CNN``,
    ``Transformer``, ``ctc_lin``, ``seq_lin``) or ``decoder_type: rnn``
    (``encoder``, ``embedding``, ``decoder``, ``ctc_lin``, ``seq_lin``) it is a
    joint CTC + attention model: the loss is ``ctc_weight * CTC +
    (1 - ctc_weight) * NLL`` and evaluation decodes with the YAML's
    ``valid_search`` and ``test_search`` beam searchers.
    """

    def compute_forward(self, batch, stage):
        """Waveforms -> features -> encoder (-> decoder) -> log-probabilities.

        CTC models return ``(p_ctc, wav_lens)``; joint models return
        ``(p_ctc, p_seq, wav_lens, hyps)``, ``hyps`` being the beam search
        hypotheses outside training (None in training).
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
            encoded = self.modules.encoder(feats)
            logits = self.modules.ctc_lin(encoded)
            return self.hparams.log_softmax(logits), wav_lens
        encoded, decoded = self.encode_decode(
            decoder_type, feats, batch.tokens_bos.data, wav_lens
        )
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

        CTC models are decoded greedily, joint models by beam search.
        """
        tokens, tokens_lens = batch.tokens
        if len(predictions) == 2:
            p_ctc, wav_lens = predictions
            loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
            if stage != sb.Stage.TRAIN:
                hyps = sb.decoders.ctc_greedy_decode(
                    p_ctc, wav_lens, blank_id=self.hparams.blank_index
                )
        else:
            p_ctc, p_seq, wav_lens, hyps = predictions
            tokens_eos, tokens_eos_lens = batch.tokens_eos
            loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
            loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens)
            weight = self.hparams.ctc_weight
            loss = weight * loss_ctc + (1 - weight) * loss_seq
        if stage != sb.Stage.TRAIN:
            predicted = [self.to_words(seq) for seq in hyps]
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
        labels = self.tokenizer.ind2lab
        return "".join(labels[t] for t in map(int, tokens) if t in labels).split()

    def on_stage_start(self, stage, epoch=None):
        """Fresh error-rate statistics for every evaluation stage."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, checkpoint on the validation CER, write the test error rates."""
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
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
    """The source and target tasks, from the YAML or the corpus record."""
    targets = hparams["target_tasks"]
    record = os.path.join(hparams["data_folder"], "corpus.json")
    if targets is None and os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            targets = json.load(f)["targets"]
    targets = list(targets or [])
    sources = hparams["source_tasks"]
    if sources is None:
        key = hparams["task_key"]
        present = {dataset.data[i][key] for i in dataset.data_ids}
        sources = sorted(present - set(targets))
    overlap = set(sources) & set(targets)
    if overlap:
        raise ValueError(f"Tasks {sorted(overlap)} are both source and target.")
    return list(sources), targets


def read_manifests(hparams: dict) -> dict:
    """The train, valid and test manifests of the YAML, every task included."""
    replacements = {"data_root": hparams["data_folder"]}
    return {
        split: sb.dataio.dataset.DynamicItemDataset.from_csv(
            hparams[f"{split}_csv"], replacements=replacements
        )
        for split in ("train", "valid", "test")
    }


def add_pipelines(datasets: list, encoder) -> None:
    """Audio and character pipelines of the recipe, encoded with ``encoder``.

    The encoder is read when items are fetched, so it may still be filled in
    (``load_or_create``) or extended after this call.
    """

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

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


def dataio_prepare(hparams: dict) -> tuple:
    """Datasets of the source tasks and the shared character encoder."""
    datasets = read_manifests(hparams)
    sources, targets = read_tasks(hparams, datasets["train"])
    logger.info(f"Source tasks: {sources}; held-out targets: {targets}")
    key = hparams["task_key"]
    for split, data in datasets.items():
        datasets[split] = data.filtered_sorted(
            key_test={key: lambda task: task in sources},
            key_max_value={"duration": hparams["max_duration"]},
        )

    encoder = sb.dataio.encoder.CTCTextEncoder()
    add_pipelines(list(datasets.values()), encoder)
    encoder.load_or_create(
        path=hparams["label_encoder_file"],
        from_didatasets=[datasets["train"]],
        output_key="char_list",
        special_labels=special_labels(hparams),
        sequence_input=True,
    )
    if len(encoder) > hparams["output_neurons"]:
        raise ValueError(
            f"The source tasks have {len(encoder)} tokens but the model has "
            f"output_neurons: {hparams['output_neurons']}; raise it in the YAML."
        )
    return datasets, encoder


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
        return
    init = load_init_parameters(
        hparams["model"], hparams["init_from"], hparams.get("init_min_key", "CER")
    )
    logger.info(f"Warm start from {init.paramfile}")
    own_encoder = hparams["label_encoder_file"]
    if os.path.isfile(init.label_encoder_file) and not os.path.isfile(own_encoder):
        os.makedirs(os.path.dirname(own_encoder), exist_ok=True)
        run_on_main(shutil.copyfile, args=[init.label_encoder_file, own_encoder])


def load_experiment(argv: list) -> tuple:
    """A recipe's command line: its YAML loaded, its output folder created.

    Arguments
    ---------
    argv : list of str
        The YAML file, then SpeechBrain run options and YAML overrides.

    Returns
    -------
    tuple
        The loaded hparams (dict) and the run options.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    return hparams, run_opts


def main(argv: list) -> None:
    """Prepare data, meta-train, then meta-test on held-out speakers."""
    hparams, run_opts = load_experiment(argv)
    if not hparams["skip_prep"]:
        from recipes.embedded_corpus.prepare import prepare_embedded_corpus

        run_on_main(
            prepare_embedded_corpus,
            kwargs={
                "data_folder": hparams["data_folder"],
                "size": hparams["corpus_size"],
                "seed": hparams["seed"],
            },
        )
    warm_start(hparams)
    datasets, encoder = dataio_prepare(hparams)

    brain_class = type("ASRBrain", (ASR, hparams["brain_class"]), {})
    asr_brain = brain_class(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = encoder
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs={
            "batch_sampler": hparams["train_sampler"](datasets["train"])
        },
        valid_loader_kwargs={
            "batch_sampler": hparams["eval_sampler"](datasets["valid"])
        },
    )
    asr_brain.evaluate(
        datasets["test"],
        min_key="CER",
        test_loader_kwargs={"batch_sampler": hparams["eval_sampler"](datasets["test"])},
    )
    if torch.distributed.is_initialized():
        # Release the process group ourselves rather than leave it to the
        # interpreter's shutdown (PyTorch warns about that with NCCL).
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

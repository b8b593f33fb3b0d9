#!/usr/bin/env python3
"""Meta-train a multilingual ASR model, or train the multitask baseline.

The algorithm is the YAML's ``brain_class`` (``speechbrain_meta.MAML``,
``FOMAML``, ``Reptile`` or ``MultiTask``); the recipe's methods
(:class:`speechbrain_meta.asr.ASR`) run unchanged under every one of them.
The embedded corpus is prepared first unless ``--skip_prep True``.

Example
-------
python train.py hparams/maml_ctc.yaml
python train.py hparams/reptile_ctc.yaml --data_folder data/embedded --output_folder out

Authors
-------
speechbrain-meta developers
"""

import sys

import torch
from speechbrain.utils.distributed import run_on_main

from recipes.embedded_corpus.prepare import prepare_embedded_corpus
from speechbrain_meta import MetaBrain
from speechbrain_meta.asr import ASR, dataio_prepare, warm_start
from speechbrain_meta.compute_budget import write_training_record
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import experiment, run_script
from speechbrain_meta.inference import export_run


def main(argv: list) -> None:
    """Prepare data, meta-train, then meta-test on held-out speakers."""
    with experiment(argv, script=__file__) as (hparams, run_opts):
        meta_train(hparams, run_opts)


def meta_train(hparams: dict, run_opts: dict) -> None:
    """The run of a loaded YAML: data, meta-training, meta-test.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If ``brain_class`` is not a meta-learning Brain, or the data or
        configuration are not usable.
    """
    brain_class = hparams["brain_class"]
    if not (isinstance(brain_class, type) and issubclass(brain_class, MetaBrain)):
        raise SetupError(
            f"brain_class must be a meta-learning Brain (speechbrain_meta.MAML, "
            f"FOMAML, Reptile or MultiTask), got {brain_class!r}: write it as "
            "brain_class: !name:speechbrain_meta.MAML."
        )
    # The initialisation and the adapters are in place before the data is
    # read (a warm start's encoder may gain letters, and the output layers
    # rows) and before the Brain picks the fast weights and meta-parameters.
    warm_start(hparams)
    if not hparams["skip_prep"]:
        run_on_main(
            prepare_embedded_corpus,
            kwargs={
                "data_folder": hparams["data_folder"],
                "size": hparams["corpus_size"],
                "seed": hparams["seed"],
            },
        )
    datasets, tokenizer = dataio_prepare(hparams)
    asr_brain = type("ASRBrain", (ASR, brain_class), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    # All three built before training: a set too small fails now, not after it.
    samplers = {
        "train": hparams["train_sampler"](datasets["train"]),
        "valid": hparams["eval_sampler"](datasets["valid"]),
        "test": hparams["eval_sampler"](datasets["test"]),
    }
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs={"batch_sampler": samplers["train"]},
        valid_loader_kwargs={"batch_sampler": samplers["valid"]},
    )
    run_on_main(write_training_record, args=[asr_brain, hparams["output_folder"]])
    asr_brain.evaluate(
        datasets["test"],
        min_key="CER",
        test_loader_kwargs={"batch_sampler": samplers["test"]},
    )
    export_run(hparams)
    if torch.distributed.is_initialized():
        # Release the process group ourselves rather than leave it to the
        # interpreter's shutdown (PyTorch warns about that with NCCL).
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

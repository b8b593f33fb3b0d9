#!/usr/bin/env python3
"""Adapt a multilingual initialisation to one new language with little data.

Fine-tunes an initialisation (a meta-learned or multitask ``train.py`` run, or
a random one) on a budget of the target language's training data (minutes of
audio or utterances) with the ``ASR`` recipe of ``train.py`` in a plain
``speechbrain.Brain``, and scores the target's test set with SpeechBrain's
``ErrorRateStats`` after each point of an adaptation curve. Characters of the
target that the initialisation never saw are added to its character encoder
and output layer (see README.md, "Low-resource adaptation").

Outputs in ``output_folder``: ``curve.csv`` (``init, target, budget, step,
cer, wer``), ``wer.txt`` / ``cer.txt`` of the last curve point,
``train_log.txt``, and in ``save/`` the adapted model after the last step
(``CKPT+adapted/model.ckpt``, its meta holding the last point's CER and WER)
with its extended character encoder (``label_encoder.txt``): the folder is an
initialisation that ``train.py --init_from`` and ``adapt.py
--init_checkpoint`` read. Utterances whose audio is silent or not finite are
left out (and counted) before adaptation and testing.

Example
-------
python adapt.py hparams/adapt_ctc.yaml --init_checkpoint results/maml_ctc/1234 \
    --target cs --budget 2
python adapt.py hparams/adapt_ctc.yaml --init_name random --target pt \
    --label_encoder_file results/maml_ctc/1234/save/label_encoder.txt

Authors
-------
speechbrain-meta developers
"""

import logging
import os
import sys

import speechbrain as sb

from speechbrain_meta.adaptation import (
    adaptation_curve,
    budget_subset,
    extend_vocabulary,
    load_init_parameters,
    without_unusable_audio,
)
from speechbrain_meta.protocol import budget_label, write_results
from train import (
    ASR,
    add_pipelines,
    experiment,
    read_manifests,
    run_script,
    special_labels,
)

logger = logging.getLogger(__name__)


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
        init = load_init_parameters(hparams["model"], path, hparams["init_min_key"])
        logger.info(f"Initialisation: {init.paramfile}")
        encoder_file = encoder_file or init.label_encoder_file
    else:
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
    manifests = read_manifests(hparams)
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


def adapt(hparams: dict, run_opts: dict) -> list:
    """Adapt the initialisation to the target; write and return its curve.

    Arguments
    ---------
    hparams : dict
        The loaded adaptation YAML.
    run_opts : dict
        SpeechBrain run options (device, ...).

    Returns
    -------
    list of dict
        The curve points: the columns of ``curve.csv`` (``init, target,
        budget, step, cer, wer``) and ``train_loss`` / ``test_loss``.
    """
    encoder = load_initialisation(hparams)
    datasets = target_datasets(hparams)
    train = datasets["train"]
    texts = [train.data[i]["wrd"] for i in train.data_ids]
    new = extend_vocabulary(encoder, texts, hparams["token_layers"])
    if new:
        origins = ", ".join(f"{c}<-{b or 'mean'}" for c, b in new.items())
        logger.info(f"New characters of '{hparams['target']}': {origins}")
    os.makedirs(hparams["save_folder"], exist_ok=True)
    encoder.save(os.path.join(hparams["save_folder"], "label_encoder.txt"))

    subset = budget_subset(
        train, hparams["budget"], hparams["budget_unit"], hparams["seed"]
    )
    minutes = sum(float(subset.data[i]["duration"]) for i in subset.data_ids) / 60
    logger.info(
        f"Budget {hparams['budget']} {hparams['budget_unit']}: "
        f"{len(subset)} utterances, {minutes:.2f} minutes"
    )
    test = datasets["test"].filtered_sorted(sort_key="duration")
    add_pipelines([subset, test], encoder, hparams)
    subset, test = without_unusable_audio(subset), without_unusable_audio(test)

    brain = type("AdaptBrain", (ASR, sb.Brain), {})(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
    )
    brain.tokenizer = encoder
    curve = adaptation_curve(
        brain,
        subset,
        test,
        hparams["curve_steps"],
        train_loader_kwargs={"batch_size": hparams["batch_size"]},
        test_loader_kwargs={"batch_size": hparams["test_batch_size"]},
        seed=hparams["seed"],
        metrics=lambda b: {
            "cer": b.cer_metric.summarize("error_rate"),
            "wer": b.wer_metric.summarize("error_rate"),
        },
        progressbar=not brain.noprogressbar,
    )
    names = {
        "init": hparams["init_name"],
        "target": hparams["target_name"],
        "budget": budget_label(hparams["budget"], hparams["budget_unit"]),
    }
    rows = [{**names, **point} for point in curve]
    write_results(rows, os.path.join(hparams["output_folder"], "curve.csv"))
    last = curve[-1]
    sb.utils.checkpoints.Checkpointer(
        hparams["save_folder"], {"model": hparams["model"]}
    ).save_checkpoint(
        meta={"CER": last["cer"], "WER": last["wer"], "step": last["step"]},
        name="adapted",
    )
    return rows


def main(argv: list) -> list:
    """Command line: ``python adapt.py YAML [--key value ...]``.

    Arguments
    ---------
    argv : list of str
        The YAML file, then SpeechBrain options and YAML overrides.

    Returns
    -------
    list of dict
        The curve points (see :func:`adapt`).
    """
    with experiment(argv) as (hparams, run_opts):
        return adapt(hparams, run_opts)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

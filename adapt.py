#!/usr/bin/env python3
"""Adapt a multilingual initialisation to one new language with little data.

Fine-tunes an initialisation (a meta-learned or multitask ``train.py`` run, or
a random one) on a budget of the target language's training data (minutes of
audio or utterances) with the ``ASR`` recipe of ``train.py`` in a plain
``speechbrain.Brain``, and scores the target's test set with SpeechBrain's
``ErrorRateStats`` after each point of an adaptation curve. Characters of the
target that the initialisation never saw are added to its character encoder
and output layer (see docs/adaptation.md).

The number of updates (and, with ``selection_lrs``, the learning rate) is
chosen without the test set: fine-tuning on the budget less a held-out part
(``selection_fraction``, 20 % by default), scored on that part after each
curve point; the curve on the test set, trained on the whole budget, stays a
report, and its weights at the chosen step are the ones kept.

Outputs in ``output_folder``: ``curve.csv`` (``init, target, budget, step,
cer, wer``), ``utterances.csv`` (every test utterance's character and word
edits and reference lengths at every curve point: ``step, ID, char_errors,
chars, word_errors, words``), ``selection.json`` (the held-out points and
the choice),
``wer.txt`` / ``cer.txt`` of the last curve point, ``train_log.txt``, and in
``save/`` the adapted model at the chosen step (``CKPT+adapted/model.ckpt``,
its meta holding that step and its test CER and WER) with its extended
character encoder (``label_encoder.txt``): the folder is an
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

import copy
import json
import logging
import os
import sys
from functools import partial

import speechbrain as sb
import torch

from speechbrain_meta.adaptation import (
    adaptation_curve,
    budget_subset,
    extend_vocabulary,
    find_init_checkpoint,
    without_unusable_audio,
)
from speechbrain_meta.asr import (
    ASR,
    add_pipelines,
    load_initialisation,
    target_datasets,
)
from speechbrain_meta.checkpoints import nonfinite_tensors
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import experiment, run_script
from speechbrain_meta.inference import export_run
from speechbrain_meta.inner_rates import InnerRates, LearntRateSGD
from speechbrain_meta.parameters import set_trainable
from speechbrain_meta.protocol import budget_label, write_results
from speechbrain_meta.selection import hold_out, select_updates
from speechbrain_meta.study import utterance_scores, write_utterances

logger = logging.getLogger(__name__)


def fine_tuning_optimizer(hparams: dict):
    """The optimizer class of the fine-tuning, after choosing what adapts.

    ``inner_params`` selects the weights that adapt (the others are frozen).
    With ``adapt_optimizer: learnt`` those are the weights whose inner rates the
    initialisation meta-learnt, adapted by :class:`LearntRateSGD` with them.

    Arguments
    ---------
    hparams : dict
        The loaded adaptation YAML.

    Returns
    -------
    callable
        ``opt_class(parameters) -> torch.optim.Optimizer``.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        For ``adapt_optimizer: learnt`` with an initialisation without learnt rates.
    """
    modules = torch.nn.ModuleDict(hparams["modules"])
    if hparams["adapt_optimizer"] != "learnt":
        set_trainable(modules, hparams["inner_params"], "inner_params")
        return hparams["opt_class"]
    path = hparams["init_checkpoint"]
    if path is None:
        raise SetupError(
            "adapt_optimizer: learnt needs an init_checkpoint with learnt rates."
        )
    paramfile = find_init_checkpoint(path, min_key=hparams["init_min_key"]).paramfile
    rates_file = os.path.join(os.path.dirname(paramfile), "inner_rates.ckpt")
    if not os.path.isfile(rates_file):
        raise SetupError(
            f"adapt_optimizer: learnt, but {os.path.dirname(paramfile)} has no learnt "
            "inner rates (train it with --learn_inner_lr tensor, element or "
            "layer_step)."
        )
    rates = InnerRates.from_file(rates_file)
    logger.info(f"Adapting {len(rates.names)} weights with the rates of {rates_file}")
    set_trainable(modules, rates.names, "the learnt rates' weights")
    names = {id(p): name for name, p in modules.named_parameters()}
    return partial(LearntRateSGD, names=names, rates=rates)


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
        opt_class=fine_tuning_optimizer(hparams),
        hparams=hparams,
        run_opts=run_opts,
    )
    brain.tokenizer = encoder
    options = {
        "train_loader_kwargs": {"batch_size": hparams["batch_size"]},
        "test_loader_kwargs": {"batch_size": hparams["test_batch_size"]},
        "seed": hparams["seed"],
        "metrics": error_rates,
        "progressbar": not brain.noprogressbar,
    }
    selection = select_schedule(brain, subset, hparams, options)
    chosen = selection.step if selection else hparams["curve_steps"][-1]
    kept, utterances = {}, []

    def keep(point: dict) -> None:
        utterances.extend(
            utterance_scores(point["step"], brain.cer_metric, brain.wer_metric)
        )
        if point["step"] == chosen:
            kept.update(point=point, weights=copy.deepcopy(brain.modules.state_dict()))

    curve = adaptation_curve(
        brain, subset, test, hparams["curve_steps"], on_point=keep, **options
    )
    names = {
        "init": hparams["init_name"],
        "target": hparams["target_name"],
        "budget": budget_label(hparams["budget"], hparams["budget_unit"]),
    }
    rows = [{**names, **point} for point in curve]
    folder = hparams["output_folder"]
    write_results(rows, os.path.join(folder, "curve.csv"))
    write_utterances(utterances, os.path.join(folder, "utterances.csv"))
    brain.modules.load_state_dict(kept["weights"])
    broken = nonfinite_tensors(hparams["model"])
    if broken:
        raise RuntimeError(
            f"The adapted model is not finite ({sorted(broken)[:5]}); it is not "
            "saved: lower lr, or use --adapt_optimizer adam."
        )
    point = kept["point"]
    sb.utils.checkpoints.Checkpointer(
        hparams["save_folder"], {"model": hparams["model"]}
    ).save_checkpoint(
        meta={"CER": point["cer"], "WER": point["wer"], "step": point["step"]},
        name="adapted",
    )
    return rows


def error_rates(brain: sb.Brain) -> dict:
    """The CER and WER of the recipe's metric trackers after an evaluation."""
    return {
        "cer": brain.cer_metric.summarize("error_rate"),
        "wer": brain.wer_metric.summarize("error_rate"),
    }


def select_schedule(brain: sb.Brain, subset, hparams: dict, options: dict):
    """Choose the number of updates (and rate) on a held-out part of the budget.

    With ``selection_fraction: 0``, or a budget of one utterance, there is
    no selection (None: the model after the last curve point is kept).
    Otherwise the chosen schedule is written to
    ``<output_folder>/selection.json`` and, when a rate was chosen, set in
    the Brain's ``opt_class``.

    Arguments
    ---------
    brain : speechbrain.core.Brain
        The Brain holding the initialisation (left as it was).
    subset : Dataset
        The budget's utterances.
    hparams : dict
        The loaded YAML (``selection_fraction``, ``selection_lrs``,
        ``curve_steps``, ``seed``, ``adapt_optimizer``, ``output_folder``).
    options : dict
        The options of :func:`adaptation_curve` (loaders, seed, metrics).

    Returns
    -------
    speechbrain_meta.selection.Selection or None
        What was chosen.
    """
    fraction = hparams["selection_fraction"]
    if not fraction:
        return None
    if len(subset) < 2:
        logger.warning(
            f"A budget of {len(subset)} utterance cannot be split to choose the "
            "number of updates: keeping the last curve step."
        )
        return None
    lrs = hparams["selection_lrs"]
    if lrs and hparams["adapt_optimizer"] == "learnt":
        raise SetupError(
            "selection_lrs cannot be combined with --adapt_optimizer learnt "
            "(the learnt rates are the rates): set --selection_lrs null."
        )
    fit, held_out = hold_out(subset, fraction, hparams["seed"])
    selection = select_updates(
        brain, fit, held_out, hparams["curve_steps"], lrs, **options
    )
    if selection.lr is not None:
        brain.opt_class = partial(brain.opt_class, lr=selection.lr)
    record = {
        "fit_utterances": len(fit),
        "held_out_utterances": len(held_out),
        "held_out_ids": sorted(held_out.data_ids),
        "step": selection.step,
        "lr": selection.lr,
        "points": selection.points,
    }
    path = os.path.join(hparams["output_folder"], "selection.json")
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(record, stream, indent=2)
    return selection


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
    with experiment(argv, script=__file__) as (hparams, run_opts):
        curve = adapt(hparams, run_opts)
        export_run(hparams, checkpoint="CKPT+adapted")
    return curve


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

#!/usr/bin/env python3
"""The adaptation protocol from one command: data, initialisations, curves, report.

Reads a protocol YAML (``hparams/protocol_demo.yaml``, ``protocol_full.yaml``)
and runs its stages in order, each a subprocess into its own folder under
``output_folder`` (:mod:`speechbrain_meta.stages`):

1. data preparation (the YAML's ``data_preparation`` functions);
2. every initialisation given by a training YAML, in order: ``train.py``
   into ``<output_folder>/train/<init>`` with the YAML's ``train_overrides``
   and that init's ``init_overrides`` (e.g. ``init_from`` an init trained
   before it); an init may also be an existing checkpoint (see ``adapt.py``)
   or null: random;
3. every (target, budget, init of ``adapted_inits``, default all; a target's
   own ``budgets`` replace the protocol's, e.g. for a target with less data):
   ``adapt.py`` into ``<output_folder>/adapt/<target>/<budget>/<init>``, with
   the same adaptation YAML and options for every init (unless
   ``adapt_hparams_of`` / ``adapt_overrides_of`` give an init its own, e.g. a
   LoRA model's YAML); each init with a checkpoint keeps its own character
   encoder (all must agree), a random one takes a copy of theirs,
   ``<output_folder>/label_encoder.txt``, so that adding an init leaves the
   others' finished stages finished;
4. ``adaptation.csv`` (``init, target, budget, step, cer, wer``),
   ``summary.csv`` (:mod:`speechbrain_meta.study`: CER over seeds, paired
   difference against the multitask baseline of each init's ``regimes``
   with a bootstrap interval), ``report.md`` and ``cer_<target>.png`` in
   ``output_folder``.

With ``seeds: [s1, s2, ...]`` steps 1-3 run for every seed: the first with
the YAML's folders, every other one with its own data (``<key>_<seed>`` for
the keys of ``seed_folders``, default ``data_folder``) and stages
(``<output_folder>/seed_<seed>``); ``adaptation.csv`` then has a ``seed``
column and the plots show the mean over seeds with a min-max band. A
protocol's ``train_time_budget_minutes`` is passed to every training (equal
compute; see :mod:`speechbrain_meta.compute_budget`).

A stage that finished with the same resolved hyperparameters, run options and
input checkpoints is skipped, so a rerun reuses the finished stages; an
interrupted one resumes from its checkpoints; one whose settings changed runs
again in a fresh folder, the old one moved aside to
``<folder>.replaced-<time>``, never deleted. Under ``torchrun`` every rank runs
the training stages together (DDP); data preparation, adaptation and the
report run on the main process.

Example
-------
python evaluate_adaptation.py hparams/protocol_demo.yaml
python evaluate_adaptation.py hparams/protocol_full.yaml --output_folder results/full
python evaluate_adaptation.py hparams/protocol_study.yaml
torchrun --nproc_per_node 2 evaluate_adaptation.py hparams/protocol_demo.yaml

Authors
-------
speechbrain-meta developers
"""

import os
import sys
from typing import Callable, Optional

import ruamel.yaml
import speechbrain as sb

from speechbrain_meta.compute_budget import read_training_record
from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import experiment, run_script
from speechbrain_meta.hparams import load_hparams
from speechbrain_meta.protocol import (
    adaptation_encoders,
    budget_label,
    init_parameters,
    parse_budget,
    plot_curves,
    read_results,
    report_markdown,
    write_results,
)
from speechbrain_meta.run_lock import is_main_rank
from speechbrain_meta.stages import (
    cpu_isa_environment,
    option_args,
    run_option_args,
    run_stage,
)
from speechbrain_meta.study import (
    init_regimes,
    mean_over_seeds,
    protocol_seeds,
    read_utterances,
    seed_overrides,
    selected_step,
    summary_markdown,
    summary_rows,
    training_markdown,
    write_summary,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")
ADAPT = os.path.join(HERE, "adapt.py")


def main(argv: list) -> dict:
    """Run the protocol of a YAML; return the paths of its outputs.

    Arguments
    ---------
    argv : list of str
        The protocol YAML, then SpeechBrain options (passed on to every
        stage) and YAML overrides.

    Returns
    -------
    dict
        ``csv``, ``summary``, ``report`` and ``plots`` paths.
    """
    hparams_file, _, overrides = sb.parse_arguments(argv)
    overrides = ruamel.yaml.YAML().load(overrides) if overrides else {}

    def reload(changes: dict) -> dict:
        return load_hparams(hparams_file, {**overrides, **changes})

    # No process group here: the training stages under torchrun make their own.
    with experiment(argv, script=__file__, distributed=False) as (hparams, run_opts):
        return run_protocol(hparams, run_opts, reload)


def run_protocol(
    hparams: dict, run_opts, reload: Optional[Callable[[dict], dict]] = None
) -> dict:
    """Run the stages of a loaded protocol YAML for every seed; write the results.

    Arguments
    ---------
    hparams : dict
        The loaded protocol YAML.
    run_opts : dict
        SpeechBrain run options, passed on to every stage.
    reload : callable, optional
        ``reload(overrides) -> hparams``: the protocol YAML loaded again with
        a seed's overrides (:func:`speechbrain_meta.study.seed_overrides`);
        needed for ``seeds`` other than the YAML's ``seed``.

    Returns
    -------
    dict
        ``csv``, ``summary``, ``report`` and ``plots`` paths (empty on the
        other ranks of a ``torchrun`` launch).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        For unknown ``adapted_inits`` or ``regimes``, before any stage.
    """
    out = hparams["output_folder"]
    # Read by torch, MKL and oneDNN when every stage's process starts.
    if hparams.get("num_threads"):
        os.environ["OMP_NUM_THREADS"] = str(hparams["num_threads"])
    if hparams.get("cpu_isa"):
        os.environ.update(cpu_isa_environment(hparams["cpu_isa"]))
    adapted = hparams.get("adapted_inits") or list(hparams["inits"])
    unknown = set(adapted) - set(hparams["inits"])
    if unknown:
        raise SetupError(f"adapted_inits {sorted(unknown)} are not in inits.")
    regimes, baselines = init_regimes(hparams, adapted)
    seeds = protocol_seeds(hparams)

    rows, scores, selected, trainings = [], {}, {}, {}
    for index, seed in enumerate(seeds):
        overrides = seed_overrides(hparams, seed, first=index == 0)
        if overrides and reload is None:
            raise SetupError("Another seed needs the protocol YAML to reload it.")
        seed_hparams = reload(overrides) if overrides else hparams
        stages = run_seed(seed_hparams, run_opts, adapted)
        for init, folder in stages["train"].items():
            trainings[(seed, init)] = read_training_record(folder)
        for (target, label, init), folder in stages["adapt"].items():
            curve = read_results(os.path.join(folder, "curve.csv"))
            rows += [{"seed": seed, **row} for row in curve]
            key = (seed, target, label, init)
            scores[key] = read_utterances(folder)
            selected[key] = selected_step(folder, [row["step"] for row in curve])
    if not is_main_rank():
        return {}

    outputs = {
        "csv": os.path.join(out, "adaptation.csv"),
        "summary": os.path.join(out, "summary.csv"),
        "report": os.path.join(out, "report.md"),
    }
    write_results(rows, outputs["csv"], seeded=len(seeds) > 1)
    summary = summary_rows(rows, scores, selected, regimes, baselines)
    write_summary(summary, outputs["summary"])
    title = hparams["title"]
    if len(seeds) > 1:
        title += f" (mean of {len(seeds)} seeds: {', '.join(map(str, seeds))})"
    report = report_markdown(mean_over_seeds(rows), hparams["comparisons"], title)
    report += summary_markdown(summary) + training_markdown(trainings)
    with open(outputs["report"], "w", encoding="utf-8") as stream:
        stream.write(report)
    outputs["plots"] = plot_curves(rows, out)
    print(report)
    print(f"Results: {outputs['csv']}")
    print(f"Summary: {outputs['summary']}")
    print(f"Report:  {outputs['report']}")
    print(f"Plots:   {', '.join(outputs['plots'])}")
    return outputs


def run_seed(hparams: dict, run_opts, adapted: list) -> dict:
    """Run the stages of one seed: data, trainings, adaptations.

    Arguments
    ---------
    hparams : dict
        The protocol YAML loaded for the seed.
    run_opts : dict
        SpeechBrain run options, passed on to every stage.
    adapted : list of str
        The inits to adapt.

    Returns
    -------
    dict
        ``train``: init -> training folder; ``adapt``: (target, budget
        label, init) -> adaptation folder (empty on the other ranks).
    """
    out = hparams["output_folder"]
    passed_on = run_option_args(run_opts)
    if is_main_rank():
        for prepare in hparams["data_preparation"]:
            prepare()

    budget = hparams.get("train_time_budget_minutes")
    checkpoints, trained = {}, {}
    for init, source in hparams["inits"].items():
        if source is None or not source.endswith(".yaml"):
            checkpoints[init] = source
            continue
        folder = os.path.join(out, "train", init)
        options = {
            **hparams["train_overrides"],
            **({"train_time_budget_minutes": budget} if budget else {}),
            **hparams.get("init_overrides", {}).get(init, {}),
        }
        args = [source, "--output_folder", folder, *passed_on, *option_args(options)]
        inputs = [init_parameters(options, "init_from")]
        run_stage(f"Training {init}", folder, TRAIN, args, inputs, distributed=True)
        checkpoints[init] = trained[init] = folder
    if not is_main_rank():
        return {"train": trained, "adapt": {}}
    checkpoints = {init: checkpoints[init] for init in adapted}
    encoders = adaptation_encoders(checkpoints, out)

    folders = {}
    runs = [
        (target, budget, init)
        for target, settings in hparams["targets"].items()
        for budget in settings.get("budgets", hparams["budgets"])
        for init in adapted
    ]
    for number, (target, item, init) in enumerate(runs, start=1):
        budget, unit = parse_budget(item, hparams["budget_unit"])
        label = budget_label(budget, unit)
        folder = os.path.join(out, "adapt", target, label, init)
        options = {
            "init_name": init,
            "init_checkpoint": checkpoints[init],
            "label_encoder_file": encoders[init],
            "target_name": target,
            "target": hparams["targets"][target]["task"],
            "data_folder": hparams["targets"][target]["data_folder"],
            "budget": budget,
            "budget_unit": unit,
            "curve_steps": hparams["curve_steps"],
            "seed": hparams["seed"],
            **hparams["adapt_overrides"],
            **hparams.get("adapt_overrides_of", {}).get(init, {}),
        }
        yaml = hparams.get("adapt_hparams_of", {}).get(init, hparams["adapt_hparams"])
        args = [yaml, "--output_folder", folder, *passed_on]
        args += option_args(options)
        name = f"Adaptation {number}/{len(runs)} ({init} -> {target}, {label})"
        if len(hparams.get("seeds") or ()) > 1:
            name += f", seed {hparams['seed']}"
        inputs = [init_parameters(options, "init_checkpoint"), encoders[init]]
        run_stage(name, folder, ADAPT, args, inputs)
        folders[(target, label, init)] = folder
    return {"train": trained, "adapt": folders}


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

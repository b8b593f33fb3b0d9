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
3. every (target, budget, init of ``adapted_inits``, default all):
   ``adapt.py`` into ``<output_folder>/adapt/<target>/<budget>/<init>``, with
   the same adaptation YAML and options for every init (unless
   ``adapt_hparams_of`` / ``adapt_overrides_of`` give an init its own, e.g. a
   LoRA model's YAML) and the character encoder of the first trained init for
   all of them;
4. ``adaptation.csv`` (``init, target, budget, step, cer, wer``), ``report.md``
   and ``cer_<target>.png`` in ``output_folder``.

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
torchrun --nproc_per_node 2 evaluate_adaptation.py hparams/protocol_demo.yaml

Authors
-------
speechbrain-meta developers
"""

import os
import sys

from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import experiment, run_script
from speechbrain_meta.protocol import (
    budget_label,
    init_parameters,
    parse_budget,
    plot_curves,
    read_results,
    reference_encoder,
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
        ``csv``, ``report`` and ``plots`` paths.
    """
    # No process group here: the training stages under torchrun make their own.
    with experiment(argv, script=__file__, distributed=False) as (hparams, run_opts):
        return run_protocol(hparams, run_opts)


def run_protocol(hparams: dict, run_opts) -> dict:
    """Run the stages of a loaded protocol YAML; return its outputs' paths.

    Arguments
    ---------
    hparams : dict
        The loaded protocol YAML.
    run_opts : dict
        SpeechBrain run options, passed on to every stage.

    Returns
    -------
    dict
        ``csv``, ``report`` and ``plots`` paths (empty on the other ranks of
        a ``torchrun`` launch).
    """
    out = hparams["output_folder"]
    passed_on = run_option_args(run_opts)
    # Read by torch, MKL and oneDNN when every stage's process starts.
    if hparams.get("num_threads"):
        os.environ["OMP_NUM_THREADS"] = str(hparams["num_threads"])
    if hparams.get("cpu_isa"):
        os.environ.update(cpu_isa_environment(hparams["cpu_isa"]))
    adapted = hparams.get("adapted_inits") or list(hparams["inits"])
    unknown = set(adapted) - set(hparams["inits"])
    if unknown:
        raise SetupError(f"adapted_inits {sorted(unknown)} are not in inits.")

    if is_main_rank():
        for prepare in hparams["data_preparation"]:
            prepare()

    checkpoints = {}
    for init, source in hparams["inits"].items():
        if source is None or not source.endswith(".yaml"):
            checkpoints[init] = source
            continue
        folder = os.path.join(out, "train", init)
        options = {
            **hparams["train_overrides"],
            **hparams.get("init_overrides", {}).get(init, {}),
        }
        args = [source, "--output_folder", folder, *passed_on, *option_args(options)]
        inputs = [init_parameters(options, "init_from")]
        run_stage(f"Training {init}", folder, TRAIN, args, inputs, distributed=True)
        checkpoints[init] = folder
    if not is_main_rank():
        return {}
    checkpoints = {init: checkpoints[init] for init in adapted}
    encoder_file = reference_encoder(checkpoints)

    rows = []
    runs = [
        (target, budget, init)
        for target in hparams["targets"]
        for budget in hparams["budgets"]
        for init in adapted
    ]
    for number, (target, item, init) in enumerate(runs, start=1):
        budget, unit = parse_budget(item, hparams["budget_unit"])
        label = budget_label(budget, unit)
        folder = os.path.join(out, "adapt", target, label, init)
        options = {
            "init_name": init,
            "init_checkpoint": checkpoints[init],
            "label_encoder_file": encoder_file,
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
        inputs = [init_parameters(options, "init_checkpoint"), encoder_file]
        run_stage(name, folder, ADAPT, args, inputs)
        rows += read_results(os.path.join(folder, "curve.csv"))

    outputs = {
        "csv": os.path.join(out, "adaptation.csv"),
        "report": os.path.join(out, "report.md"),
    }
    write_results(rows, outputs["csv"])
    report = report_markdown(rows, hparams["comparisons"], hparams["title"])
    with open(outputs["report"], "w", encoding="utf-8") as stream:
        stream.write(report)
    outputs["plots"] = plot_curves(rows, out)
    print(report)
    print(f"Results: {outputs['csv']}")
    print(f"Report:  {outputs['report']}")
    print(f"Plots:   {', '.join(outputs['plots'])}")
    return outputs


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

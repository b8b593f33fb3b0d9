#!/usr/bin/env python3
"""The adaptation protocol from one command: data, initialisations, curves, report.

Reads a protocol YAML (``hparams/protocol_demo.yaml``, ``protocol_full.yaml``)
and runs its stages in order, each in its own folder under ``output_folder``:

1. data preparation (the YAML's ``data_preparation`` functions);
2. every initialisation given by a training YAML, in order: ``train.py``
   into ``<output_folder>/train/<init>`` with the YAML's ``train_overrides``
   and that init's ``init_overrides`` (e.g. ``init_from`` an init trained
   before it); an init may also be an existing checkpoint (see ``adapt.py``)
   or null: random;
3. every (target, budget, init of ``adapted_inits``, default all):
   ``adapt.py`` into ``<output_folder>/adapt/<target>/<budget>/<init>``, with
   the same adaptation YAML and options for every init and the character
   encoder of the first trained init for all of them;
4. ``adaptation.csv`` (``init, target, budget, step, cer, wer``), ``report.md``
   and ``cer_<target>.png`` in ``output_folder``.

A stage whose folder records that it finished with the same command line,
YAML file content and input checkpoints is skipped, so a rerun reuses the
finished stages (an interrupted training resumes from its checkpoint); change
an option, the YAML or a checkpoint it starts from and that stage runs again
from scratch, in a fresh folder: the finished one is moved aside to
``<folder>.replaced-<time>``, never deleted.

Example
-------
python evaluate_adaptation.py hparams/protocol_demo.yaml
python evaluate_adaptation.py hparams/protocol_full.yaml --output_folder results/full

Authors
-------
speechbrain-meta developers
"""

import hashlib
import json
import logging
import os
import sys
import time
from typing import Optional

import speechbrain as sb
import torch

import adapt
import train
from speechbrain_meta.adaptation import find_init_checkpoint
from speechbrain_meta.protocol import (
    STAGE_RECORD,
    budget_label,
    mark_stage_done,
    plot_curves,
    read_results,
    report_markdown,
    stage_done,
    write_results,
)

logger = logging.getLogger(__name__)


def option_args(options: dict) -> list:
    """YAML overrides as command-line arguments (values written as JSON).

    Arguments
    ---------
    options : dict
        Keys and values.

    Returns
    -------
    list of str
        ``["--key", "value", ...]``.
    """
    return [arg for k, v in options.items() for arg in (f"--{k}", json.dumps(v))]


def run_option_args(run_opts) -> list:
    """The SpeechBrain run options given on the command line, as arguments."""
    args = []
    for name in sorted(run_opts.overridden_args):
        value = getattr(run_opts, name)
        if value is True:
            args.append(f"--{name}")
        elif value not in (False, None):
            args.append(f"--{name}={value}")
    return args


def file_digest(path: str) -> str:
    """The SHA-256 of a file's content."""
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def run_stage(name: str, folder: str, script, argv: list, inputs=()) -> None:
    """Run ``script.main(argv)`` unless ``folder`` records it as done.

    Done means: finished before with the same command line, the same content
    of its YAML file (``argv[0]``) and of its input files. A stage that
    finished with other settings is stale: its folder is moved aside to
    ``<folder>.replaced-<time>`` (never deleted) and it runs afresh; one that
    did not finish resumes from its checkpoints.

    Arguments
    ---------
    name : str
        What the stage is, for the log.
    folder : str
        The stage's output folder.
    script : module
        ``train`` or ``adapt``.
    argv : list of str
        Its command line.
    inputs : sequence of str
        Files the stage reads besides its YAML (checkpoints, encoders).
    """
    settings = {
        "script": script.__name__,
        "argv": argv,
        "yaml_sha256": file_digest(argv[0]),
        "inputs_sha256": {path: file_digest(path) for path in inputs if path},
    }
    if stage_done(folder, settings):
        logger.info(f"{name}: done before, reusing {folder}")
        return
    if os.path.isfile(os.path.join(folder, STAGE_RECORD)):
        aside = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        logger.info(
            f"{name}: its settings or inputs changed, starting afresh; the "
            f"finished run is moved to {aside}"
        )
        os.rename(folder, aside)
    logger.info(f"{name}: python {script.__name__}.py {' '.join(argv)}")
    start = time.time()
    script.main(argv)
    mark_stage_done(folder, settings, seconds=time.time() - start)


def init_parameters(options: dict, key: str) -> Optional[str]:
    """The parameter file a stage starts from (None: none).

    Arguments
    ---------
    options : dict
        The stage's YAML overrides.
    key : str
        The one naming the initialisation (``init_from``, ``init_checkpoint``);
        ``init_min_key`` picks the checkpoint as the stage itself does.

    Returns
    -------
    str or None
        The ``model.ckpt`` it loads.
    """
    path = options.get(key)
    if path is None:
        return None
    return find_init_checkpoint(
        path, min_key=options.get("init_min_key", "CER")
    ).paramfile


def reference_encoder(checkpoints: dict) -> Optional[str]:
    """The label encoder of the first init with a checkpoint; all must agree.

    Arguments
    ---------
    checkpoints : dict
        Init name -> checkpoint path (see ``adapt.py``), None if random.

    Returns
    -------
    str or None
        The ``label_encoder.txt`` that every adaptation uses (None if every
        init is random).

    Raises
    ------
    ValueError
        If two initialisations have different character encoders.
    """
    files = {
        name: find_init_checkpoint(path).label_encoder_file
        for name, path in checkpoints.items()
        if path is not None
    }
    if not files:
        return None
    mappings = {
        name: sb.dataio.encoder.CTCTextEncoder.from_saved(path).lab2ind
        for name, path in files.items()
    }
    first = next(iter(files))
    for name, mapping in mappings.items():
        if mapping != mappings[first]:
            raise ValueError(
                f"The initialisations '{first}' and '{name}' have different "
                f"character encoders ({files[first]}, {files[name]}): train them "
                "on the same source data so that their results are comparable."
            )
    return files[first]


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
    with train.experiment(argv) as (hparams, run_opts):
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
        ``csv``, ``report`` and ``plots`` paths.
    """
    out = hparams["output_folder"]
    passed_on = run_option_args(run_opts)
    if hparams.get("num_threads"):
        torch.set_num_threads(hparams["num_threads"])

    adapted = hparams.get("adapted_inits") or list(hparams["inits"])
    unknown = set(adapted) - set(hparams["inits"])
    if unknown:
        raise ValueError(f"adapted_inits {sorted(unknown)} are not in inits.")

    for prepare in hparams["data_preparation"]:
        prepare()

    checkpoints = {}
    for init, source in hparams["inits"].items():
        if source is None or not source.endswith(".yaml"):
            checkpoints[init] = source
            continue
        folder = os.path.join(out, "train", init)
        args = [source, "--output_folder", folder, *passed_on]
        options = {
            **hparams["train_overrides"],
            **hparams.get("init_overrides", {}).get(init, {}),
        }
        args += option_args(options)
        inputs = [init_parameters(options, "init_from")]
        run_stage(f"Training {init}", folder, train, args, inputs)
        checkpoints[init] = folder
    checkpoints = {init: checkpoints[init] for init in adapted}
    encoder_file = reference_encoder(checkpoints)

    rows = []
    runs = [
        (target, budget, init)
        for target in hparams["targets"]
        for budget in hparams["budgets"]
        for init in adapted
    ]
    for number, (target, budget, init) in enumerate(runs, start=1):
        label = budget_label(budget, hparams["budget_unit"])
        folder = os.path.join(out, "adapt", target, label, init)
        options = {
            "init_name": init,
            "init_checkpoint": checkpoints[init],
            "label_encoder_file": encoder_file,
            "target_name": target,
            "target": hparams["targets"][target]["task"],
            "data_folder": hparams["targets"][target]["data_folder"],
            "budget": budget,
            "budget_unit": hparams["budget_unit"],
            "curve_steps": hparams["curve_steps"],
            "seed": hparams["seed"],
            **hparams["adapt_overrides"],
        }
        args = [hparams["adapt_hparams"], "--output_folder", folder, *passed_on]
        args += option_args(options)
        name = f"Adaptation {number}/{len(runs)} ({init} -> {target}, {label})"
        inputs = [init_parameters(options, "init_checkpoint"), encoder_file]
        run_stage(name, folder, adapt, args, inputs)
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
    train.run_script(main, sys.argv[1:])

r"""The command line of a speechbrain-meta script, as SpeechBrain recipes have it.

:func:`experiment` parses ``script.py hparams.yaml [--run_option ...]
[--key value ...]``, loads the YAML with its layers
(:func:`speechbrain_meta.hparams.load_hparams`), locks and creates the output
folder, and saves there the flat, resolved ``hyperparams.yaml`` that loads on
its own. :func:`run_script` ends a script with the message of a
:class:`~speechbrain_meta.errors.SetupError` instead of a traceback.

Example
-------
>>> folder = getfixture("tmp_path")
>>> _ = (folder / "run.yaml").write_text(f"output_folder: {folder}/out\nlr: 0.1\n")
>>> with experiment([str(folder / "run.yaml"), "--lr", "0.5"]) as (hparams, _):
...     lr = hparams["lr"]  # doctest: +ELLIPSIS
speechbrain_meta.experiment - Experiment folder: ...
>>> lr
0.5
>>> print((folder / "out" / "hyperparams.yaml").read_text().splitlines()[-1])
lr: 0.5
"""

import logging
import os
import shutil
import sys
from contextlib import contextmanager
from datetime import date
from typing import Callable, Iterator, Optional, Tuple

import ruamel.yaml
import speechbrain as sb
from speechbrain.core import DEFAULT_LOG_CONFIG

from speechbrain_meta.errors import SetupError
from speechbrain_meta.hparams import load_hparams, resolve_hparams
from speechbrain_meta.run_lock import is_main_rank, output_folder_lock

__all__ = ["experiment", "run_script"]

logger = logging.getLogger(__name__)


@contextmanager
def experiment(
    argv: list, script: Optional[str] = None, distributed: bool = True
) -> Iterator[Tuple[dict, dict]]:
    """A script's command line: its YAML loaded, its output folder locked.

    The output folder is created and locked
    (:func:`speechbrain_meta.run_lock.output_folder_lock`: a second run into
    it stops at once), then it gets what SpeechBrain's
    ``create_experiment_directory`` writes: ``log.txt`` (the run's log),
    ``env.log``, a copy of the script, and ``hyperparams.yaml``: here the
    merged, resolved YAML, which ``load_hyperpyyaml`` loads on its own.

    Arguments
    ---------
    argv : list of str
        The YAML file, then SpeechBrain run options and YAML overrides.
    script : str, optional
        The script's file, copied into the output folder.
    distributed : bool
        Whether to join the process group of a ``torchrun`` launch
        (``ddp_init_group``); False for a process that only launches others.

    Yields
    ------
    tuple
        The loaded hparams (dict) and the run options, while the lock is held.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    _refuse_abbreviated_options(argv, run_opts, overrides)
    if distributed:
        sb.utils.distributed.ddp_init_group(run_opts)
    hparams = load_hparams(hparams_file, overrides)
    folder = hparams["output_folder"]
    with output_folder_lock(folder):
        if is_main_rank():
            _write_experiment_files(folder, hparams_file, overrides, script)
        yield hparams, run_opts


def _refuse_abbreviated_options(argv: list, run_opts, overrides: str) -> None:
    """Refuse an option that SpeechBrain took for one of its run options.

    SpeechBrain's parser accepts abbreviations, so a YAML key that begins one
    of its run options (``--optimizer`` of ``--optimizer_step_limit``) is
    silently read as that run option instead of overriding the key.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        Naming the option and the run option it was read as.
    """
    keys = set(ruamel.yaml.YAML().load(overrides) or {}) if overrides else set()
    for token in argv[1:]:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0]
        if name in keys or name in run_opts:
            continue
        taken = sorted(option for option in run_opts if option.startswith(name))
        if taken:
            raise SetupError(
                f"--{name} is not a key of {argv[0]}: SpeechBrain read it as its "
                f"run option --{taken[0]}. Give a key of the YAML, or the run "
                "option's full name."
            )


def _write_experiment_files(
    folder: str, hparams_file: str, overrides, script: Optional[str]
) -> None:
    """``create_experiment_directory``'s files, with the resolved YAML."""
    with open(os.path.join(folder, "hyperparams.yaml"), "w") as stream:
        stream.write(f"# Generated {date.today()} from:\n")
        stream.write(f"# {os.path.abspath(hparams_file)}\n# yamllint disable\n")
        stream.write(resolve_hparams(hparams_file, overrides))
    if script is not None:
        shutil.copy(script, folder)
    log_file = {"handlers": {"file_handler": {"filename": f"{folder}/log.txt"}}}
    sb.utils.logger.setup_logging(DEFAULT_LOG_CONFIG, log_file)
    sys.excepthook = _log_exception
    logger.info(f"Experiment folder: {folder}")
    with open(os.path.join(folder, "env.log"), "w", encoding="utf-8") as stream:
        stream.write(sb.utils.logger.get_environment_description())


def _log_exception(exc_type, exc_value, exc_traceback) -> None:
    """Send an uncaught exception to the run's log (``log.txt``) too."""
    logger.error("Exception:", exc_info=(exc_type, exc_value, exc_traceback))


def run_script(main: Callable[[list], object], argv: list) -> object:
    """Run a script's ``main``; a SetupError ends it with its message only.

    Arguments
    ---------
    main : callable
        The script's ``main(argv)``.
    argv : list of str
        Its command line.

    Returns
    -------
    object
        What ``main`` returned.
    """
    try:
        return main(argv)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

"""The stages of a protocol: scripts run as subprocesses, recorded, reused.

A stage is one run of a script (``train.py``, ``adapt.py``) into its own
output folder. :func:`run_stage` runs it as a subprocess, so that every stage
starts from a fresh process (a stage under ``torchrun`` joins its own process
group) and a failing stage cannot leave state behind in the protocol's. It
keeps a record, ``stage.json``, in the stage's folder: the stage's settings,
written before it starts, and whether it finished. The settings are the
script, its run options, a digest of its *resolved* hyperparameters (the
merged YAML with the overrides applied, comments and formatting left out, so
that editing a comment changes nothing) and digests of the files it starts
from. On a rerun:

* finished with the same settings: skipped;
* started with the same settings but not finished: run again in the same
  folder, where it resumes from its checkpoints;
* started or finished with other settings, or a folder without a record: the
  folder is moved aside to ``<folder>.replaced-<time>`` (never deleted) and
  the stage runs in a fresh one.

Example
-------
>>> import tempfile
>>> folder = os.path.join(tempfile.mkdtemp(), "stage")
>>> settings = {"script": "train.py", "hparams_sha256": "abc"}
>>> stage_status(folder, settings)
'new'
>>> write_stage_record(folder, settings, finished=False)
>>> stage_status(folder, settings), stage_status(folder, {"script": "adapt.py"})
('interrupted', 'changed')
>>> write_stage_record(folder, settings, finished=True, seconds=2.5)
>>> stage_status(folder, settings)
'finished'
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Iterable, List, Optional

import ruamel.yaml
import speechbrain as sb

from speechbrain_meta.atomic_file import atomic_write
from speechbrain_meta.errors import SetupError
from speechbrain_meta.hparams import resolve_hparams
from speechbrain_meta.run_lock import is_main_rank

__all__ = [
    "DISTRIBUTED_ENVIRONMENT",
    "NEUTRAL_DEFAULTS",
    "cpu_isa_environment",
    "STAGE_RECORD",
    "file_digest",
    "hparams_digest",
    "option_args",
    "run_option_args",
    "run_stage",
    "stage_settings",
    "stage_status",
    "write_stage_record",
]

logger = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
# What torchrun sets: a stage run without them is a single process.
DISTRIBUTED_ENVIRONMENT = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


_CPU_ISA_NAMES = {  # ATEN_CPU_CAPABILITY -> (MKL_CBWR, ONEDNN_MAX_CPU_ISA)
    "avx2": ("AVX2", "AVX2"),
    "avx512": ("AVX512", "AVX512_CORE"),
}


def cpu_isa_environment(isa: str) -> dict:
    """The environment that makes torch, MKL and oneDNN use one instruction set.

    Kernels written for different instruction sets (AVX-512, AVX2) round
    differently, so the same run on two machines drifts apart; with the same
    set on both, it does not. The variables are read when a process starts.

    Arguments
    ---------
    isa : str
        ``avx2`` or ``avx512``.

    Returns
    -------
    dict
        ``ATEN_CPU_CAPABILITY``, ``MKL_CBWR`` and ``ONEDNN_MAX_CPU_ISA``.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        For another instruction set.

    Example
    -------
    >>> cpu_isa_environment("avx2")
    {'ATEN_CPU_CAPABILITY': 'avx2', 'MKL_CBWR': 'AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}
    """
    if isa not in _CPU_ISA_NAMES:
        raise SetupError(f"cpu_isa must be one of {sorted(_CPU_ISA_NAMES)} or null.")
    mkl, onednn = _CPU_ISA_NAMES[isa]
    return {"ATEN_CPU_CAPABILITY": isa, "MKL_CBWR": mkl, "ONEDNN_MAX_CPU_ISA": onednn}


def option_args(options: dict) -> List[str]:
    """YAML overrides as command-line arguments (values written as JSON).

    Arguments
    ---------
    options : dict
        Keys and values.

    Returns
    -------
    list of str
        ``["--key", "value", ...]``.

    Example
    -------
    >>> option_args({"budget": 2, "curve_steps": [0, 10], "init": None})
    ['--budget', '2', '--curve_steps', '[0, 10]', '--init', 'null']
    """
    return [arg for k, v in options.items() for arg in (f"--{k}", json.dumps(v))]


def run_option_args(run_opts) -> List[str]:
    """The SpeechBrain run options given on the command line, as arguments.

    Arguments
    ---------
    run_opts : dict
        The run options of ``speechbrain.parse_arguments`` (with
        ``overridden_args``, the names given on the command line).

    Returns
    -------
    list of str
        ``["--name=value", "--flag", ...]``.
    """
    args = []
    for name in sorted(run_opts.get("overridden_args", ())):
        value = run_opts[name]
        if value is True:
            args.append(f"--{name}")
        elif value not in (False, None):
            args.append(f"--{name}={value}")
    return args


def file_digest(path: str) -> str:
    """The SHA-256 of a file's content."""
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def _plain(node):
    """A ruamel.yaml tree as plain data: tags kept, comments and styles left out."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if isinstance(node, dict):
        value = {str(k): _plain(v) for k, v in node.items()}
    elif isinstance(node, list):
        value = [_plain(v) for v in node]
    else:
        value = getattr(node, "value", node)
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = str(value)
    return {"tag": tag, "value": value} if tag else value


# Keys added to the YAMLs after stages were recorded, with the value that
# leaves a run as it was: at that value they are left out of the digest, so
# that adding them keeps finished stages finished.
NEUTRAL_DEFAULTS = {"train_time_budget_minutes": None, "reuse_body_pass": True}


def hparams_digest(hparams_file: str, overrides=None) -> str:
    r"""The SHA-256 of a YAML's resolved hyperparameters, comments left out.

    Top-level keys of :data:`NEUTRAL_DEFAULTS` at their neutral value count
    as absent.

    Arguments
    ---------
    hparams_file : str
        The YAML file (with its layers).
    overrides : str or dict, optional
        Command-line overrides.

    Returns
    -------
    str
        The same for every edit that leaves the hyperparameters as they are.

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> _ = (folder / "a.yaml").write_text("lr: 0.1  # rate\nsteps: !ref <lr>\n")
    >>> _ = (folder / "b.yaml").write_text("# edited\nlr:   0.1\nsteps: 0.1\n")
    >>> hparams_digest(str(folder / "a.yaml")) == hparams_digest(str(folder / "b.yaml"))
    True
    >>> hparams_digest(str(folder / "a.yaml")) == hparams_digest(
    ...     str(folder / "a.yaml"), "lr: 0.2"
    ... )
    False
    >>> _ = (folder / "c.yaml").write_text(
    ...     "lr: 0.1\nsteps: 0.1\ntrain_time_budget_minutes: null\n"
    ... )
    >>> hparams_digest(str(folder / "c.yaml")) == hparams_digest(str(folder / "b.yaml"))
    True
    """
    resolved = ruamel.yaml.YAML().load(resolve_hparams(hparams_file, overrides))
    plain = {
        key: value
        for key, value in _plain(resolved).items()
        if key not in NEUTRAL_DEFAULTS or value != NEUTRAL_DEFAULTS[key]
    }
    text = json.dumps(plain, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_settings(script: str, argv: list, inputs: Iterable[Optional[str]]) -> dict:
    """What a stage's result depends on, as recorded in ``stage.json``.

    Arguments
    ---------
    script : str
        The script's path.
    argv : list of str
        Its command line: the YAML, run options and overrides.
    inputs : iterable of str
        Files it reads besides its YAML (checkpoints, encoders); None entries
        are left out.

    Returns
    -------
    dict
        ``script``, ``argv`` (for the reader), ``run_options``,
        ``hparams_sha256`` and ``inputs_sha256``.
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    return {
        "script": os.path.basename(script),
        "argv": argv,
        "run_options": run_option_args(run_opts),
        "hparams_sha256": hparams_digest(hparams_file, overrides),
        "inputs_sha256": {path: file_digest(path) for path in inputs if path},
    }


def _read_record(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, STAGE_RECORD), encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError):
        return None


def _same(recorded: dict, settings: dict) -> bool:
    """Whether recorded settings are these, ``argv`` aside (it is for reading)."""
    keys = set(recorded) | set(settings)
    keys.discard("argv")
    plain = json.loads(json.dumps(settings))
    return all(recorded.get(key) == plain.get(key) for key in keys)


def stage_status(folder: str, settings: dict) -> str:
    """``new``, ``finished``, ``interrupted`` or ``changed`` (see the module doc).

    Arguments
    ---------
    folder : str
        The stage's output folder.
    settings : dict
        Its settings now (:func:`stage_settings`).

    Returns
    -------
    str
        ``new`` (no folder), ``finished`` / ``interrupted`` (recorded with
        these settings) or ``changed`` (other settings, or no record).
    """
    if not os.path.exists(folder):
        return "new"
    record = _read_record(folder)
    if record is None or not _same(record.get("settings", {}), settings):
        return "changed"
    return "finished" if record.get("finished") else "interrupted"


def write_stage_record(
    folder: str, settings: dict, finished: bool, seconds: Optional[float] = None
) -> None:
    """Write ``stage.json``: the settings, whether the stage finished, its time.

    Arguments
    ---------
    folder : str
        The stage's output folder (created).
    settings : dict
        Its settings.
    finished : bool
        Whether it finished.
    seconds : float, optional
        How long it took.
    """
    os.makedirs(folder, exist_ok=True)
    record = {"settings": settings, "finished": finished}
    if seconds is not None:
        record["seconds"] = round(seconds, 1)
    path = os.path.join(folder, STAGE_RECORD)
    with atomic_write(path) as stream:
        json.dump(record, stream, indent=2, sort_keys=True)


def _single_process_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENVIRONMENT}


def run_stage(
    name: str,
    folder: str,
    script: str,
    argv: list,
    inputs: Iterable[Optional[str]] = (),
    distributed: bool = False,
) -> None:
    """Run ``python script argv`` for a stage unless it finished before.

    Arguments
    ---------
    name : str
        What the stage is, for the log.
    folder : str
        The stage's output folder (the ``--output_folder`` of ``argv``).
    script : str
        The script's path.
    argv : list of str
        Its command line.
    inputs : iterable of str
        Files the stage reads besides its YAML.
    distributed : bool
        Whether the stage joins the ``torchrun`` launch the protocol runs in
        (every rank runs it); otherwise it runs on the main process only, as
        a single process, and the other ranks skip it.

    Raises
    ------
    RuntimeError
        If the script fails (its exit status and log file are named).
    """
    main = is_main_rank()
    if not (distributed or main):
        return
    settings = stage_settings(script, argv, inputs)
    status = stage_status(folder, settings)
    if status == "finished":
        logger.info(f"{name}: done before, reusing {folder}")
        return
    if status == "changed" and main:
        aside = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        logger.info(f"{name}: its settings changed; {folder} is moved to {aside}")
        os.rename(folder, aside)
    if main:
        write_stage_record(folder, settings, finished=False)
    resumed = " (resuming)" if status == "interrupted" else ""
    logger.info(f"{name}{resumed}: {sys.executable} {script} {' '.join(argv)}")
    start = time.time()
    environment = None if distributed else _single_process_environment()
    result = subprocess.run([sys.executable, script, *argv], env=environment)
    if result.returncode != 0:
        raise RuntimeError(
            f"{name} failed with exit status {result.returncode}; see "
            f"{os.path.join(folder, 'log.txt')}."
        )
    if main:
        write_stage_record(folder, settings, True, time.time() - start)

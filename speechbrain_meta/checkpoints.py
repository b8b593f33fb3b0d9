"""What makes a meta-learning run resume exactly and never save broken weights.

* :class:`RandomState`: a SpeechBrain recoverable holding the random number
  generators (torch CPU and CUDA, Python's ``random``, NumPy), so that a run
  resumed from a checkpoint draws the same dropout masks and augmentations as
  the run that was not interrupted.
* :func:`set_aside_incomplete_checkpoints`: a run killed while it saved leaves
  a ``CKPT+`` folder without all of its files (or with a truncated one); it is
  moved to ``<checkpoints_dir>/incomplete/`` before recovery, so that the run
  resumes from the last complete checkpoint instead of failing on it.
* :func:`nonfinite_tensors`: the parameters and buffers that are NaN or
  infinite, for the check that no checkpoint is written with them.

Example
-------
>>> import tempfile
>>> from speechbrain.utils.checkpoints import Checkpointer
>>> checkpointer = Checkpointer(tempfile.mkdtemp(), {"rng": RandomState()})
>>> _ = checkpointer.save_checkpoint()
>>> first = torch.rand(3)
>>> _ = checkpointer.recover_if_possible()
>>> torch.equal(torch.rand(3), first)
True
"""

import logging
import os
import random
import shutil
import zipfile
from typing import Dict, List, Sequence

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    METAFNAME,
    PARAMFILE_EXT,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

__all__ = ["RandomState", "nonfinite_tensors", "set_aside_incomplete_checkpoints"]

logger = logging.getLogger(__name__)

INCOMPLETE_FOLDER = "incomplete"


@register_checkpoint_hooks
class RandomState:
    """The process's random number generators as a checkpoint recoverable.

    Saves and restores the states of torch's CPU generator, every CUDA
    device's generator (when CUDA is initialised), Python's ``random`` and
    NumPy's global generator; :meth:`state` / :meth:`restore` do the same in
    memory.

    Example
    -------
    >>> generators = RandomState()
    >>> state = generators.state()
    >>> first = torch.rand(1)
    >>> generators.restore(state)
    >>> torch.equal(torch.rand(1), first)
    True
    """

    @staticmethod
    def state() -> dict:
        """The generators' states now."""
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def restore(state: dict) -> None:
        """Set the generators to a :meth:`state`."""
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    @mark_as_saver
    def save(self, path: str) -> None:
        """Write the generator states to ``path``."""
        torch.save(self.state(), path)

    @mark_as_loader
    def load(self, path: str, end_of_epoch: bool = False) -> None:
        """Restore the generator states saved in ``path``."""
        del end_of_epoch
        self.restore(torch.load(path, weights_only=False))


def _is_truncated(path: str) -> bool:
    """Whether a file that ``torch.save`` began was cut short by a kill.

    ``torch.save`` writes a zip archive whose directory is at its end: a file
    cut short is not a zip file any more. A kill right after the file was
    opened leaves it empty, or shorter than the zip header: cut short too.

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> torch.save({"x": torch.ones(2)}, folder / "whole.ckpt")
    >>> (folder / "empty.ckpt").write_bytes(b"")
    0
    >>> (folder / "cut.ckpt").write_bytes((folder / "whole.ckpt").read_bytes()[:50])
    50
    >>> (folder / "text.ckpt").write_text("12")
    2
    >>> [_is_truncated(folder / f"{n}.ckpt") for n in ("whole", "empty", "cut", "text")]
    [False, True, True, False]
    """
    header = b"PK\x03\x04"
    with open(path, "rb") as stream:
        start = stream.read(len(header))
    if len(start) < len(header):
        return header.startswith(start)
    return start == header and not zipfile.is_zipfile(path)


def _is_complete(folder: str, recoverables: List[str], optional: set) -> bool:
    """Whether a checkpoint folder has its meta file and every paramfile whole.

    Every paramfile in the folder is checked, not only those of
    ``recoverables``: a Brain registers some (the optimizer) only when
    ``fit`` starts, after this check, and saves them last.
    """
    if not os.path.isfile(os.path.join(folder, METAFNAME)):
        return False
    for name in recoverables:
        path = os.path.join(folder, name + PARAMFILE_EXT)
        if not os.path.isfile(path) and name not in optional:
            return False
    return not any(
        _is_truncated(os.path.join(folder, entry))
        for entry in os.listdir(folder)
        if entry.endswith(PARAMFILE_EXT)
    )


def set_aside_incomplete_checkpoints(
    checkpointer: Checkpointer, expected: Sequence[str] = ()
) -> List[str]:
    """Move the checkpoints a killed save left incomplete out of the way.

    A checkpoint is incomplete when its meta file or the file of one of the
    checkpointer's (non-optional) recoverables, or of ``expected``, is
    missing, or when a file written by ``torch.save`` is truncated. Such
    folders are moved, never deleted, to ``<checkpoints_dir>/incomplete/``.

    Arguments
    ---------
    checkpointer : speechbrain.utils.checkpoints.Checkpointer
        The run's checkpointer.
    expected : sequence of str
        Recoverables not registered yet that every checkpoint holds (a
        Brain registers its optimizer when ``fit`` starts, after this check,
        and a kill during a save can leave a checkpoint without its file).

    Returns
    -------
    list of str
        The new paths of the folders moved.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> checkpointer = Checkpointer(folder, {"net": torch.nn.Linear(1, 1)})
    >>> good = checkpointer.save_checkpoint(name="good")
    >>> bad = checkpointer.save_checkpoint(name="bad")
    >>> os.remove(bad.paramfiles["net"])
    >>> cut = checkpointer.save_checkpoint(name="cut")
    >>> # A file of a recoverable registered later (the optimizer), cut short:
    >>> torch.save({"state": torch.zeros(1000)}, cut.path / "optimizer.ckpt")
    >>> data = (cut.path / "optimizer.ckpt").read_bytes()
    >>> _ = (cut.path / "optimizer.ckpt").write_bytes(data[: len(data) // 2])
    >>> # Without the file of a recoverable registered later:
    >>> unsaved = checkpointer.save_checkpoint(name="unsaved")
    >>> torch.save({"state": 1}, good.path / "optimizer.ckpt")
    >>> moved = set_aside_incomplete_checkpoints(checkpointer, expected=["optimizer"])
    >>> [os.path.basename(p) for p in moved]
    ['CKPT+bad', 'CKPT+cut', 'CKPT+unsaved']
    >>> [c.path.name for c in checkpointer.list_checkpoints()]
    ['CKPT+good']
    """
    folder = str(checkpointer.checkpoints_dir)
    if not os.path.isdir(folder):
        return []
    names = list(checkpointer.recoverables)
    names += [name for name in expected if name not in names]
    # Checkpointer loads without these files too (see its _call_load_hooks).
    optional = {n for n, flag in checkpointer.optional_recoverables.items() if flag}
    optional |= {n for n in names if "dataloader" in n}
    moved = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not (entry.startswith("CKPT") and os.path.isdir(path)):
            continue
        if _is_complete(path, names, optional):
            continue
        destination = os.path.join(folder, INCOMPLETE_FOLDER, entry)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if os.path.exists(destination):
            destination += f".{len(os.listdir(os.path.dirname(destination)))}"
        shutil.move(path, destination)
        logger.warning(
            f"Checkpoint {path} is incomplete (a save was interrupted); "
            f"moved to {destination}."
        )
        moved.append(destination)
    return moved


def nonfinite_tensors(module: torch.nn.Module) -> Dict[str, str]:
    """The floating-point parameters and buffers of ``module`` that are not finite.

    Arguments
    ---------
    module : torch.nn.Module
        The model.

    Returns
    -------
    dict
        Name -> ``"NaN"`` or ``"inf"`` for every tensor with such values.

    Example
    -------
    >>> net = torch.nn.Linear(2, 1)
    >>> nonfinite_tensors(net)
    {}
    >>> with torch.no_grad():
    ...     net.bias.fill_(float("nan"))
    Parameter containing:
    tensor([nan], requires_grad=True)
    >>> nonfinite_tensors(net)
    {'bias': 'NaN'}
    """
    tensors = [
        (name, tensor)
        for name, tensor in module.state_dict(keep_vars=True).items()
        if tensor.is_floating_point()
    ]
    if not tensors:
        return {}
    finite = torch.stack([t.detach().isfinite().all() for _, t in tensors])
    if bool(finite.all()):
        return {}
    return {
        name: "NaN" if bool(tensor.detach().isnan().any()) else "inf"
        for (name, tensor), ok in zip(tensors, finite.tolist())
        if not ok
    }

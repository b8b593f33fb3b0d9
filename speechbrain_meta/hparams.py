r"""HyperPyYAML files in layers: a YAML states only what differs from its bases.

A YAML may start with ``base:``, one file or a list of files (paths relative
to the YAML), e.g. ``hparams/fomaml_ctc.yaml``::

    base: [training.yaml, models/ctc.yaml, algorithms/fomaml.yaml]

The bases are merged in order, then the file's own keys: a later top-level
key replaces an earlier one, as a command-line override does, and ``!ref``
resolves against the merged document, so a layer may refer to keys of the
others. A base may itself have bases, and a base path may name a key in angle
brackets (``models/<decoder_type>.yaml``), whose value comes from the
command-line overrides or from the layers before it. Overrides are then
applied to the merged document exactly as SpeechBrain applies them to one
file (an unknown key is an error), and the result is loaded with
``hyperpyyaml``. :func:`resolve_hparams` gives the merged, resolved YAML as
text: a flat HyperPyYAML file that ``load_hyperpyyaml`` loads on its own
(``train.py`` saves it as ``hyperparams.yaml``).

Example
-------
>>> folder = getfixture("tmp_path")
>>> _ = (folder / "base.yaml").write_text(
...     "lr: 0.1\nsteps: 2\nplan: !ref <steps> steps of <lr>\n"
... )
>>> _ = (folder / "fast.yaml").write_text("base: base.yaml\nlr: 0.5\n")
>>> hparams = load_hparams(str(folder / "fast.yaml"), "steps: 3")
>>> hparams["plan"]
'3 steps of 0.5'
>>> load_hparams(str(folder / "fast.yaml"), {"stepz": 3})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
speechbrain_meta.errors.SetupError: Unknown key 'stepz' ...
"""

import io
import os
import re
from typing import Mapping, Optional, Union

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from ruamel.yaml.comments import CommentedMap

from speechbrain_meta.errors import SetupError

__all__ = ["BASE_KEY", "load_hparams", "merged_yaml", "resolve_hparams"]

BASE_KEY = "base"
Overrides = Optional[Union[str, Mapping]]
_KEY_IN_PATH = re.compile(r"<([^<>]+)>")


def _yaml() -> ruamel.yaml.YAML:
    return ruamel.yaml.YAML()


def _read(path: str) -> CommentedMap:
    if not os.path.isfile(path):
        raise SetupError(f"The YAML file {path} does not exist.")
    with open(path, encoding="utf-8") as stream:
        tree = _yaml().load(stream)
    if tree is None:
        return CommentedMap()
    if not isinstance(tree, dict):
        raise SetupError(f"{path} is not a YAML mapping of keys to values.")
    return tree


def _base_path(entry: str, folder: str, known: Mapping, overrides: Mapping) -> str:
    """A base entry as a path, its ``<key>`` parts filled in."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key in overrides:
            return str(overrides[key])
        if key in known:
            return str(known[key])
        raise SetupError(
            f"The base '{entry}' names the key '{key}', which neither the "
            "command line nor the layers before it set."
        )

    return os.path.join(folder, _KEY_IN_PATH.sub(value, str(entry)))


def _merge(path: str, overrides: Mapping, chain: tuple) -> CommentedMap:
    """The document of ``path`` with its bases merged in (no overrides yet)."""
    real = os.path.realpath(path)
    if real in chain:
        raise SetupError(f"{path} is its own base (through {' -> '.join(chain)}).")
    tree = _read(path)
    bases = tree.pop(BASE_KEY, None)
    if bases is None:
        return tree
    if isinstance(bases, str):
        bases = [bases]
    merged = CommentedMap()
    folder = os.path.dirname(path)
    for entry in bases:
        base = _base_path(entry, folder, merged, overrides)
        for key, value in _merge(base, overrides, (*chain, real)).items():
            merged[key] = value
    for key, value in tree.items():
        merged[key] = value
    return merged


def _override_tree(overrides: Overrides) -> Mapping:
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        return _yaml().load(overrides) or {}
    return overrides


def _update(tree: dict, overrides: Mapping, path: str, prefix: str = "") -> None:
    """SpeechBrain's override rule: nested mappings merged, unknown keys refused."""
    for key, value in overrides.items():
        if key not in tree:
            raise SetupError(
                f"Unknown key '{prefix}{key}' in the overrides: {path} and its "
                "bases have no such key."
            )
        if isinstance(value, Mapping) and isinstance(tree[key], dict):
            _update(tree[key], value, path, f"{prefix}{key}.")
        else:
            tree[key] = value


def merged_yaml(path: str, overrides: Overrides = None) -> str:
    """The YAML of ``path`` with its bases merged and ``overrides`` applied.

    Arguments
    ---------
    path : str
        The YAML file.
    overrides : str or mapping, optional
        Command-line overrides, as SpeechBrain's ``parse_arguments`` gives
        them (YAML text) or as a mapping.

    Returns
    -------
    str
        One HyperPyYAML document, references not yet resolved.
    """
    overrides = _override_tree(overrides)
    tree = _merge(path, overrides, ())
    _update(tree, overrides, path)
    stream = io.StringIO()
    _yaml().dump(tree, stream)
    return stream.getvalue()


def _stream(path: str, overrides: Overrides) -> io.StringIO:
    stream = io.StringIO(merged_yaml(path, overrides))
    stream.name = path  # hyperpyyaml finds !include files beside it
    return stream


def resolve_hparams(path: str, overrides: Overrides = None) -> str:
    """The merged YAML of ``path`` with every ``!ref`` resolved, as text.

    Arguments
    ---------
    path : str
        The YAML file.
    overrides : str or mapping, optional
        Command-line overrides.

    Returns
    -------
    str
        A flat HyperPyYAML document that ``load_hyperpyyaml`` loads alone.
    """
    return resolve_references(_stream(path, overrides)).getvalue()


def load_hparams(path: str, overrides: Overrides = None) -> dict:
    """Load a layered HyperPyYAML file (see the module docstring).

    Arguments
    ---------
    path : str
        The YAML file.
    overrides : str or mapping, optional
        Command-line overrides (YAML text or a mapping).

    Returns
    -------
    dict
        The hyperparameters, objects constructed.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the file or a base is missing, or an override names an unknown key.
    """
    return load_hyperpyyaml(_stream(path, overrides))

"""Loads ``corpus.yaml`` and resolves the languages, targets and size of a build.

Example
-------
>>> config = load_config()
>>> plan = resolve_build(config, languages=["en", "de"], targets=["cs"], size="tiny")
>>> plan.languages, plan.targets, plan.counts["cs"]
(['en', 'de', 'cs'], ['cs'], {'train': 8, 'dev': 2, 'test': 2})
>>> resolve_build(config, size="huge")  # doctest: +ELLIPSIS
Traceback (most recent call last):
 ...
recipes.embedded_corpus.config.UnknownSizeError: Unknown corpus size 'huge': ...
"""

import hashlib
import json
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

__all__ = [
    "CONFIG_FILE",
    "SPLITS",
    "BuildPlan",
    "UnknownLanguageError",
    "UnknownSizeError",
    "config_digest",
    "load_config",
    "resolve_build",
]

CONFIG_FILE = Path(__file__).with_name("corpus.yaml")
SPLITS = ("train", "dev", "test")


class UnknownLanguageError(ValueError):
    """A language code has no entry in ``corpus.yaml`` (or no espeak-ng voice)."""


class UnknownSizeError(ValueError):
    """A corpus size is not one of those defined in ``corpus.yaml``."""


class BuildPlan(NamedTuple):
    """What one build contains.

    ``languages`` lists every language built (targets included), ``targets``
    the held-out ones, ``counts`` the utterances per split of each language.
    """

    languages: list[str]
    targets: list[str]
    size: str
    counts: dict[str, dict[str, int]]


def load_config(path: Optional[str] = None) -> dict:
    """Read the corpus configuration.

    Arguments
    ---------
    path : str, optional
        A YAML file laid out like ``corpus.yaml`` (the default).

    Returns
    -------
    dict
        The configuration.

    Example
    -------
    >>> sorted(load_config()["sizes"])
    ['demo', 'full', 'tiny']
    """
    with open(path or CONFIG_FILE, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def config_digest(config: dict) -> str:
    """Return a short fingerprint of a configuration (recorded with each build).

    Arguments
    ---------
    config : dict
        The configuration.

    Returns
    -------
    str
        12 hexadecimal digits that change whenever the configuration does.
    """
    text = json.dumps(config, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def resolve_build(
    config: dict,
    languages: Optional[list[str]] = None,
    targets: Optional[list[str]] = None,
    size: str = "demo",
) -> BuildPlan:
    """Check the requested languages and size against the configuration.

    Arguments
    ---------
    config : dict
        The configuration (see :func:`load_config`).
    languages : list of str, optional
        Languages to build; default: the configured ``languages``.
    targets : list of str, optional
        Held-out target languages; they are built too (appended to
        ``languages`` when missing). Default: the configured targets that are
        among ``languages``.
    size : str
        A size defined in the configuration (``tiny``, ``demo`` or ``full``).

    Returns
    -------
    BuildPlan
        The languages, targets and per-split utterance counts.

    Raises
    ------
    UnknownSizeError
        When ``size`` is not defined.
    UnknownLanguageError
        When a language has no entry in the configuration.
    """
    sizes = config["sizes"]
    if size not in sizes:
        raise UnknownSizeError(
            f"Unknown corpus size '{size}': choose one of {', '.join(sizes)}."
        )
    languages = list(config["languages"] if languages is None else languages)
    if targets is None:
        targets = [lang for lang in config["targets"] if lang in languages]
    languages += [lang for lang in targets if lang not in languages]
    known = config["language_settings"]
    for lang in languages:
        if lang not in known:
            raise UnknownLanguageError(
                f"Unknown language '{lang}': corpus.yaml defines {', '.join(known)}."
            )
    if len(set(languages)) != len(languages):
        raise ValueError(f"A language is listed twice in {languages}.")
    counts = {
        lang: dict(sizes[size]["target" if lang in targets else "source"])
        for lang in languages
    }
    return BuildPlan(languages, list(targets), size, counts)

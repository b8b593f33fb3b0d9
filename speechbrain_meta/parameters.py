"""Which parameters the inner loop adapts and which the outer step learns.

Parameters are named as in ``brain.modules.state_dict()``:
``<module>.<path>``, e.g. ``ctc_lin.w.weight`` or
``encoder.adapted_model.conv1.conv.adapter_up_proj.weight``. A *pattern*
selects parameters by name: a module or sub-module name (``ctc_lin``,
``encoder.rnn``) selects every parameter below it, and a shell-style glob
(``*adapter*``, ``encoder.*.bias``) selects the names it matches. Two YAML
keys use them:

* ``inner_params``: the fast weights, adapted by the inner loop in training,
  validation, test and ``adapt.py`` (default: every learnt parameter). ANIL
  is ``inner_params: [ctc_lin]`` (``[ctc_lin, seq_lin]`` for the attention
  models);
* ``meta_params``: the parameters the outer step learns (default: those that
  require a gradient as the modules define them; SpeechBrain's
  ``AdaptedModel`` freezes the model it wraps). The others are frozen: they
  keep their values, bit for bit.

A third, ``lr_scales``, gives the parameters a pattern selects their own
learning rate in the outer optimizer (:func:`scale_learning_rates`).

Example
-------
>>> names = ["encoder.conv.weight", "encoder.conv.bias", "ctc_lin.w.weight"]
>>> matching(names, ["ctc_lin"])
['ctc_lin.w.weight']
>>> matching(names, ["*.bias", "ctc_lin"])
['encoder.conv.bias', 'ctc_lin.w.weight']
>>> matching(names, ["decoder"], key="inner_params")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
speechbrain_meta.errors.SetupError: inner_params pattern 'decoder' matches no ...
"""

from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from speechbrain_meta.errors import SetupError

__all__ = [
    "keep_frozen_inputs_frozen",
    "matching",
    "scale_learning_rates",
    "set_trainable",
]


def _matches(name: str, pattern: str) -> bool:
    return (
        name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)
    )


def matching(
    names: Iterable[str], patterns: Sequence[str], key: str = "patterns"
) -> List[str]:
    """The names that at least one pattern selects, in their order.

    Arguments
    ---------
    names : iterable of str
        Parameter names.
    patterns : sequence of str
        Module names or glob patterns.
    key : str
        The YAML key the patterns come from, for the error message.

    Returns
    -------
    list of str
        The selected names.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If a pattern selects no name (a typo would otherwise adapt or freeze
        nothing without a word).
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in names):
            modules = sorted({name.split(".")[0] for name in names})
            raise SetupError(
                f"{key} pattern '{pattern}' matches no parameter: give module "
                f"names ({', '.join(modules)}), sub-module names or glob patterns "
                f"over parameter names such as '{names[0] if names else ''}'."
            )
    return [name for name in names if any(_matches(name, p) for p in patterns)]


def set_trainable(
    modules: torch.nn.ModuleDict, patterns: Optional[Sequence[str]], key: str
) -> List[str]:
    """Let the outer step learn exactly the selected parameters.

    Arguments
    ---------
    modules : torch.nn.ModuleDict
        A Brain's modules.
    patterns : sequence of str, optional
        The parameters to learn; None: leave ``requires_grad`` as it is.
    key : str
        The YAML key, for error messages.

    Returns
    -------
    list of str
        The names of the parameters that require a gradient afterwards.

    Example
    -------
    >>> modules = torch.nn.ModuleDict(
    ...     {"encoder": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)}
    ... )
    >>> set_trainable(modules, ["head"], "meta_params")
    ['head.weight', 'head.bias']
    >>> modules["encoder"].weight.requires_grad
    False
    """
    named = dict(modules.named_parameters())
    if patterns is not None:
        selected = set(matching(named, patterns, key))
        for name, parameter in named.items():
            parameter.requires_grad_(name in selected)
    keep_frozen_inputs_frozen(modules)
    return [name for name, parameter in named.items() if parameter.requires_grad]


def keep_frozen_inputs_frozen(modules: torch.nn.Module) -> None:
    """Keep frozen ``transformers`` feature encoders from asking a gradient.

    The convolutional feature encoders of wav2vec2, HuBERT and WavLM mark
    their input as requiring a gradient in training (for their gradient
    checkpointing) unless their ``_requires_grad`` flag is off, and
    SpeechBrain's ``freeze_feature_extractor`` freezes their parameters
    without turning the flag off. Autograd then keeps every activation of
    the encoder, for a backward pass that reaches no parameter below the
    first trainable one. The flag follows the parameters here: on when one
    of them is trainable, off otherwise.

    Example
    -------
    >>> encoder = torch.nn.Conv1d(1, 2, 3)
    >>> encoder._requires_grad = True  # as transformers sets it
    >>> _ = encoder.requires_grad_(False)
    >>> keep_frozen_inputs_frozen(encoder)
    >>> encoder._requires_grad
    False
    >>> _ = encoder.bias.requires_grad_(True)
    >>> keep_frozen_inputs_frozen(encoder)
    >>> encoder._requires_grad
    True
    """
    for module in modules.modules():
        if isinstance(getattr(module, "_requires_grad", None), bool):
            module._requires_grad = any(p.requires_grad for p in module.parameters())


def scale_learning_rates(
    optimizer: torch.optim.Optimizer,
    modules: torch.nn.ModuleDict,
    scales: Dict[str, float],
) -> None:
    """Give the parameters each pattern selects a scaled learning rate.

    The parameters of the optimizer's first group that a pattern of
    ``scales`` selects (the first pattern that does) move to a group of their
    own, with the first group's settings and ``scale`` times its learning
    rate; the others stay. Call it before the first step (the groups are
    then checkpointed with the optimizer, and recovered as they are made).

    Arguments
    ---------
    optimizer : torch.optim.Optimizer
        The optimizer, its first group holding ``modules``' parameters.
    modules : torch.nn.ModuleDict
        The modules, for the parameters' names.
    scales : dict
        Pattern -> factor of the learning rate.

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If a pattern selects no parameter.

    Example
    -------
    >>> modules = torch.nn.ModuleDict(
    ...     {"encoder": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)}
    ... )
    >>> optimizer = torch.optim.Adam(modules.parameters(), lr=0.001)
    >>> scale_learning_rates(optimizer, modules, {"encoder": 0.1})
    >>> [(len(g["params"]), g["lr"]) for g in optimizer.param_groups]
    [(2, 0.001), (2, 0.0001)]
    """
    named = dict(modules.named_parameters())
    names = {id(p): name for name, p in named.items()}
    default = optimizer.param_groups[0]
    remaining = list(default["params"])
    for pattern, scale in scales.items():
        selected = set(matching(named, [pattern], "lr_scales"))
        moved = [p for p in remaining if names.get(id(p)) in selected]
        if not moved:
            continue
        remaining = [p for p in remaining if names.get(id(p)) not in selected]
        settings = {k: v for k, v in default.items() if k != "params"}
        default["params"] = remaining
        optimizer.add_param_group(
            {**settings, "params": moved, "lr": default["lr"] * float(scale)}
        )

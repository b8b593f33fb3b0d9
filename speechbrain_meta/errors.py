"""The error raised for a user's mistake found before (or instead of) training.

A :class:`SetupError` says what is wrong with a configuration, a manifest, a
data folder or an output folder, and what to do about it, in its message. The
root scripts (``train.py``, ``adapt.py``, ``evaluate_adaptation.py``) print
that message on one line, without a traceback, and exit with status 2;
library callers catch it as a ``ValueError``.

Example
-------
>>> try:
...     raise SetupError("inner_lr must be > 0, got -0.1: set --inner_lr 0.05.")
... except ValueError as error:
...     print(error)
inner_lr must be > 0, got -0.1: set --inner_lr 0.05.
"""

__all__ = ["SetupError"]


class SetupError(ValueError):
    """A configuration, data or folder problem, with what to do in the message."""

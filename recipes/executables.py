"""Checks that the command-line tools a recipe runs are installed.

Example
-------
>>> require_executables({"sh": "dash"})
>>> require_executables({"no-such-tool": "xyz-utils"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
 ...
recipes.executables.MissingExecutableError: ... package 'xyz-utils' ...
"""

import shutil

__all__ = ["MissingExecutableError", "require_executables"]


class MissingExecutableError(RuntimeError):
    """A command-line tool a recipe needs is not installed."""


def require_executables(executables: dict[str, str]) -> None:
    """Raise unless every executable is found on ``PATH``.

    Arguments
    ---------
    executables : dict
        Maps each executable name to the Debian package that installs it.

    Raises
    ------
    MissingExecutableError
        For the first executable that is missing, naming its Debian package.

    Example
    -------
    >>> require_executables({"sh": "dash"})
    """
    for name, package in executables.items():
        if shutil.which(name) is None:
            raise MissingExecutableError(
                f"The executable '{name}' was not found on PATH: install the "
                f"Debian package '{package}' (apt-get install {package})."
            )

"""What the data preparation recipes share besides manifests.

* :data:`SAMPLE_RATE` and :func:`sox_wav_command`: every recipe writes 16 kHz
  mono 16-bit wav files, converted with sox;
* :func:`preparation_parser` / :func:`run_preparation`: the command line of a
  ``prepare.py`` (the options every recipe has, then its own); a user's
  mistake (a :class:`speechbrain_meta.errors.SetupError`, e.g. a
  ``--data_folder`` that holds files the recipe did not make) is printed on
  one line, without a traceback, with exit status 2.

Example
-------
>>> sox_wav_command(["in.ogg"], "out.wav")[3:]
['in.ogg', '-r', '16000', '-c', '1', '-b', '16', '-t', 'wav', 'out.wav']
>>> parser = preparation_parser("Build a corpus.")
>>> vars(parser.parse_args(["--data_folder", "data"]))["seed"]
1234
"""

import argparse
import logging
from typing import Callable, Optional, Sequence

from recipes.manifest import COMMAND_LINE_CHOICE, FolderNotOwnedError
from speechbrain_meta.errors import SetupError

__all__ = [
    "SAMPLE_RATE",
    "preparation_parser",
    "run_preparation",
    "sox_wav_command",
]

SAMPLE_RATE = 16000


def sox_wav_command(
    source: Sequence[str], output: str, effects: Sequence[str] = ()
) -> list[str]:
    """The sox command that writes ``source`` as a 16 kHz mono 16-bit wav.

    Arguments
    ---------
    source : sequence of str
        sox's input arguments (a file, or ``["-t", "wav", "-"]`` for stdin).
    output : str
        The wav file to write.
    effects : sequence of str
        sox effects applied on the way (e.g. ``["vol", "0.8"]``).

    Returns
    -------
    list of str
        The command, for ``subprocess.run``.
    """
    return [
        "sox", "-R", "-V1", *source,
        "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-t", "wav", output,
        *effects,
    ]  # fmt: skip


def preparation_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options of every preparation recipe.

    Arguments
    ---------
    description : str
        What the recipe builds.

    Returns
    -------
    argparse.ArgumentParser
        With ``--data_folder``, ``--save_folder``, ``--seed``,
        ``--num_workers`` and ``--download_folder``; add the recipe's own.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_folder", required=True, help="audio folder")
    parser.add_argument("--save_folder", help="manifest folder (default: data_folder)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--download_folder", help="Debian package cache")
    return parser


def run_preparation(
    prepare: Callable[..., dict],
    parser: argparse.ArgumentParser,
    argv: Optional[list[str]] = None,
) -> None:
    """Run a preparation function from the command line; print its manifests.

    A :class:`speechbrain_meta.errors.SetupError` is printed as
    ``<prog>: error: <message>`` and exits with status 2; a
    :class:`recipes.manifest.FolderNotOwnedError` names
    ``--data_folder/--save_folder`` as the options to change.

    Arguments
    ---------
    prepare : callable
        The recipe's ``prepare_*`` function; gets the parsed options.
    parser : argparse.ArgumentParser
        The recipe's parser (see :func:`preparation_parser`).
    argv : list of str, optional
        Arguments; default: ``sys.argv[1:]``.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifests = prepare(**vars(args))
    except SetupError as error:
        if isinstance(error, FolderNotOwnedError):
            error = error.with_choice(COMMAND_LINE_CHOICE)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for split, path in manifests.items():
        print(f"{split}: {path}")

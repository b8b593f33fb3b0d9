"""One run per output folder: a lock that a crashed run cannot leave stuck.

:func:`output_folder_lock` holds an exclusive ``flock`` on
``<output_folder>/run.lock`` for the duration of a run. A second run into the
same folder stops at once with :class:`OutputFolderInUseError`, naming the
process that holds it. The operating system releases the lock when the
process ends, however it ends (``kill -9`` included), so a crashed run never
blocks the next one. Under DDP only the main process takes it.

Example
-------
>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> with output_folder_lock(folder):
...     try:
...         with output_folder_lock(folder):
...             pass
...     except OutputFolderInUseError as error:
...         print("refused:", f"pid {os.getpid()}" in str(error))
refused: True
>>> with output_folder_lock(folder):  # released when the first run ended
...     print("free again")
free again
"""

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from speechbrain.utils.distributed import get_rank

from speechbrain_meta.errors import SetupError

__all__ = ["LOCK_NAME", "OutputFolderInUseError", "is_main_rank", "output_folder_lock"]

LOCK_NAME = "run.lock"


class OutputFolderInUseError(SetupError):
    """Another run is writing into the same output folder."""


def is_main_rank() -> bool:
    """Whether this process is the main one: rank 0 of a launch, or alone.

    Read from the launcher's environment (``RANK``...), so that it also holds
    in a process that joined no process group (a protocol under torchrun).
    """
    return get_rank() in (None, 0)


@contextmanager
def output_folder_lock(folder: str) -> Iterator[None]:
    """Hold the lock of ``folder`` (created if needed) while the block runs.

    Arguments
    ---------
    folder : str
        The run's output folder.

    Yields
    ------
    None
        While the lock is held.

    Raises
    ------
    OutputFolderInUseError
        If another process holds the lock.
    """
    if not is_main_rank():
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            raise OutputFolderInUseError(
                f"The output folder {folder} is in use by another run "
                f"({holder or 'unknown process'}): wait for it to end, or pass "
                "another --output_folder."
            ) from None
        os.ftruncate(descriptor, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(
            descriptor,
            f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(),
            0,
        )
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)

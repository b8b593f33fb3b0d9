"""Writing a file so that a reader never sees it half-written.

Records that another process reads while they change (``stage.json``,
``training_time.json``, the protocol's CSV files, an encoder's record) are
written to a temporary file beside them and moved into place once complete:
a crash or a kill leaves the previous version, never a truncated one.

Example
-------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "record.json")
>>> with atomic_write(path) as stream:
...     _ = stream.write('{"finished": true}')
>>> open(path).read()
'{"finished": true}'
>>> os.listdir(os.path.dirname(path))
['record.json']
"""

import os
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str, newline: Optional[str] = None) -> Iterator[TextIO]:
    """Open ``path`` for writing text; it appears only when the block ends.

    The text goes to ``<path>.<pid>.tmp`` (unique per process, in the same
    folder so that the final move is one rename), which replaces ``path``
    when the block ends without an exception; on an exception it is removed
    and ``path`` is left as it was.

    Arguments
    ---------
    path : str
        The file to write; its folder must exist.
    newline : str, optional
        Passed to :func:`open` (``""`` for the :mod:`csv` module).

    Yields
    ------
    TextIO
        The temporary file, UTF-8.

    Example
    -------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_write(path) as stream:
    ...     _ = stream.write("first")
    >>> try:
    ...     with atomic_write(path) as stream:
    ...         _ = stream.write("second, interrupted")
    ...         raise KeyboardInterrupt
    ... except KeyboardInterrupt:
    ...     pass
    >>> open(path).read(), sorted(os.listdir(os.path.dirname(path)))
    ('first', ['notes.txt'])
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", newline=newline, encoding="utf-8") as stream:
            yield stream
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)

"""Patches that only the threads asking for them see, and shared settings.

The second-order context of the inner loop
(:func:`speechbrain_meta.inner_loop.second_order_context`) and the
twice-differentiable CTC (:func:`speechbrain_meta.ctc.twice_differentiable_ctc`)
change library functions for the calling thread only:

* :class:`ThreadLocalPatch`: while any thread needs it, an attribute (a
  function, a method) is a dispatcher that calls a replacement in the
  threads that entered the context and the original in all others; the
  original is back, by identity, when the last thread has left;
* :class:`SharedSetting`: a process-wide setting (cuDNN's enabled flag, the
  attention backends) held while any thread needs it, restored as it was
  however the threads interleave.
"""

import functools
import threading
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, List, Sequence, Tuple

__all__ = ["SharedSetting", "ThreadLocalPatch"]


class _Depth(threading.local):
    """How deeply the current thread is nested in the contexts of one patch."""

    value = 0


class ThreadLocalPatch:
    """Attributes that dispatch on a per-thread switch while a thread needs it.

    While at least one thread is inside the context, each attribute
    ``owner.name`` of ``targets`` is a dispatcher: in the threads inside the
    context it calls ``replacement(original)``, in all the others
    ``original``, the value the attribute had when the first thread entered.
    The last thread to leave puts the originals back (unless something has
    replaced a dispatcher meanwhile: that replacement then stays, and the
    dispatcher it may call keeps dispatching). The context is re-entrant;
    each thread leaves it in the thread that entered it.

    Arguments
    ---------
    targets : sequence of (object, str)
        Owners (modules, classes) and names of the attributes to patch, each
        in the owner's own namespace.
    replacement : callable
        Given an original function, the function that the threads inside the
        context call instead.

    Example
    -------
    >>> import types
    >>> namespace = types.SimpleNamespace(double=lambda x: 2 * x)
    >>> original = namespace.double
    >>> negated = ThreadLocalPatch(
    ...     [(namespace, "double")], lambda double: lambda x: -double(x)
    ... )
    >>> with negated:
    ...     with negated:
    ...         inner = namespace.double(3)
    ...     outer = namespace.double(3)
    >>> inner, outer, namespace.double(3), namespace.double is original
    (-6, -6, 6, True)
    >>> with negated:
    ...     with negated.suspended():
    ...         suspended = namespace.double(3)
    ...     resumed = namespace.double(3)
    >>> suspended, resumed
    (6, -6)
    """

    def __init__(
        self,
        targets: Sequence[Tuple[object, str]],
        replacement: Callable[[Callable], Callable],
    ) -> None:
        self._targets = targets
        self._replacement = replacement
        self._depth = _Depth()
        self._lock = threading.Lock()
        self._users = 0  # threads inside, counted once per entry
        self._installed: List[Tuple[object, str, Callable, Callable]] = []

    def _dispatcher(self, original: Callable) -> Callable:
        """``original``'s stand-in, which reads the calling thread's switch."""
        replacement = self._replacement(original)
        depth = self._depth

        @functools.wraps(original)
        def dispatch(*args, **kwargs):
            if depth.value:
                return replacement(*args, **kwargs)
            return original(*args, **kwargs)

        return dispatch

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                for owner, name in self._targets:
                    original = vars(owner)[name]
                    dispatcher = self._dispatcher(original)
                    self._installed.append((owner, name, original, dispatcher))
                    setattr(owner, name, dispatcher)
            self._users += 1
        self._depth.value += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth.value -= 1
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for owner, name, original, dispatcher in self._installed:
                    if vars(owner).get(name) is dispatcher:
                        setattr(owner, name, original)
                self._installed.clear()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The originals for the calling thread, however deep it is inside.

        Other threads, and this one once the context is left, keep their
        switch.
        """
        depth, self._depth.value = self._depth.value, 0
        try:
            yield
        finally:
            self._depth.value = depth


class SharedSetting:
    """A process-wide setting held while any thread needs it.

    The first thread to enter enters ``context()``; the last one to leave
    exits it. Threads that enter and leave in any order thus restore the
    values found before the first one (two threads nesting, say,
    ``torch.backends.cudnn.flags`` in overlapping spans can leave cuDNN
    disabled for good).

    Arguments
    ---------
    context : callable
        Makes the context manager that changes the setting and restores it.

    Example
    -------
    >>> import torch
    >>> from torch.nn.attention import SDPBackend, sdpa_kernel
    >>> with SharedSetting(lambda: sdpa_kernel(SDPBackend.MATH)):
    ...     torch.backends.cuda.flash_sdp_enabled()
    False
    >>> torch.backends.cuda.flash_sdp_enabled()
    True
    """

    def __init__(self, context: Callable[[], ContextManager[None]]) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._holders = 0
        self._active: ContextManager[None]

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._active = self._context()
                self._active.__enter__()
            self._holders += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._active.__exit__(None, None, None)

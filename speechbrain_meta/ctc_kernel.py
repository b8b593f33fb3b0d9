"""The CTC loss's time loops as one compiled C kernel each, for CPU tensors.

:mod:`speechbrain_meta.ctc` runs two recursions over time (the alphas of the
forward pass, the conditional expectations of the Hessian-vector product).
As tensor code they cost a few kernel calls per time step, each a few
microseconds of dispatch for a few thousand values; ``ctc_loops.c`` does
each step in one vectorised pass over the states, on one thread. It is
built on first use with the system's C compiler (``$CC``, else ``cc`` or
``gcc``: the project's Debian packages include one) into
``$SPEECHBRAIN_META_CACHE`` (default ``~/.cache/speechbrain_meta``), one
file per source version, CPU and instruction set (that of
``ATEN_CPU_CAPABILITY`` when set, as the protocols' ``cpu_isa`` sets it,
else this CPU's), and loaded with ``ctypes``. Where no compiler is found or
the build fails, :func:`loops` returns None and the tensor loops run
instead (TorchScript), as they do for CUDA tensors and with
``SPEECHBRAIN_META_CTC_KERNEL=0``.

Example
-------
>>> import torch
>>> from speechbrain_meta import ctc
>>> emissions = torch.randn(6, 8, dtype=torch.float64)
>>> skip = torch.zeros(6, dtype=torch.float64)
>>> start = torch.zeros(8, dtype=torch.float64)
>>> kernel = loops()
>>> kernel is None or torch.allclose(
...     kernel.alpha(emissions, skip, start), ctc._alpha_loop(emissions, skip, start)
... )
True
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["SWITCH", "CompiledLoops", "loops"]

SOURCE = Path(__file__).with_name("ctc_loops.c")
# The environment variable that, set to 0, switches the kernel off.
SWITCH = "SPEECHBRAIN_META_CTC_KERNEL"
# Fast math is safe in the loops, whose values are finite by construction;
# the library is linked without it, since linking with it would switch on
# flush-to-zero for the whole process when it loads (GCC's crtfastmath.o).
_COMPILE = ["-O3", "-std=c99", "-ffast-math", "-fopenmp-simd", "-fPIC", "-c"]
# The instruction sets that ATEN_CPU_CAPABILITY pins torch's kernels to
# (stages.cpu_isa_environment: the same results on every machine).
_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"],
}


def flags() -> List[List[str]]:
    """The compiler flags to try, in turn.

    For the instruction set of ``ATEN_CPU_CAPABILITY`` when it is set, as
    torch's own kernels, so that the loops round alike on every machine;
    otherwise for this machine's CPU. Then for the architecture's baseline.
    """
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    first = _ISA_FLAGS.get(isa, []) if isa else ["-march=native"]
    return [[*_COMPILE, *first], _COMPILE]


class CompiledLoops:
    """The two loops of ``ctc_loops.c``, on CPU tensors.

    Arguments
    ---------
    library : ctypes.CDLL
        The built kernel.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions = {}
        for name, pointers in (("alpha_loop", 4), ("expected_prefix_sums", 5)):
            for dtype, suffix in ((torch.float32, "float"), (torch.float64, "double")):
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 2
                function.restype = None
                self._functions[name, dtype] = function

    @staticmethod
    def accepts(*tensors: torch.Tensor) -> bool:
        """Whether the kernel takes these tensors (CPU, all float32 or float64)."""
        dtype = tensors[0].dtype
        return dtype in (torch.float32, torch.float64) and all(
            t.device.type == "cpu" and t.dtype == dtype for t in tensors
        )

    def _call(self, name: str, inputs: Tuple[torch.Tensor, ...], *outputs) -> None:
        function = self._functions[name, inputs[0].dtype]
        tensors = [t.contiguous() for t in inputs] + list(outputs)
        function(*(t.data_ptr() for t in tensors), *outputs[0].shape)

    def alpha(
        self, emissions: torch.Tensor, skip: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """:func:`speechbrain_meta.ctc._alpha_loop`, in C."""
        alpha = torch.empty(emissions.shape, dtype=emissions.dtype)
        self._call("alpha_loop", (emissions, skip, start), alpha)
        return alpha

    def expected_prefix_sums(
        self, alpha: torch.Tensor, skip: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """:func:`speechbrain_meta.ctc._prefix_sum_loop`, in C.

        The transition weights of ``alpha``
        (:func:`speechbrain_meta.ctc._transition_weights`) are computed on
        the fly, never stored.
        """
        sums = torch.empty(values.shape, dtype=values.dtype)
        before = torch.empty(values.shape[1], dtype=values.dtype)
        self._call("expected_prefix_sums", (alpha, skip, values), sums, before)
        return sums


def compiler() -> Optional[str]:
    """The C compiler to build with: ``$CC``, else ``cc`` or ``gcc``, or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu() -> bytes:
    """What identifies this CPU's instruction set: its architecture and flags."""
    features = b""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            features = next(
                (line for line in info if line.startswith((b"flags", b"Features"))),
                b"",
            )
    except OSError:
        pass
    return platform.machine().encode() + features


def build(folder: Path) -> Optional[Path]:
    """The shared library of ``ctc_loops.c`` in ``folder``, built if missing.

    One file per version of the source, per CPU and per instruction set
    (:func:`flags`; a hash of all three in the name), written atomically, so
    processes building at once do not see half a file. None when no
    compiler is found or every build fails.
    """
    attempts = flags()
    key = hashlib.sha256(SOURCE.read_bytes() + repr(attempts).encode() + cpu())
    target = folder / f"ctc_loops-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built, objects = Path(scratch) / target.name, Path(scratch) / "loops.o"
        link = [*cc.split(), "-shared", str(objects), "-o", str(built), "-lm"]
        for attempt in attempts:
            compile_ = [*cc.split(), *attempt, str(SOURCE), "-o", str(objects)]
            try:
                for command in (compile_, link):
                    subprocess.run(command, check=True, capture_output=True, timeout=99)
            except (OSError, subprocess.SubprocessError):
                continue
            os.replace(built, target)
            return target
    return None


_LOADED = []


def loops() -> Optional[CompiledLoops]:
    """The compiled loops, built and loaded once per process; None if unavailable.

    Also None when the environment variable ``SPEECHBRAIN_META_CTC_KERNEL``
    is ``0`` (the tensor loops then run: to compare, or to rule the kernel
    out).
    """
    if os.environ.get(SWITCH) == "0":
        return None
    if not _LOADED:
        folder = os.environ.get("SPEECHBRAIN_META_CACHE")
        folder = Path(folder) if folder else Path.home() / ".cache/speechbrain_meta"
        try:  # an unwritable cache folder, a library that does not load
            library = build(folder)
            loaded = None if library is None else ctypes.CDLL(str(library))
            _LOADED.append(None if loaded is None else CompiledLoops(loaded))
        except (OSError, AttributeError):
            _LOADED.append(None)
    return _LOADED[0]

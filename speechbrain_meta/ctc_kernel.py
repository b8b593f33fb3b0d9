"""The CTC loss's log-likelihood and derivatives in C, for CPU tensors.

:mod:`speechbrain_meta.ctc_tensors` computes the log-likelihood, its gradient
and its Hessian-vector product with tensor operations: a few kernels per time
step, each a few microseconds of dispatch for a few thousand values, and
dozens more around the recursions. ``ctc_loops.c`` computes each of the
three in one call, sample by sample, on one thread, its loops over the
states vectorised. It is built on first use with the system's C compiler
(``$CC``, else ``cc`` or ``gcc``: the project's Debian packages include
one) into ``$SPEECHBRAIN_META_CACHE`` (default
``~/.cache/speechbrain_meta``), one file per source version, CPU and
instruction set (that of ``ATEN_CPU_CAPABILITY`` when set, as the
protocols' ``cpu_isa`` sets it, else this CPU's), and loaded with
``ctypes``. Where no compiler is found or the build fails, :func:`kernel`
returns None and the tensor operations run instead, as they do for CUDA
tensors and with ``SPEECHBRAIN_META_CTC_KERNEL=0``.

Example
-------
>>> import torch
>>> from speechbrain_meta.ctc_tensors import Targets, TensorLoops
>>> log_probs = torch.randn(6, 1, 3, dtype=torch.float64).log_softmax(-1)
>>> targets = Targets(
...     torch.tensor([[1, 2]]), torch.tensor([6]), torch.tensor([2]), blank=0
... )
>>> compiled = kernel()
>>> compiled is None or torch.allclose(
...     compiled.forward(log_probs, targets)[0],
...     TensorLoops.forward(log_probs, targets)[0],
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

__all__ = ["SWITCH", "CompiledCTC", "kernel"]

SOURCE = Path(__file__).with_name("ctc_loops.c")
# The environment variable that, set to 0, switches the kernel off.
SWITCH = "SPEECHBRAIN_META_CTC_KERNEL"
# Fast math (for the C library's vector exp and log) is safe in the loops,
# whose values are finite by construction, but without reassociation: the
# posteriors take large alphas and betas relative to their maxima before
# adding them, which reassociated would double the float32 error of the
# Hessian-vector products. The library is linked without fast math, since
# linking with it would switch on flush-to-zero for the whole process when
# it loads (GCC's crtfastmath.o).
_COMPILE = [
    *("-O3", "-std=c99", "-ffast-math", "-fno-associative-math", "-fopenmp-simd"),
    *("-fPIC", "-c"),
]
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


class CompiledCTC:
    """The CTC log-likelihood and its derivatives of ``ctc_loops.c``, on CPU tensors.

    Each method is one C call over the batch; the tensors between them
    (``saved``: the emissions, alphas, betas and skips, in the layout that
    ``ctc_loops.c`` describes) are opaque to the caller.

    Arguments
    ---------
    library : ctypes.CDLL
        The built kernel.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        targets = [pointer, integer, pointer, pointer]  # see _targets
        shape = [integer] * 5  # batch, frames, width, blank, classes
        signatures = {
            "ctc_forward": [pointer, *[integer] * 3, *targets, *shape, *[pointer] * 6],
            "ctc_gradient": [*[pointer] * 5, *targets, *shape, *[pointer] * 3],
            "ctc_hvp": [*[pointer] * 5, *[integer] * 3, pointer, *targets, *shape]
            + [pointer] * 3,
        }
        returns = {"ctc_forward": integer}
        self._functions = {}
        for name, argtypes in signatures.items():
            for dtype, suffix in ((torch.float32, "float"), (torch.float64, "double")):
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, returns.get(name)
                self._functions[name, dtype] = function

    @staticmethod
    def accepts(log_probs: torch.Tensor) -> bool:
        """Whether the kernel takes these log-probabilities (CPU, float32/64)."""
        return log_probs.device.type == "cpu" and log_probs.dtype in (
            torch.float32,
            torch.float64,
        )

    def forward(self, log_probs: torch.Tensor, targets) -> tuple:
        """Log-likelihoods, samples holding a NaN, ``saved``, and ``targets``.

        ``log_probs`` is ``(T, B, C)``, any strides; ``targets`` has the
        padded ``labels`` ``(B, S)``, ``input_lengths``, ``target_lengths``
        (int64, contiguous, on the CPU) and ``blank`` of
        :mod:`speechbrain_meta.ctc_tensors`.
        """
        frames, batch, classes = log_probs.shape
        width = 2 * targets.labels.shape[1] + 3
        dtype = log_probs.dtype
        emissions, alpha, beta = torch.empty(3, batch, frames, width, dtype=dtype)
        skip = torch.empty(batch, width, dtype=dtype)
        log_likelihood = torch.empty(batch, dtype=dtype)
        nan = torch.empty(batch, dtype=torch.bool)
        invalid = self._functions["ctc_forward", dtype](
            log_probs.data_ptr(),
            *log_probs.stride(),
            *self._targets(targets),
            batch,
            frames,
            width,
            targets.blank,
            classes,
            *(t.data_ptr() for t in (emissions, alpha, beta, skip)),
            log_likelihood.data_ptr(),
            nan.data_ptr(),
        )
        if invalid:
            raise ValueError(f"targets must be class indices below {classes}")
        return log_likelihood, nan, (emissions, alpha, beta, skip), targets

    def gradient(
        self,
        targets,
        saved: Tuple[torch.Tensor, ...],
        shape: torch.Size,
        log_likelihood: torch.Tensor,
        grad: torch.Tensor,
        keep_posterior: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``grad`` times d log-likelihood / d log_probs, and the posteriors.

        The gradient has ``shape``; the states' posteriors are None unless
        ``keep_posterior``.
        """
        emissions, alpha, beta, _ = saved
        batch, frames, width = emissions.shape
        gradient = torch.zeros(shape, dtype=emissions.dtype)
        posterior = torch.empty_like(emissions) if keep_posterior else None
        scratch = torch.empty(width, dtype=emissions.dtype)
        self._functions["ctc_gradient", emissions.dtype](
            *(t.data_ptr() for t in (emissions, alpha, beta, log_likelihood)),
            grad.to(emissions.dtype).contiguous().data_ptr(),
            *self._targets(targets),
            batch,
            frames,
            width,
            targets.blank,
            shape[2],
            gradient.data_ptr(),
            None if posterior is None else posterior.data_ptr(),
            scratch.data_ptr(),
        )
        return gradient, posterior

    def hvp(
        self,
        targets,
        saved: Tuple[torch.Tensor, ...],
        posterior: torch.Tensor,
        upstream: torch.Tensor,
        grad: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The Hessian-vector product times ``grad``, and ``E[U]`` per sample.

        ``upstream`` is the cotangent of the gradient, ``(T, B, C)``.
        """
        _, alpha, beta, skip = saved
        batch, frames, width = alpha.shape
        dtype = alpha.dtype
        upstream = upstream.to(dtype)
        hvp = torch.zeros(upstream.shape, dtype=dtype)
        expected = torch.empty(batch, dtype=dtype)
        scratch = torch.empty(2 * frames * width + 2 * width + 4, dtype=dtype)
        self._functions["ctc_hvp", dtype](
            *(t.data_ptr() for t in (alpha, beta, skip, posterior, upstream)),
            *upstream.stride(),
            grad.to(dtype).contiguous().data_ptr(),
            *self._targets(targets),
            batch,
            frames,
            width,
            targets.blank,
            upstream.shape[2],
            hvp.data_ptr(),
            expected.data_ptr(),
            scratch.data_ptr(),
        )
        return hvp, expected

    @staticmethod
    def _targets(targets) -> Tuple[int, ...]:
        """The labels' pointer and row stride, the lengths' pointers."""
        labels = targets.labels
        return (
            labels.data_ptr(),
            labels.stride(0),
            targets.input_lengths.data_ptr(),
            targets.target_lengths.data_ptr(),
        )


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


def kernel() -> Optional[CompiledCTC]:
    """The compiled kernel, built and loaded once per process; None if unavailable.

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
            _LOADED.append(None if loaded is None else CompiledCTC(loaded))
        except (OSError, AttributeError):
            _LOADED.append(None)
    return _LOADED[0]

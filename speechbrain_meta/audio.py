"""Reading audio files as 1-D float32 tensors at the model's sample rate.

:func:`read_audio` reads any format ``soundfile`` reads (wav, flac, ogg,
mp3...). A file with several channels is down-mixed to mono (the channel
mean) and a file at another rate is resampled with
``torchaudio.functional.resample``, unless ``convert=False``: then such a file
raises :class:`AudioFormatError`, a :class:`~speechbrain_meta.errors.SetupError`
that names the file and says what to do. :func:`audio_problem` says why a
signal that was read cannot be trained on (empty, non-finite, silent).

Example
-------
>>> import numpy as np
>>> import soundfile
>>> path = str(getfixture("tmp_path") / "stereo_8k.wav")
>>> stereo = np.stack([np.full(800, 0.5), np.full(800, -0.25)], axis=1)
>>> soundfile.write(path, stereo, 8000, subtype="PCM_16")
>>> signal = read_audio(path, sample_rate=16000)
>>> signal.shape, signal.dtype
(torch.Size([1600]), torch.float32)
>>> print(audio_problem(signal))
None
>>> try:
...     read_audio(path, sample_rate=16000, convert=False)
... except AudioFormatError as error:
...     print(str(error).replace(path, "stereo_8k.wav"))  # doctest: +ELLIPSIS
stereo_8k.wav is 8000 Hz with 2 channels, expected 16000 Hz mono: ...
>>> audio_problem(torch.zeros(100))
'silent (all samples are zero)'
"""

from __future__ import annotations

import os
import stat
from typing import Optional

import numpy as np
import soundfile
import torch

from speechbrain_meta.errors import SetupError

__all__ = ["AudioFormatError", "audio_problem", "file_problem", "read_audio"]


class AudioFormatError(SetupError):
    """An audio file that cannot be read, or not in the expected format."""


def _format(sample_rate: int, channels: int) -> str:
    """Describe a rate and a channel count, e.g. ``"8000 Hz with 2 channels"``."""
    if channels == 1:
        return f"{sample_rate} Hz mono"
    return f"{sample_rate} Hz with {channels} channels"


def _error_reason(error: Exception) -> str:
    """Return the short reason of a ``soundfile`` (libsndfile) error."""
    reason = getattr(error, "error_string", None)
    return str(reason or error).strip()


def file_problem(path: str) -> Optional[str]:
    """Return why ``path`` cannot be an audio file (missing, empty), else None.

    Only ``os.stat`` is called: a file that exists and is not empty may still
    be unreadable.

    Arguments
    ---------
    path : str
        The audio file.

    Returns
    -------
    str or None
        ``"no such file"``, ``"a directory, not a file"``,
        ``"empty file (0 bytes)"``, another access error, or None.

    Example
    -------
    >>> file_problem("/nonexistent/a.wav")
    'no such file'
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot access the file ({error.strerror or error})"
    except ValueError as error:  # e.g. a NUL character in the path
        return f"invalid path ({error})"
    if stat.S_ISDIR(status.st_mode):
        return "a directory, not a file"
    if status.st_size == 0:
        return "empty file (0 bytes)"
    return None


def read_audio(path: str, sample_rate: int, convert: bool = True) -> torch.Tensor:
    """Read an audio file as a 1-D float32 tensor at ``sample_rate``.

    Arguments
    ---------
    path : str
        The audio file, in any format ``soundfile`` reads (wav, flac, ogg,
        mp3...).
    sample_rate : int
        The rate the returned signal has, in Hz.
    convert : bool
        If True, a file with several channels is down-mixed to mono (the mean
        of its channels) and a file at another rate is resampled. If False,
        such a file raises :class:`AudioFormatError`.

    Returns
    -------
    torch.Tensor
        The samples, shape ``(frames,)``, dtype float32, in ``[-1, 1]`` for
        integer formats.

    Raises
    ------
    AudioFormatError
        If the file cannot be read (missing, empty, corrupt), or if
        ``convert`` is False and its rate or channel count differs.
    """
    failure = file_problem(path)
    if failure is not None:
        raise AudioFormatError(f"Cannot read the audio file {path}: {failure}.")
    try:
        with soundfile.SoundFile(path) as stream:
            rate, channels = stream.samplerate, stream.channels
            if not convert and (rate != sample_rate or channels != 1):
                raise AudioFormatError(
                    f"{path} is {_format(rate, channels)}, expected "
                    f"{_format(sample_rate, 1)}: set convert_audio: True in the "
                    "YAML file (or --convert_audio True) to convert it when "
                    "loading, or convert the file (e.g. with sox or ffmpeg)."
                )
            data = stream.read(dtype="float32", always_2d=True)
    except AudioFormatError:
        raise
    except Exception as error:  # libsndfile errors, and a few OSError/ValueError
        raise AudioFormatError(
            f"Cannot read the audio file {path}: {_error_reason(error)}"
        ) from error
    if channels == 1:
        samples = data[:, 0]
    else:
        samples = data.mean(axis=1, dtype=np.float32)
    signal = torch.from_numpy(np.ascontiguousarray(samples))
    if rate != sample_rate:
        import torchaudio.functional

        signal = torchaudio.functional.resample(signal, rate, sample_rate)
    return signal


def audio_problem(signal: torch.Tensor) -> Optional[str]:
    """Return why ``signal`` cannot be trained on, or None if it is usable.

    Arguments
    ---------
    signal : torch.Tensor
        The samples of one utterance, any shape.

    Returns
    -------
    str or None
        ``"empty"`` (no samples), ``"non-finite samples"`` (a NaN or an
        infinity anywhere), ``"silent (all samples are zero)"``, checked in
        this order, or None.

    Example
    -------
    >>> audio_problem(torch.tensor([0.0, float("nan")]))
    'non-finite samples'
    >>> audio_problem(torch.tensor([0.0, 0.1])) is None
    True
    """
    if signal.numel() == 0:
        return "empty"
    if not bool(torch.isfinite(signal).all()):
        return "non-finite samples"
    if not bool(signal.any()):
        return "silent (all samples are zero)"
    return None

r"""Checking SpeechBrain CSV manifests before training, all problems at once.

A manifest is a CSV file with a header, an ``ID`` column, ``duration`` (in
seconds), ``wav`` (an audio path, which may contain ``$data_root`` or another
``$variable`` replaced as ``speechbrain.dataio.dataio.load_data_csv`` does),
``wrd`` (the transcript) and a task column (``lang`` by default).

:func:`check_manifest` checks one file and returns a :class:`ManifestReport`
of every :class:`Problem` it found instead of stopping at the first: the file
(missing, not UTF-8, columns missing), and each row (wrong number of fields,
duplicate or empty ID, bad duration, empty task value or transcript, a
``$variable`` without replacement, and an audio file that is missing, empty,
unreadable, or at another rate or channel count). Audio files are checked from
their headers only (``os.stat`` and ``soundfile.info``, once per distinct
file, in a thread pool): 10,000 rows with 16 kHz wavs took 0.5-1 s on a
busy 2-core machine with a warm file cache, 100,000 rows 5-9 s.

:func:`check_manifests` checks the manifests of all splits and raises one
:class:`ManifestError` listing every problem, or, with ``skip_bad_rows=True``,
returns the IDs of the bad rows of each split; :func:`load_manifest_data` then
loads a manifest without them.

Example
-------
>>> import numpy as np
>>> import soundfile
>>> folder = getfixture("tmp_path")
>>> soundfile.write(folder / "a.wav", np.full(1600, 0.1), 16000, subtype="PCM_16")
>>> soundfile.write(folder / "b.wav", np.full(800, 0.1), 8000, subtype="PCM_16")
>>> _ = (folder / "train.csv").write_text(
...     "ID,duration,wav,lang,wrd\n"
...     "a,0.1,$data_root/a.wav,de,guten tag\n"
...     "b,0.1,$data_root/b.wav,de,hallo\n"
...     "c,-1,$data_root/c.wav,,\n"
... )
>>> report = check_manifest(
...     str(folder / "train.csv"), replacements={"data_root": str(folder)}
... )
>>> report.rows, sorted(report.bad_ids), report.conversions
(3, ['c'], {'8000 Hz -> 16000 Hz': 1})
>>> for problem in report.problems:
...     print(str(problem).replace(str(folder), "data"))
data/train.csv:4: c: duration -1 must be > 0
data/train.csv:4: c: empty lang value (the task)
data/train.csv:4: c: empty transcript
data/train.csv:4: c: audio file data/c.wav: no such file
>>> bad_ids = check_manifests(
...     {"train": str(folder / "train.csv")},
...     skip_bad_rows=True,
...     replacements={"data_root": str(folder)},
... )
>>> {split: sorted(ids) for split, ids in bad_ids.items()}
{'train': ['c']}
>>> data = load_manifest_data(
...     str(folder / "train.csv"),
...     replacements={"data_root": str(folder)},
...     skip_ids=bad_ids["train"],
... )
>>> list(data), data["a"]["duration"]
(['a', 'b'], 0.1)
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import soundfile
from tqdm import tqdm

from speechbrain_meta.audio import file_problem
from speechbrain_meta.errors import SetupError

__all__ = [
    "ManifestError",
    "ManifestReport",
    "Problem",
    "check_manifest",
    "check_manifests",
    "load_manifest_data",
]

logger = logging.getLogger(__name__)

MAX_LISTED = 50  # problems listed in a ManifestError message
PROGRESSBAR_MIN_ROWS = 500  # no progress bar for smaller manifests
_BATCH = 256  # audio files checked by one task of the thread pool
_VARIABLE = re.compile(r"\$([\w.]+)")  # as speechbrain.dataio.dataio.load_data_csv
_RATE_CONVERSION = re.compile(r"(\d+) Hz -> (\d+) Hz")
_CHANNEL_CONVERSION = re.compile(r"(\d+) channels -> mono")


@dataclass
class Problem:
    """One problem of a manifest: a whole-file problem, or one of a row.

    Arguments
    ---------
    csv : str
        The manifest's path, as given.
    line : int
        The 1-based line number of the row in the file (the header is line
        1), or 0 for a problem of the whole file.
    utt_id : str or None
        The row's ``ID``, or None (whole-file problems, rows without an ID).
    reason : str
        What is wrong.

    Example
    -------
    >>> print(Problem("train.csv", 3, "utt1", "empty transcript"))
    train.csv:3: utt1: empty transcript
    >>> print(Problem("train.csv", 0, None, "no such file"))
    train.csv: no such file
    """

    csv: str
    line: int
    utt_id: Optional[str]
    reason: str

    def __str__(self) -> str:
        where = self.csv if self.line == 0 else f"{self.csv}:{self.line}"
        if self.utt_id is None:
            return f"{where}: {self.reason}"
        return f"{where}: {self.utt_id}: {self.reason}"


class ManifestError(SetupError):
    """Problems found in one or more manifests, all listed in the message.

    The message lists every problem, one per line (the first
    :data:`MAX_LISTED` and a count of the rest if there are more), and, when
    some of them are row problems, ends by saying that ``--skip_bad_rows
    True`` skips the bad rows instead.

    Arguments
    ---------
    problems : sequence of Problem
        The problems, in the order to list them.

    Example
    -------
    >>> error = ManifestError([Problem("dev.csv", 2, "u1", "empty transcript")])
    >>> print(error)
    1 problem in the manifest dev.csv:
      dev.csv:2: u1: empty transcript
    To skip the bad rows instead of fixing them, set --skip_bad_rows True (YAML key skip_bad_rows).
    >>> error.problems[0].utt_id
    'u1'
    """  # noqa: E501

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__(_error_message(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems,))


def _error_message(problems: list[Problem]) -> str:
    """Return the message of a :class:`ManifestError` for ``problems``."""
    files = list(dict.fromkeys(problem.csv for problem in problems))
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    where = f"the manifest{'s' if len(files) != 1 else ''} {', '.join(files)}"
    lines = [f"{count} in {where}:"]
    lines += [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    if any(problem.line > 0 for problem in problems):
        lines.append(
            "To skip the bad rows instead of fixing them, set --skip_bad_rows "
            "True (YAML key skip_bad_rows)."
        )
    return "\n".join(lines)


@dataclass
class ManifestReport:
    """The result of checking one manifest with :func:`check_manifest`.

    Arguments
    ---------
    csv : str
        The manifest's path, as given.
    rows : int
        The number of data rows (blank lines are not rows).
    problems : list of Problem
        Every problem found, whole-file problems first, then row problems in
        file order.
    bad_ids : set of str
        The ``ID`` of every row that has a problem (``""`` for a row with an
        empty ID).
    conversions : dict of str to int
        How many rows without problems have audio that will be converted
        when loaded (``convert_audio=True``), per conversion, e.g.
        ``{"8000 Hz -> 16000 Hz": 12, "2 channels -> mono": 3}``.
    """

    csv: str
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_ids: set[str] = field(default_factory=set)
    conversions: dict[str, int] = field(default_factory=dict)

    @property
    def file_problems(self) -> list[Problem]:
        """The problems of the whole file (``line == 0``)."""
        return [problem for problem in self.problems if problem.line == 0]

    @property
    def row_problems(self) -> list[Problem]:
        """The problems of single rows (``line > 0``)."""
        return [problem for problem in self.problems if problem.line > 0]


def _read_text(path: str) -> tuple[Optional[str], Optional[str]]:
    """Return ``(text, None)`` of a UTF-8 file, or ``(None, reason)``."""
    failure = file_problem(path)
    if failure is not None:
        return None, failure
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        return None, f"cannot read the file ({error.strerror or error})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        byte = data[error.start : error.start + 1].hex()
        return None, (
            f"not valid UTF-8 at line {line} (byte 0x{byte}): save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )


def _replace(value: str, replacements: Mapping[str, object]) -> str:
    """Replace the ``$variables`` of ``value``; KeyError if one is not given."""
    if "$" not in value:
        return value
    return _VARIABLE.sub(lambda match: str(replacements[match[1]]), value)


def _probe(path: str) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """Return ``((rate, channels), None)`` of an audio file, or ``(None, why)``."""
    failure = file_problem(path)
    if failure is not None:
        return None, failure
    try:
        info = soundfile.info(path)
    except Exception as error:  # libsndfile errors, and a few OSError/ValueError
        reason = getattr(error, "error_string", None) or error
        return None, f"unreadable audio header ({str(reason).strip()})"
    if info.frames == 0:
        return None, "no samples"
    return (info.samplerate, info.channels), None


def _probe_batch(
    paths: list[str],
) -> list[tuple[Optional[tuple[int, int]], Optional[str]]]:
    """:func:`_probe` each path of ``paths``."""
    return [_probe(path) for path in paths]


def _probe_all(
    paths: list[str], max_workers: int, progressbar: bool, desc: str
) -> dict[str, tuple[Optional[tuple[int, int]], Optional[str]]]:
    """:func:`_probe` every path, in a thread pool, with a progress bar."""
    batches = [paths[i : i + _BATCH] for i in range(0, len(paths), _BATCH)]
    results = {}
    bar = tqdm(total=len(paths), desc=desc, unit="file", disable=not progressbar)
    with bar, concurrent.futures.ThreadPoolExecutor(max(1, max_workers)) as executor:
        futures = {executor.submit(_probe_batch, batch): batch for batch in batches}
        for future in concurrent.futures.as_completed(futures):
            batch = futures[future]
            results.update(zip(batch, future.result()))
            bar.update(len(batch))
    return results


def _numbered_rows(reader) -> Iterator[tuple[int, int, list[str]]]:
    """Yield ``(first_line, last_line, fields)`` of each non-blank CSV row."""
    first = 1
    for fields in reader:
        last = reader.line_num
        if fields:  # csv.DictReader (and so SpeechBrain) skips blank lines
            yield first, last, fields
        first = last + 1


def check_manifest(
    path: str,
    *,
    task_key: Optional[str] = "lang",
    required: Sequence[str] = ("ID", "duration", "wav", "wrd"),
    replacements: Optional[Mapping[str, object]] = None,
    sample_rate: int = 16000,
    convert_audio: bool = True,
    max_workers: int = 8,
    progressbar: bool = True,
) -> ManifestReport:
    """Check one manifest and its audio headers, collecting every problem.

    If the file is missing, not UTF-8, not parsable as CSV, or lacks a
    required column, the report holds that whole-file problem (``line ==
    0``) and no row is checked. Otherwise each row is checked for: a number
    of fields other than the header's, a line break in a field (the row spans
    several lines, usually because a quote was left open), an empty or
    duplicate ``ID``, a
    ``duration`` that is not a finite number > 0, an empty task value, an
    empty transcript (``wrd``), a ``$variable`` that ``replacements`` lacks
    (in any column but ``ID``), and an audio file (``wav``) that is missing,
    empty, unreadable or without samples. An audio file at a rate other than
    ``sample_rate`` or with several channels is a problem if
    ``convert_audio`` is False, else it is counted in
    :attr:`ManifestReport.conversions`. Audio is never decoded: only
    ``os.stat`` and ``soundfile.info`` are called, once per distinct file.

    Arguments
    ---------
    path : str
        The CSV manifest.
    task_key : str or None
        The task column (e.g. ``"lang"``), required and checked non-empty;
        None for none.
    required : sequence of str
        The other required columns (``ID`` is always required).
        ``duration`` and ``wav`` are checked only if they are in the header,
        ``wrd`` only if it is required.
    replacements : mapping of str to object, optional
        The values of the ``$variables`` in the CSV, e.g.
        ``{"data_root": "/data/corpus"}``, as for ``load_data_csv``.
    sample_rate : int
        The sample rate the audio is trained at, in Hz.
    convert_audio : bool
        Whether the audio is resampled and down-mixed when loaded
        (see :func:`speechbrain_meta.audio.read_audio`).
    max_workers : int
        Threads reading audio headers.
    progressbar : bool
        Show a progress bar while reading audio headers (never for fewer
        than 500 rows).

    Returns
    -------
    ManifestReport
        The number of rows, the problems, the IDs of the bad rows and the
        counts of audio conversions.
    """
    replacements = {} if replacements is None else replacements
    report = ManifestReport(csv=path)
    text, failure = _read_text(path)
    if failure is not None:
        report.problems.append(Problem(path, 0, None, failure))
        return report
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        rows = list(_numbered_rows(reader))
    except csv.Error as error:
        reason = f"not a valid CSV file (line {reader.line_num}: {error})"
        report.problems.append(Problem(path, 0, None, reason))
        return report
    if not rows:
        report.problems.append(Problem(path, 0, None, "empty file (no header)"))
        return report
    (_, header_end, header), rows = rows[0], rows[1:]
    task = [task_key] if task_key else []
    wanted = list(dict.fromkeys(["ID", *required, *task]))  # ID: always needed
    missing = [name for name in wanted if name not in header]
    if missing:
        columns = ", ".join(repr(name) for name in missing)
        reason = (
            f"missing column{'s' if len(missing) > 1 else ''} {columns}; "
            f"the header (line {header_end}) has the columns {header}"
        )
        if header[0].startswith("\ufeff"):
            reason += " (the file starts with a byte-order mark: save it without)"
        report.problems.append(Problem(path, 0, None, reason))
        return report

    report.rows = len(rows)
    column = {name: position for position, name in enumerate(header)}
    row_problems = []  # (line, ID or "", reason)
    first_line_of = {}  # ID -> line of its first row
    audio_rows = {}  # audio path -> [(line, ID), ...]
    for first, last, fields in rows:
        utt_id = fields[column["ID"]] if column["ID"] < len(fields) else ""
        if len(fields) != len(header) or last > first:
            reasons = []
            if last > first:  # a quoted line break: usually a quote left open
                reasons.append(
                    f"a field has a line break (the row spans lines {first}-{last}: "
                    "an unclosed quote?)"
                )
            if len(fields) != len(header):
                reasons.append(f"{len(fields)} fields, the header has {len(header)}")
            row_problems.append((first, utt_id, "; ".join(reasons)))
            continue
        utt_id = fields[column["ID"]]
        problems = []
        if not utt_id:
            problems.append("empty ID")
        elif utt_id in first_line_of:
            problems.append(f"duplicate ID (first on line {first_line_of[utt_id]})")
        else:
            first_line_of[utt_id] = first
        values = {}
        for name, value in zip(header, fields):
            try:
                values[name] = value if name == "ID" else _replace(value, replacements)
            except KeyError as error:
                given = ", ".join(sorted(replacements)) or "none"
                problems.append(
                    f"{name} {value!r} needs a value for ${error.args[0]}, which "
                    f"was not given (replacements given: {given})"
                )
                values[name] = None
        duration = values.get("duration")
        if duration is not None:
            try:
                seconds = float(duration)
            except ValueError:
                problems.append(f"duration {duration!r} is not a number")
            else:
                if not math.isfinite(seconds):
                    problems.append(f"duration {duration} is not finite")
                elif seconds <= 0:
                    problems.append(f"duration {duration} must be > 0")
        if task_key and not fields[column[task_key]].strip():
            problems.append(f"empty {task_key} value (the task)")
        if "wrd" in wanted and not fields[column["wrd"]].strip():
            problems.append("empty transcript")
        wav = values.get("wav")
        if wav is not None:
            if wav.strip():
                audio_rows.setdefault(wav, []).append((first, utt_id))
            else:
                problems.append("empty wav path")
        row_problems += [(first, utt_id, reason) for reason in problems]

    progressbar = progressbar and report.rows >= PROGRESSBAR_MIN_ROWS
    desc = f"Checking the audio of {os.path.basename(path)}"
    probes = _probe_all(list(audio_rows), max_workers, progressbar, desc)
    converted_rows = []  # (ID, conversion)
    for wav, uses in audio_rows.items():
        audio_format, failure = probes[wav]
        reasons = []
        converted = []
        if failure is not None:
            reasons.append(f"audio file {wav}: {failure}")
        else:
            rate, channels = audio_format
            if rate != sample_rate:
                converted.append(f"{rate} Hz -> {sample_rate} Hz")
                reasons.append(
                    f"audio file {wav}: {rate} Hz, expected {sample_rate} Hz "
                    "(set convert_audio: True to resample)"
                )
            if channels != 1:
                converted.append(f"{channels} channels -> mono")
                reasons.append(
                    f"audio file {wav}: {channels} channels, expected mono "
                    "(set convert_audio: True to down-mix)"
                )
            if convert_audio:
                converted_rows += [(i, c) for _, i in uses for c in converted]
                reasons = []
        for line, utt_id in uses:
            row_problems += [(line, utt_id, reason) for reason in reasons]

    row_problems.sort(key=lambda problem: problem[0])  # stable: file order
    for line, utt_id, reason in row_problems:
        report.problems.append(Problem(path, line, utt_id or None, reason))
        report.bad_ids.add(utt_id)
    conversions = Counter(c for i, c in converted_rows if i not in report.bad_ids)
    report.conversions = dict(conversions)
    return report


def _describe_conversions(conversions: Mapping[str, int]) -> str:
    """Describe ``ManifestReport.conversions`` in words."""
    parts = []
    for conversion, count in conversions.items():
        rows = f"{count} row{'s' if count != 1 else ''}"
        rate = _RATE_CONVERSION.fullmatch(conversion)
        channels = _CHANNEL_CONVERSION.fullmatch(conversion)
        if rate:
            parts.append(f"{rows} resampled from {rate[1]} Hz to {rate[2]} Hz")
        elif channels:
            parts.append(f"{rows} down-mixed from {channels[1]} channels to mono")
        else:
            parts.append(f"{rows} converted ({conversion})")
    return " and ".join(parts) if len(parts) <= 2 else ", ".join(parts)


def check_manifests(
    paths: Mapping[str, str | Sequence[str]],
    *,
    skip_bad_rows: bool = False,
    without_task_column: Collection[str] = (),
    **options,
) -> dict[str, set[str]]:
    """Check the manifests of several splits; raise or return the bad rows.

    Each distinct file is checked once with :func:`check_manifest`. A
    whole-file problem in any of them raises a :class:`ManifestError` that
    lists all the whole-file problems of all the files (and all their row
    problems, unless ``skip_bad_rows``). Row problems raise it too, unless
    ``skip_bad_rows`` is True: then one warning per file says how many
    rows are skipped and why (the first few reasons), and the IDs of the bad
    rows are returned, for the caller to leave out (e.g. with
    :func:`load_manifest_data`). Audio that will be converted when loaded is
    reported in one warning per file.

    Arguments
    ---------
    paths : mapping of str to str or sequence of str
        The manifest (or manifests) of each split, e.g. ``{"train":
        "train.csv", ...}``.
    skip_bad_rows : bool
        Return the IDs of the bad rows instead of raising for them.
    without_task_column : collection of str
        Manifests whose task is given elsewhere (a mapping from task to
        file, :mod:`speechbrain_meta.task_manifests`): checked without the
        ``task_key`` column.
    **options : dict
        Keyword arguments of :func:`check_manifest` (``task_key``,
        ``replacements``, ``sample_rate``, ``convert_audio``...).

    Returns
    -------
    dict of str to set of str
        The IDs of the bad rows of each split (empty sets when all is well).

    Raises
    ------
    ManifestError
        For whole-file problems, and for row problems unless
        ``skip_bad_rows``.
    """
    files = {
        split: [value] if isinstance(value, str) else list(value)
        for split, value in paths.items()
    }
    untasked = {os.path.realpath(path) for path in without_task_column}
    reports = {}  # real path -> report
    for path in (path for split_files in files.values() for path in split_files):
        key = os.path.realpath(path)
        if key not in reports:
            own = {"task_key": None} if key in untasked else {}
            reports[key] = check_manifest(path, **{**options, **own})
    file_problems = [p for report in reports.values() for p in report.file_problems]
    row_problems = [p for report in reports.values() for p in report.row_problems]
    if file_problems or (row_problems and not skip_bad_rows):
        raise ManifestError(file_problems + ([] if skip_bad_rows else row_problems))
    for report in reports.values():
        if report.conversions:
            logger.warning(
                "%s: audio converted when loaded (convert_audio: True): %s.",
                report.csv,
                _describe_conversions(report.conversions),
            )
        if report.bad_ids:
            problems = report.row_problems
            listed = [
                f"line {str(problem)[len(report.csv) + 1 :]}" for problem in problems
            ]
            if len(listed) > 3:
                listed[3:] = [f"... and {len(listed) - 3} more problems"]
            logger.warning(
                "%s: skipping %d of %d rows with problems (skip_bad_rows: True): %s",
                report.csv,
                len({problem.line for problem in problems}),
                report.rows,
                "; ".join(listed),
            )
    return {
        split: {
            i for path in split_files for i in reports[os.path.realpath(path)].bad_ids
        }
        for split, split_files in files.items()
    }


def load_manifest_data(
    path: str,
    *,
    replacements: Optional[Mapping[str, object]] = None,
    skip_ids: Collection[str] = (),
) -> dict[str, dict]:
    """Load a manifest as ``load_data_csv`` does, leaving out the rows of ``skip_ids``.

    ``DynamicItemDataset.from_csv`` stops at a duplicate ID, a bad duration,
    a row with the wrong number of fields or a ``$variable`` without
    replacement; this function leaves the rows with those IDs out first, so
    that ``DynamicItemDataset(load_manifest_data(path, ...))`` loads the
    manifest without the bad rows found by :func:`check_manifests`.

    Arguments
    ---------
    path : str
        The CSV manifest.
    replacements : mapping of str to object, optional
        The values of the ``$variables`` in the CSV.
    skip_ids : collection of str
        The IDs of the rows to leave out (every row with such an ID).

    Returns
    -------
    dict of str to dict
        The data of each kept row, keyed by ID, with ``$variables`` replaced
        and ``duration`` as a float, as ``load_data_csv`` returns it.
    """
    replacements = {} if replacements is None else replacements
    skip_ids = set(skip_ids)
    data = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream, skipinitialspace=True):
            utt_id = row.pop("ID")
            if utt_id in skip_ids:
                continue
            if utt_id in data:
                raise ValueError(f"Duplicate id: {utt_id}")
            row = {key: _replace(value, replacements) for key, value in row.items()}
            if "duration" in row:
                row["duration"] = float(row["duration"])
            data[utt_id] = row
    return data

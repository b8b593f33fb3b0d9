"""Tests of speechbrain_meta.manifest_check and speechbrain_meta.audio."""

import logging
import os
import pickle

import numpy as np
import pytest
import soundfile
import torch

from speechbrain_meta.audio import (
    AudioFormatError,
    audio_problem,
    file_problem,
    read_audio,
)
from speechbrain_meta.errors import SetupError
from speechbrain_meta.manifest_check import (
    ManifestError,
    ManifestReport,
    Problem,
    check_manifest,
    check_manifests,
    load_manifest_data,
)

HEADER = ("ID", "duration", "wav", "spk_id", "lang", "wrd")


def write_wav(path, rate=16000, channels=1, frames=1600):
    """Write a sine wave (16-bit PCM) and return its path as a string."""
    time = np.arange(frames) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * time)
    data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1)
    soundfile.write(str(path), data, rate, subtype="PCM_16")
    return str(path)


def row(utt_id, wav, duration="0.1", lang="de", wrd="guten tag", spk="s1"):
    return [utt_id, duration, wav, spk, lang, wrd]


def write_csv(path, rows, header=HEADER):
    lines = [",".join(header)] + [",".join(fields) for fields in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def good(tmp_path):
    """A good manifest of three rows with 16 kHz mono wavs."""
    rows = [row(f"u{i}", write_wav(tmp_path / f"u{i}.wav")) for i in range(3)]
    return write_csv(tmp_path / "train.csv", rows)


def reasons(report):
    return [
        (problem.line, problem.utt_id, problem.reason) for problem in report.problems
    ]


def check(path, **options):
    return check_manifest(path, progressbar=False, **options)


# --- check_manifest: the whole file -------------------------------------------


def test_good_manifest_has_no_problems(good):
    report = check(good)
    assert isinstance(report, ManifestReport)
    assert report.csv == good
    assert report.rows == 3
    assert report.problems == []
    assert report.bad_ids == set()
    assert report.conversions == {}


def test_missing_manifest(tmp_path):
    path = str(tmp_path / "nope.csv")
    report = check(path)
    assert reasons(report) == [(0, None, "no such file")]
    assert str(report.problems[0]) == f"{path}: no such file"


def test_manifest_is_a_directory(tmp_path):
    report = check(str(tmp_path))
    assert reasons(report) == [(0, None, "a directory, not a file")]


def test_empty_manifest(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert reasons(check(str(path))) == [(0, None, "empty file (0 bytes)")]
    path.write_bytes(b"\n\n")
    assert reasons(check(str(path))) == [(0, None, "empty file (no header)")]


def test_header_only_manifest_has_no_rows(tmp_path):
    report = check(write_csv(tmp_path / "train.csv", []))
    assert (report.rows, report.problems) == (0, [])


def test_non_utf8_manifest_names_the_file_and_line(tmp_path, good):
    path = tmp_path / "latin1.csv"
    text = open(good, encoding="utf-8").read().splitlines()
    text[2] = text[2].replace("guten tag", "café")
    path.write_bytes("\n".join(text).encode("latin-1"))
    report = check(str(path))
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert (problem.line, problem.utt_id) == (0, None)
    assert "not valid UTF-8 at line 3" in problem.reason
    assert "0xe9" in problem.reason
    with pytest.raises(ManifestError) as caught:
        check_manifests({"train": str(path)})
    message = str(caught.value)
    assert str(path) in message and "line 3" in message
    assert "skip_bad_rows" not in message  # skipping rows would not help


@pytest.mark.parametrize("column", ["wrd", "lang"])
def test_missing_column_names_it_and_lists_the_columns(tmp_path, column):
    header = [name for name in HEADER if name != column]
    rows = [
        [value for name, value in zip(HEADER, row("u0", "x.wav")) if name != column]
    ]
    path = write_csv(tmp_path / "train.csv", rows, header=header)
    report = check(path)
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.line == 0
    assert f"missing column '{column}'" in problem.reason
    assert str(header) in problem.reason  # the columns the file has
    assert report.rows == 0  # rows are not checked
    with pytest.raises(ManifestError) as caught:
        check_manifests({"train": path})
    message = str(caught.value)
    assert path in message and repr(column) in message
    assert all(repr(name) in message for name in header)


def test_missing_columns_of_a_custom_task_key(tmp_path, good):
    report = check(good, task_key="accent", required=("ID", "wav", "text"))
    (problem,) = report.problems
    assert "missing columns 'text', 'accent'" in problem.reason


def test_byte_order_mark_is_explained(tmp_path, good):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + open(good, "rb").read())
    (problem,) = check(str(path)).problems
    assert "missing column 'ID'" in problem.reason
    assert "byte-order mark" in problem.reason


# --- check_manifest: rows -----------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "reason"),
    [
        ("abc", "duration 'abc' is not a number"),
        ("", "duration '' is not a number"),
        ("-1.5", "duration -1.5 must be > 0"),
        ("0", "duration 0 must be > 0"),
        ("nan", "duration nan is not finite"),
        ("inf", "duration inf is not finite"),
    ],
)
def test_bad_duration(tmp_path, duration, reason):
    wav = write_wav(tmp_path / "a.wav")
    rows = [row("ok", wav), row("bad", wav, duration=duration)]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert reasons(report) == [(3, "bad", reason)]
    assert report.bad_ids == {"bad"}


def test_duplicate_id(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    rows = [row("u0", wav), row("u1", wav), row("u0", wav)]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert reasons(report) == [(4, "u0", "duplicate ID (first on line 2)")]
    assert report.bad_ids == {"u0"}


def test_empty_id(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    report = check(write_csv(tmp_path / "train.csv", [row("", wav)]))
    assert reasons(report) == [(2, None, "empty ID")]
    assert report.bad_ids == {""}


@pytest.mark.parametrize("wrd", ["", "   "])
def test_empty_transcript(tmp_path, wrd):
    wav = write_wav(tmp_path / "a.wav")
    rows = [row("u0", wav), row("u1", wav, wrd=wrd)]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert reasons(report) == [(3, "u1", "empty transcript")]


@pytest.mark.parametrize("lang", ["", "  "])
def test_empty_task_value(tmp_path, lang):
    wav = write_wav(tmp_path / "a.wav")
    report = check(write_csv(tmp_path / "train.csv", [row("u0", wav, lang=lang)]))
    assert reasons(report) == [(2, "u0", "empty lang value (the task)")]


def test_wrong_number_of_fields(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    rows = [row("u0", wav), row("u1", wav) + ["extra"], row("u2", wav)[:4]]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert reasons(report) == [
        (3, "u1", "7 fields, the header has 6"),
        (4, "u2", "4 fields, the header has 6"),
    ]
    assert report.bad_ids == {"u1", "u2"}


def test_unclosed_quote_is_reported_at_the_row_start(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    path = tmp_path / "train.csv"
    lines = [",".join(HEADER), ",".join(row("u0", wav))]
    lines += [f'u1,0.1,{wav},s1,de,"guten tag', ",".join(row("u2", wav))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (problem,) = check(str(path)).problems
    assert (problem.line, problem.utt_id) == (3, "u1")
    assert problem.reason == (
        "a field has a line break (the row spans lines 3-4: an unclosed quote?)"
    )
    (tmp_path / "ragged.csv").write_text(
        "\n".join([*lines[:2], f'u1,0.1,"{wav},s1', "de,x", *lines[3:]]) + "\n"
    )
    (problem,) = check(str(tmp_path / "ragged.csv")).problems
    assert problem.reason == (  # the quote swallows the rest of the file
        "a field has a line break (the row spans lines 3-5: an unclosed quote?); "
        "3 fields, the header has 6"
    )
    assert (problem.line, problem.utt_id) == (3, "u1")


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    path = tmp_path / "train.csv"
    good_row, bad_row = ",".join(row("u0", wav)), ",".join(row("u1", wav, wrd=""))
    path.write_text(f"{','.join(HEADER)}\n\n{good_row}\n\n{bad_row}\n", "utf-8")
    report = check(str(path))
    assert report.rows == 2
    assert reasons(report) == [(5, "u1", "empty transcript")]


def test_all_problems_of_a_row_are_listed(tmp_path):
    rows = [row("u0", str(tmp_path / "missing.wav"), duration="x", lang="", wrd="")]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert [reason for _, _, reason in reasons(report)] == [
        "duration 'x' is not a number",
        "empty lang value (the task)",
        "empty transcript",
        f"audio file {tmp_path / 'missing.wav'}: no such file",
    ]
    assert report.bad_ids == {"u0"}


# --- check_manifest: audio ----------------------------------------------------


def test_missing_wav(tmp_path):
    wav = str(tmp_path / "missing.wav")
    report = check(write_csv(tmp_path / "train.csv", [row("u0", wav)]))
    assert reasons(report) == [(2, "u0", f"audio file {wav}: no such file")]


def test_empty_wav_path(tmp_path):
    report = check(write_csv(tmp_path / "train.csv", [row("u0", "")]))
    assert reasons(report) == [(2, "u0", "empty wav path")]


def test_zero_byte_wav(tmp_path):
    wav = tmp_path / "empty.wav"
    wav.write_bytes(b"")
    report = check(write_csv(tmp_path / "train.csv", [row("u0", str(wav))]))
    assert reasons(report) == [(2, "u0", f"audio file {wav}: empty file (0 bytes)")]


def test_corrupt_wav(tmp_path):
    wav = tmp_path / "corrupt.wav"
    wav.write_bytes(np.random.default_rng(0).bytes(2000))
    report = check(write_csv(tmp_path / "train.csv", [row("u0", str(wav))]))
    ((line, utt_id, reason),) = reasons(report)
    assert (line, utt_id) == (2, "u0")
    assert reason.startswith(f"audio file {wav}: unreadable audio header (")


def test_wav_without_samples(tmp_path):
    wav = write_wav(tmp_path / "a.wav", frames=0)
    report = check(write_csv(tmp_path / "train.csv", [row("u0", wav)]))
    assert reasons(report) == [(2, "u0", f"audio file {wav}: no samples")]


def test_other_rate_and_stereo_are_problems_without_conversion(tmp_path):
    low = write_wav(tmp_path / "low.wav", rate=8000, frames=800)
    stereo = write_wav(tmp_path / "stereo.wav", channels=2)
    good = write_wav(tmp_path / "good.wav")
    rows = [row("low", low), row("stereo", stereo), row("good", good)]
    report = check(write_csv(tmp_path / "train.csv", rows), convert_audio=False)
    assert reasons(report) == [
        (
            2,
            "low",
            f"audio file {low}: 8000 Hz, expected 16000 Hz "
            "(set convert_audio: True to resample)",
        ),
        (
            3,
            "stereo",
            f"audio file {stereo}: 2 channels, expected mono "
            "(set convert_audio: True to down-mix)",
        ),
    ]
    assert report.bad_ids == {"low", "stereo"}
    assert report.conversions == {}


def test_conversions_are_counted_and_logged(tmp_path, caplog):
    low = write_wav(tmp_path / "low.wav", rate=8000, frames=800)
    both = write_wav(tmp_path / "both.wav", rate=8000, channels=2, frames=800)
    stereo = write_wav(tmp_path / "stereo.wav", channels=2)
    rows = [row("a", low), row("b", low), row("c", both), row("d", stereo)]
    rows.append(row("e", write_wav(tmp_path / "good.wav")))
    path = write_csv(tmp_path / "train.csv", rows)
    report = check(path)
    assert report.problems == []
    assert report.conversions == {"8000 Hz -> 16000 Hz": 3, "2 channels -> mono": 2}
    with caplog.at_level(logging.WARNING, logger="speechbrain_meta.manifest_check"):
        assert check_manifests({"train": path}, progressbar=False) == {"train": set()}
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith(f"{path}: audio converted when loaded")
    assert "3 rows resampled from 8000 Hz to 16000 Hz" in message
    assert "2 rows down-mixed from 2 channels to mono" in message


def test_conversions_count_only_rows_without_problems(tmp_path):
    low = write_wav(tmp_path / "low.wav", rate=8000, frames=800)
    rows = [row("a", low), row("b", low, wrd=""), row("c", low)]
    report = check(write_csv(tmp_path / "train.csv", rows))
    assert report.conversions == {"8000 Hz -> 16000 Hz": 2}
    assert report.bad_ids == {"b"}


def test_each_audio_file_is_read_once(tmp_path, monkeypatch):
    wav = write_wav(tmp_path / "a.wav")
    calls = []
    info = soundfile.info
    monkeypatch.setattr(
        soundfile, "info", lambda path: calls.append(path) or info(path)
    )
    rows = [row(f"u{i}", wav) for i in range(5)]
    assert check(write_csv(tmp_path / "train.csv", rows)).problems == []
    assert calls == [wav]


def test_many_rows_with_progressbar_and_threads(tmp_path):
    wavs = [write_wav(tmp_path / f"{i}.wav", frames=160) for i in range(20)]
    rows = [row(f"u{i}", wavs[i % 20]) for i in range(600)]
    rows[599] = row("u599", str(tmp_path / "gone.wav"))
    path = write_csv(tmp_path / "train.csv", rows)
    report = check_manifest(path, max_workers=4, progressbar=True)
    assert report.rows == 600
    assert report.bad_ids == {"u599"}


def test_data_root_replacement(tmp_path):
    (tmp_path / "wav").mkdir()
    write_wav(tmp_path / "wav" / "a.wav")
    rows = [row("u0", "$data_root/wav/a.wav"), row("u1", "$data_root/wav/b.wav")]
    path = write_csv(tmp_path / "train.csv", rows)
    report = check(path, replacements={"data_root": tmp_path})
    missing = tmp_path / "wav" / "b.wav"
    assert reasons(report) == [(3, "u1", f"audio file {missing}: no such file")]


def test_missing_replacement(tmp_path):
    rows = [row("u0", "$data_root/a.wav"), row("u1", "$data_root/a.wav", wrd="$5")]
    report = check(write_csv(tmp_path / "train.csv", rows), replacements={})
    assert [(line, utt_id) for line, utt_id, _ in reasons(report)] == [
        (2, "u0"),
        (3, "u1"),
        (3, "u1"),
    ]
    assert "wav '$data_root/a.wav' needs a value for $data_root" in str(
        report.problems[0]
    )
    assert "wrd '$5' needs a value for $5" in str(report.problems[2])


# --- Problem, ManifestError ---------------------------------------------------


def test_problem_str():
    assert str(Problem("a.csv", 3, "u1", "empty transcript")) == (
        "a.csv:3: u1: empty transcript"
    )
    assert str(Problem("a.csv", 3, None, "empty ID")) == "a.csv:3: empty ID"
    assert str(Problem("a.csv", 0, None, "no such file")) == "a.csv: no such file"


def test_manifest_error_truncates_after_50_problems():
    problems = [Problem("a.csv", i + 2, f"u{i}", "empty transcript") for i in range(57)]
    error = ManifestError(problems)
    assert isinstance(error, SetupError) and isinstance(error, ValueError)
    assert error.problems == problems
    lines = str(error).splitlines()
    assert lines[0] == "57 problems in the manifest a.csv:"
    assert lines[1].strip() == "a.csv:2: u0: empty transcript"
    assert lines[50].strip() == "a.csv:51: u49: empty transcript"
    assert lines[51].strip() == "... and 7 more"
    assert "u50" not in str(error)
    assert "--skip_bad_rows True" in lines[-1] and "skip_bad_rows" in lines[-1]
    assert len(lines) == 53


def test_manifest_error_pickles():
    error = ManifestError([Problem("a.csv", 0, None, "no such file")])
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.problems == error.problems


# --- check_manifests ----------------------------------------------------------


def test_check_manifests_lists_the_problems_of_two_files_at_once(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    train = write_csv(
        tmp_path / "train.csv", [row("t0", wav, duration="abc"), row("t1", wav, wrd="")]
    )
    dev = write_csv(tmp_path / "dev.csv", [row("d0", wav), row("d0", wav)])
    test = str(tmp_path / "missing_test.csv")
    with pytest.raises(ManifestError) as caught:
        check_manifests({"train": train, "dev": dev, "test": test}, progressbar=False)
    message = str(caught.value)
    assert caught.value.problems[0] == Problem(test, 0, None, "no such file")
    assert len(caught.value.problems) == 4
    for expected in (
        f"{test}: no such file",
        f"{train}:2: t0: duration 'abc' is not a number",
        f"{train}:3: t1: empty transcript",
        f"{dev}:3: d0: duplicate ID (first on line 2)",
    ):
        assert expected in message
    assert "skip_bad_rows" in message


def test_check_manifests_row_problems_only(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    train = write_csv(tmp_path / "train.csv", [row("t0", wav, wrd="")])
    dev = write_csv(tmp_path / "dev.csv", [row("d0", wav, lang="")])
    with pytest.raises(ManifestError) as caught:
        check_manifests({"train": train, "dev": dev}, progressbar=False)
    message = str(caught.value)
    assert message.startswith(f"2 problems in the manifests {train}, {dev}:")
    assert "empty transcript" in message and "empty lang value" in message
    assert message.splitlines()[-1] == (
        "To skip the bad rows instead of fixing them, set --skip_bad_rows True "
        "(YAML key skip_bad_rows)."
    )


def test_skip_bad_rows_returns_the_bad_ids(tmp_path, caplog):
    wav = write_wav(tmp_path / "a.wav")
    rows = [
        row("ok0", wav),
        row("dur", wav, duration="-1"),
        row("txt", wav, wrd=""),
        row("ok1", wav),
        row("gone", str(tmp_path / "gone.wav")),
        row("lang", wav, lang=""),
    ]
    train = write_csv(tmp_path / "train.csv", rows)
    dev = write_csv(tmp_path / "dev.csv", [row("d0", wav)])
    with caplog.at_level(logging.WARNING, logger="speechbrain_meta.manifest_check"):
        bad = check_manifests(
            {"train": train, "dev": dev}, skip_bad_rows=True, progressbar=False
        )
    assert bad == {"train": {"dur", "txt", "gone", "lang"}, "dev": set()}
    (record,) = caplog.records  # one warning, for train.csv only
    message = record.getMessage()
    assert message.startswith(f"{train}: skipping 4 of 6 rows with problems")
    assert "line 3: dur: duration -1 must be > 0; line 4: txt: empty" in message
    assert "... and 1 more problems" in message
    data = load_manifest_data(train, skip_ids=bad["train"])
    assert list(data) == ["ok0", "ok1"]
    assert data["ok0"] == {
        "duration": 0.1,
        "wav": wav,
        "spk_id": "s1",
        "lang": "de",
        "wrd": "guten tag",
    }


def test_skip_bad_rows_still_raises_for_whole_file_problems(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    train = write_csv(tmp_path / "train.csv", [row("t0", wav, wrd="")])
    dev = str(tmp_path / "dev.csv")
    with pytest.raises(ManifestError) as caught:
        check_manifests({"train": train, "dev": dev}, skip_bad_rows=True)
    assert caught.value.problems == [Problem(dev, 0, None, "no such file")]


def test_same_manifest_is_checked_once(tmp_path, good, monkeypatch):
    import speechbrain_meta.manifest_check as manifest_check

    checked = []
    real = manifest_check.check_manifest
    monkeypatch.setattr(
        manifest_check,
        "check_manifest",
        lambda path, **options: checked.append(path) or real(path, **options),
    )
    same = os.path.join(os.path.dirname(good), ".", os.path.basename(good))
    bad = check_manifests({"train": good, "dev": same, "test": good}, progressbar=False)
    assert bad == {"train": set(), "dev": set(), "test": set()}
    assert checked == [good]


def test_skipped_ids_load_into_a_dataset(tmp_path):
    from speechbrain.dataio.dataset import DynamicItemDataset

    wav = write_wav(tmp_path / "a.wav")
    rows = [row("u0", "$data_root/a.wav"), row("u0", "$data_root/a.wav")]
    rows += [row("u1", "$data_root/a.wav", duration="x"), row("u2", "$data_root/a.wav")]
    rows.append(row("u3", "$data_root/a.wav")[:3])
    path = write_csv(tmp_path / "train.csv", rows)
    replacements = {"data_root": str(tmp_path)}
    bad = check_manifests(
        {"train": path}, skip_bad_rows=True, replacements=replacements
    )
    assert bad == {"train": {"u0", "u1", "u3"}}
    data = load_manifest_data(path, replacements=replacements, skip_ids=bad["train"])
    dataset = DynamicItemDataset(data)
    assert dataset.data_ids == ["u2"]
    assert dataset.data["u2"]["wav"] == wav


# --- audio ----------------------------------------------------------------------


def test_read_audio_good_file(tmp_path):
    path = write_wav(tmp_path / "a.wav")
    signal = read_audio(path, 16000, convert=False)
    expected, _ = soundfile.read(path, dtype="float32")
    assert signal.dtype == torch.float32 and signal.shape == (1600,)
    assert torch.equal(signal, torch.from_numpy(expected))


def test_read_audio_converts_8k_stereo(tmp_path):
    path = write_wav(tmp_path / "stereo_8k.wav", rate=8000, channels=2, frames=8001)
    data, _ = soundfile.read(path, dtype="float32")
    signal = read_audio(path, 16000)
    assert signal.dtype == torch.float32 and signal.dim() == 1
    assert abs(signal.numel() - 16002) <= 1
    # The down-mix is the channel mean: a low tone survives resampling as is.
    expected = torch.from_numpy(data.mean(axis=1))
    assert torch.allclose(signal[100:-100:2], expected[50:-50], atol=2e-3)
    same_rate = read_audio(
        write_wav(tmp_path / "stereo_16k.wav", channels=2), 16000, convert=True
    )
    data16, _ = soundfile.read(str(tmp_path / "stereo_16k.wav"), dtype="float32")
    assert torch.allclose(same_rate, torch.from_numpy(data16.mean(axis=1)))


@pytest.mark.parametrize(
    ("rate", "channels", "described"),
    [(8000, 1, "8000 Hz mono"), (16000, 2, "16000 Hz with 2 channels")],
)
def test_read_audio_without_conversion_names_the_file(
    tmp_path, rate, channels, described
):
    path = write_wav(tmp_path / "odd.wav", rate=rate, channels=channels)
    with pytest.raises(AudioFormatError) as caught:
        read_audio(path, 16000, convert=False)
    message = str(caught.value)
    assert isinstance(caught.value, SetupError)
    assert message.startswith(f"{path} is {described}, expected 16000 Hz mono")
    assert "convert_audio: True" in message and "--convert_audio True" in message


def test_read_audio_missing_empty_and_corrupt_files(tmp_path):
    missing = str(tmp_path / "missing.wav")
    with pytest.raises(AudioFormatError, match="missing.wav: no such file"):
        read_audio(missing, 16000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioFormatError, match="empty.wav: empty file"):
        read_audio(str(empty), 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(AudioFormatError) as caught:
        read_audio(str(corrupt), 16000)
    assert str(caught.value).startswith(f"Cannot read the audio file {corrupt}: ")
    assert len(str(caught.value)) > len(f"Cannot read the audio file {corrupt}: ")


def test_read_audio_flac(tmp_path):
    path = str(tmp_path / "a.flac")
    soundfile.write(path, np.full(1000, 0.25), 16000)
    signal = read_audio(path, 16000)
    assert signal.shape == (1000,) and abs(float(signal[0]) - 0.25) < 1e-3


def test_file_problem(tmp_path):
    assert file_problem(str(tmp_path / "no.wav")) == "no such file"
    assert file_problem(str(tmp_path)) == "a directory, not a file"
    assert file_problem(write_wav(tmp_path / "a.wav")) is None


def test_audio_problem():
    assert audio_problem(torch.zeros(0)) == "empty"
    assert audio_problem(torch.zeros(100)) == "silent (all samples are zero)"
    signal = torch.full((100,), 0.1)
    assert audio_problem(signal) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = signal.clone()
        broken[50] = bad
        assert audio_problem(broken) == "non-finite samples"
    assert audio_problem(torch.full((3,), float("nan"))) == "non-finite samples"
    assert audio_problem(torch.zeros(2, 0)) == "empty"


def test_prepared_corpus_manifests_pass(tiny_corpus):
    paths = {split: tiny_corpus[split] for split in ("train", "dev", "test")}
    bad = check_manifests(
        paths,
        replacements={"data_root": tiny_corpus["data_folder"]},
        convert_audio=False,
        progressbar=False,
    )
    assert bad == {"train": set(), "dev": set(), "test": set()}

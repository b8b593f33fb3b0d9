"""benchmarks/gpu_check.py without a GPU: it refuses clearly, its plan fits in
8 minutes with valid arguments, and its CPU fallback writes the report."""

import sys

import pytest
import torch

from benchmarks import bench_meta_step, bench_peers
from benchmarks import gpu_check as check


@pytest.fixture
def gpu_check():
    return check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_stops_at_once_and_says_why(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not out.exists()


def test_gpu_plan_fits_in_8_minutes_with_valid_arguments(gpu_check, tmp_path):
    args = gpu_check.parse_args([])
    steps = gpu_check.plan(args, str(tmp_path))
    assert [s.name for s in steps] == ["tests", "meta_step", "peers", "ctc", "ssl"]
    assert sum(s.limit for s in steps) <= 8 * 60 - 20  # start-up and report
    assert all("--device" in s.command and "cuda" in s.command for s in steps[1:])
    assert "cuda" in steps[0].command
    for step, parse in (
        (steps[1], bench_meta_step.parse_args),
        (steps[2], bench_peers.parse_args),
    ):
        parsed = parse(step.command[2:])  # the YAMLs of the overrides exist too
        assert parsed.device == "cuda" and parsed.tasks == 4
    assert any("rnn_size=512" in part for part in steps[1].command)


def test_cpu_fallback_writes_the_report(gpu_check, tmp_path):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--device", "cpu", "--only", "ctc", "--out", str(out)]) == 0
    report = out.read_text()
    assert report.startswith("# GPU check (CPU, tiny sizes, torch ")
    assert "## ctc: exit status 0" in report
    assert "| 2 | 20 | 5 | 6 |" in report  # bench_ctc's row of the tiny size


def test_a_failing_step_is_reported_and_the_others_still_run(gpu_check, tmp_path):
    python = [sys.executable, "-c"]
    steps = [
        gpu_check.Step("bad", [*python, "raise SystemExit(3)"], 10, None),
        gpu_check.Step("slow", [*python, "import time; time.sleep(5)"], 1, None),
        gpu_check.Step("good", [*python, "print('fine')"], 10, None),
    ]
    sections = [gpu_check.run_step(step) for step in steps]
    assert sections[0][0].startswith("## bad: FAILED, exit status 3")
    assert sections[1][0].startswith("## slow: FAILED, TIMED OUT after 1 s")
    assert sections[2][0].startswith("## good: exit status 0")
    assert "fine" in sections[2]

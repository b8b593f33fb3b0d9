"""Smoke test of the meta-step benchmark: smallest settings, real models."""

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("maml", "fomaml", "reptile", "multitask")


@pytest.fixture(scope="module")
def bench():
    path = REPO_ROOT / "benchmarks" / "bench_meta_step.py"
    spec = importlib.util.spec_from_file_location("bench_meta_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(report: str, header: str) -> list[dict]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_parse_spec_reads_overrides(bench):
    assert bench.parse_spec("h/maml_attention.yaml:decoder_type=rnn,d_model=64") == (
        "h/maml_attention.yaml",
        {"decoder_type": "rnn", "d_model": 64},
    )
    assert bench.parse_spec("h/maml_ctc.yaml") == ("h/maml_ctc.yaml", {})
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_spec("h/maml_ctc.yaml:decoder_type")


def test_maml_slope_fits_a_line(bench):
    intercept, slope, worst = bench.maml_slope([(1, 3.0), (2, 5.0), (4, 9.0)])
    assert (intercept, slope, worst) == pytest.approx((1.0, 2.0, 0.0))
    assert bench.maml_slope([(1, 1.0), (2, 2.0), (4, 8.0)])[2] > 0.1


def test_benchmark_reports_every_algorithm(bench, tiny_corpus, tmp_path):
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--data_folder", tiny_corpus["data_folder"],
                "--hparams", *(str(REPO_ROOT / f"hparams/{a}_ctc.yaml") for a in NAMES),
                "--steps", "1", "--tasks", "2", "--support", "1", "--query", "1",
                "--repeats", "1", "--warmup", "0", "--ctc_repeats", "1",
                "--threads", "1", "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    rows = {r["algorithm"]: r for r in table_rows(report, "| model | algorithm")}
    assert set(rows) == {"MAML", "FOMAML", "Reptile", "MultiTask"}
    assert {r["model"] for r in rows.values()} == {"ctc"}
    assert [rows[a]["fwd/bwd per task"] for a in ("MAML", "FOMAML", "Reptile")] == [
        "2",
        "2",
        "1",
    ]
    for row in rows.values():
        ms, plain = float(row["ms / step"]), float(row["plain ms"])
        assert ms > 0 and plain > 0
        assert float(row["x plain"]) == pytest.approx(ms / plain, rel=0.05, abs=0.01)
    # Second order keeps the inner step's graph and its double backward.
    assert float(rows["MAML"]["peak MiB"]) > 2 * float(rows["FOMAML"]["peak MiB"])
    assert float(rows["MAML"]["x FOMAML"]) > 1
    (ctc,) = table_rows(report, "| model | native")
    assert float(ctc["native fwd+bwd ms"]) > 0
    assert "- MAML within 2.5x of FOMAML at k = 1 (ctc):" in report


def test_benchmark_compares_partial_inner_loops_with_the_whole_model(
    bench, tiny_corpus, tmp_path
):
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--data_folder", tiny_corpus["data_folder"],
                "--hparams", str(REPO_ROOT / "hparams/fomaml_ctc.yaml"),
                str(REPO_ROOT / "hparams/maml_anil_ctc.yaml"),
                str(REPO_ROOT / "hparams/maml_lora_ctc.yaml"),
                "--steps", "1", "--tasks", "2", "--support", "1", "--query", "1",
                "--repeats", "1", "--warmup", "0", "--ctc_repeats", "1",
                "--threads", "1", "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    rows = table_rows(report, "| model | algorithm")
    assert {(r["model"], r["algorithm"]) for r in rows} == {
        ("ctc", "FOMAML"), ("anil_ctc", "MAML"), ("lora_ctc", "MAML"),
    }  # fmt: skip
    for model in ("anil_ctc", "lora_ctc"):
        assert re.search(
            rf"- Second-order {model} within 1.5x the peak memory of first-order "
            r"whole-model training \(ctc FOMAML\) at k = 1: (met|MISSED) \(\d",
            report,
        ), report
    assert "anil_ctc 0.89 M (0.041 M fast weights)" in report


def test_timings_pair_runs_of_each_round_and_reverse_every_other(bench):
    calls = []
    runs = {
        name: (
            lambda name=name, seconds=seconds: calls.append(name) or time.sleep(seconds)
        )
        for name, seconds in (("short", 0.01), ("long", 0.03))
    }
    timings = bench.Timings(runs, repeats=3, warmup=1, device="cpu")
    # warm-up, then the rounds: forward, backward, forward
    assert calls == ["short", "long"] * 2 + ["long", "short"] + ["short", "long"]
    assert timings.ms("long") >= 30
    assert 2 < timings.ratio("long", "short") < 4


def test_peak_memory_counts_the_frees_of_what_the_last_call_left(bench):
    """A step that replaces a 4 MiB tensor it left before, through a 4 MiB
    temporary: 4 MiB above the start (the old tensor freed first), every call,
    as CUDA's allocator counts it; not 8 (the free of a block allocated
    before a memory profiler was on does not count in the profiler)."""
    floats = 2**20  # 4 MiB
    kept = {"x": torch.zeros(floats)}

    def replace():
        kept["x"] = None
        temporary = torch.ones(floats)
        kept["x"] = temporary + 1

    peaks = [bench.peak_memory(replace, "cpu") for _ in range(3)]
    assert len(set(peaks)) == 1
    assert peaks[0] == pytest.approx(4 * floats, abs=1024)  # and a few small blocks


def test_the_ctc_benchmark_times_the_tensor_loops_beside_the_kernel(tmp_path):
    path = REPO_ROOT / "benchmarks" / "bench_ctc.py"
    spec = importlib.util.spec_from_file_location("bench_ctc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ctc.md"
    module.main(["--sizes", "2,20,5", "--repeats", "2", "--warmup", "1",
                 "--tensor_loops", "--out", str(out)])  # fmt: skip
    (row,) = table_rows(out.read_text(), "| B |")
    assert row["second order, tensor loops"] and float(row["second order"]) > 0
    assert float(row["second order, tensor loops"]) > 0
    assert module.SWITCH not in __import__("os").environ  # switched back

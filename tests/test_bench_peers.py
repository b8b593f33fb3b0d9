"""The peer benchmark on tiny models: its table, and the fairness check that every
installed peer computes our meta-gradient on the same episode."""

from pathlib import Path

import pytest
import torch
from test_benchmarks import table_rows

from benchmarks import bench_peers

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    f"{REPO_ROOT}/hparams/maml_ctc.yaml:cnn_channels=16,rnn_size=16",
    f"{REPO_ROOT}/hparams/maml_attention.yaml:d_model=32,nhead=2,d_ffn=64",
]
# What a peer cannot do (said in the table instead of a time).
CANNOT = {
    ("torchopt MetaSGD", "FOMAML"): "MetaSGD always differentiates its steps",
    # Our CTC loss is an autograd.Function without setup_context.
    ("torch.func.grad", "MAML"): "must override the setup_context staticmethod",
}


@pytest.fixture(scope="module")
def bench():
    return bench_peers


@pytest.fixture(scope="module")
def report(bench, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "peers.md"
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--data_folder", tiny_corpus["data_folder"], "--hparams", *TINY,
                "--steps", "2", "--tasks", "1", "--support", "1", "--query", "1",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out.read_text()


def rows_of(report, peer):
    return [
        row
        for row in table_rows(report, "| model | algorithm")
        if row["implementation"] == peer
    ]


def test_table_has_every_row_and_ours_is_the_reference(bench, report):
    rows = table_rows(report, "| model | algorithm")
    expected = {
        (model, algorithm, k, peer.name)
        for model in ("ctc cnn_channels=16 rnn_size=16",
                      "attention/transformer d_model=32 nhead=2 d_ffn=64")
        for algorithm in ("MAML", "FOMAML")
        for k in ("2",)
        for peer in bench.PEERS
    }  # fmt: skip
    assert {
        (r["model"], r["algorithm"], r["k"], r["implementation"]) for r in rows
    } == expected
    for row in rows_of(report, bench.OURS):
        assert float(row["ms / meta-step"]) > 0 and float(row["peak MiB"]) > 0
        assert (row["x ours"], row["x ours (memory)"]) == ("1.00", "1.00")
        assert row["same gradient"] == "yes (0.0e+00)"
    assert "- Our time at most every peer's on every row: " in report
    assert "- Our peak memory at most every peer's on every row: " in report


@pytest.mark.parametrize(
    "peer",
    ["higher", "torchopt", "torchopt MetaSGD", "torch.func", "torch.func.grad",
     bench_peers.CONTROL],
)  # fmt: skip
def test_peer_meta_gradient_equals_ours(bench, report, peer):
    rows = rows_of(report, peer)
    assert len(rows) == 4
    module = {p.name: p.module for p in bench.PEERS}[peer]
    reason = bench.missing(module)
    if reason is not None:
        assert all(r["same gradient"] == reason for r in rows)
        pytest.skip(f"{module} {reason}: pip install -e '.[bench]'")
    for row in rows:
        cannot = CANNOT.get((peer, row["algorithm"]))
        if cannot is not None:
            assert row["same gradient"].startswith("failed: ")
            assert cannot in row["same gradient"]
            continue
        same, difference = row["same gradient"].split()
        assert same == "yes" and float(difference.strip("()")) <= 1e-6, row
        assert float(row["x ours"]) > 0 and float(row["x ours (memory)"]) > 0


def test_learn2learn_is_reported_never_hidden(bench, report):
    rows = rows_of(report, "learn2learn")
    assert len(rows) == 4
    reason = bench.missing("learn2learn")
    if reason is None:
        assert all(r["same gradient"].startswith("yes") for r in rows)
    else:
        assert all(r["same gradient"] == reason for r in rows)
        assert "not importable" in reason


def test_meta_gradients_are_allclose_on_the_same_episode(bench, tiny_corpus, tmp_path):
    """The fairness check itself, without the table: allclose, tensor by tensor."""
    args = bench.parse_args(
        ["--data_folder", tiny_corpus["data_folder"], "--tasks", "2", "--support", "1",
         "--query", "1"]
    )  # fmt: skip
    hparams = bench.benchmark_hparams(TINY[0], args, str(tmp_path))
    brain, data = bench.build_brain(hparams, hparams["brain_class"], "cpu")
    episode = bench.first_episode(brain, hparams, data, "cpu")
    for first_order in (False, True):
        ours, *peers = (
            bench.gradient(brain, bench.meta_step(brain, episode, 2, first_order, p, 7))
            for p in bench.PEERS
            if p.name in ("speechbrain-meta", "torch.func")
        )
        assert any(g.abs().max() > 0 for g in ours)
        for grads in peers:
            for g, reference in zip(grads, ours):
                torch.testing.assert_close(g, reference, rtol=1e-5, atol=1e-7)


def test_a_peer_is_faster_only_where_a_sign_test_says_so(bench):
    """Peer A is faster in 10 of 10 rounds (MISSED), B in 6 of 10 with a lower
    median (within noise), C never; the control passes the same test (a false
    alarm, reported as such); memory: B is one KiB below ours."""
    row = ("ctc", "MAML", 1)
    ours, a, b, c, control = (
        (*row, name) for name in (bench.OURS, "A", "B", "C", bench.CONTROL)
    )
    timings = bench.Timings({}, repeats=0, warmup=0, device="cpu")
    timings.rounds = [
        {ours: 1.0, a: 0.9, b: 0.95 if index < 6 else 1.01, c: 1.2, control: 0.9}
        for index in range(10)
    ]
    rows = [
        bench.Row(*key, step=print, note="0.0e+00") for key in (ours, a, b, c, control)
    ]
    mib = {ours: 10.0, a: 10.0, b: 10.0 - 1 / 1024, c: 11.0, control: 10.0}
    time, memory = bench.verdicts(rows, timings, mib)
    assert time.startswith(
        "- Our time at most every peer's on every row: MISSED where a peer is "
        "faster: ctc MAML 1 A (0.90x, 10/10 rounds) (a peer is faster where a sign "
        "test over the 10 rounds gives p < 0.05). Below 1.00x within noise: "
        "ctc MAML 1 B (0.95x, 6/10 rounds). Ours against itself (the control): "
        "0.90-0.90x, faster than ours by the sign test on ctc MAML 1 (10/10 rounds)."
    ), time
    assert memory == (
        "- Our peak memory at most every peer's on every row: MISSED where a peer "
        "is below ours: ctc MAML 1 B (1.00x, 1.0 KiB less)."
    )
    table = "\n".join(bench.table(rows, timings, mib))
    assert "| ctc | MAML | 1 | A | 900 | 0.90 | 10/10 | 10.0 | 1.00 | yes" in table
    assert bench.sign_test(10, 10) < 0.05 < bench.sign_test(6, 10)


def test_pairs_the_sign_test_flags_are_timed_again_and_count_only_if_confirmed(bench):
    """A and the control are flagged in the screening rounds (10/10), B is
    not (6/10): only A, the control and ours run again; A is faster again
    (MISSED, confirmed), the control is not (a false alarm not confirmed)."""
    row = ("ctc", "MAML", 1)
    names = (bench.OURS, "A", "B", bench.CONTROL)
    ours, a, b, control = ((*row, name) for name in names)
    calls = []
    rows = [
        bench.Row(*key, step=lambda key=key: calls.append(key), note="0.0e+00")
        for key in (ours, a, b, control)
    ]
    timings = bench.Timings({}, repeats=0, warmup=0, device="cpu")
    timings.rounds = [
        {ours: 1.0, a: 0.9, b: 0.95 if index < 6 else 1.01, control: 0.9}
        for index in range(10)
    ]
    confirmation = bench.retime_faster(rows, timings, repeats=3, warmup=1, device="cpu")
    assert sorted(set(calls)) == sorted([ours, a, control])
    assert len(confirmation.rounds) == 3
    assert set(confirmation.rounds[0]) == {ours, a, control}
    confirmation.rounds = [
        {ours: 1.0, a: 0.9, control: 1.1 if index < 5 else 0.9} for index in range(10)
    ]
    time, _ = bench.verdicts(rows, timings, {key: 1.0 for key in (ours, a, b, control)},
                             confirmation)  # fmt: skip
    assert time == (
        "- Our time at most every peer's on every row: MISSED where a peer is "
        "faster: ctc MAML 1 A (0.90x, 10/10 rounds, confirmed: 10/10 fresh rounds) "
        "(a peer is faster where a sign test over the 10 rounds gives p < 0.05, and "
        "again over fresh rounds of the pairs it flags). Below 1.00x within noise: "
        "ctc MAML 1 B (0.95x, 6/10 rounds). Ours against itself (the control): "
        "0.90-0.90x, faster than ours by the sign test on ctc MAML 1 (10/10 rounds, "
        "not confirmed: 5/10 fresh rounds)."
    ), time
    timings.rounds = [{ours: 1.0, a: 1.1, b: 1.0, control: 1.0}] * 10
    assert bench.retime_faster(rows, timings, 3, 1, "cpu") is None

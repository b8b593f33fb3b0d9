"""Word n-gram models (speechbrain_meta.ngram) and CTC beam search with them."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechbrain_meta.decoding import CTCDecoder
from speechbrain_meta.errors import SetupError
from speechbrain_meta.ngram import EOS, UNK, KneserNey, task_sentences, write_arpa

REPO = Path(__file__).resolve().parents[1]
TEXT = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "the cat ate the fish",
    "a dog ate the cat",
    "on the mat sat a cat",
] * 3


def kenlm_or_skip():
    return pytest.importorskip(
        "kenlm", reason="kenlm is not installed (pip install -e '.[lm]')"
    )


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_after_every_context_sum_to_one(order):
    model = KneserNey(TEXT, order)
    contexts = [(), ("<s>",), ("the",), ("the", "cat"), ("sat", "on", "the"), ("zz",)]
    for context in contexts:
        total = sum(10 ** model.log10_prob(w, context) for w in model.vocabulary)
        assert total == pytest.approx(1.0, abs=1e-9), context
    assert model.log10_prob("unseen") == model.log10_prob(UNK)


def test_kenlm_reads_the_arpa_with_the_same_probabilities(tmp_path):
    kenlm = kenlm_or_skip()
    path = tmp_path / "lm.arpa"
    model = write_arpa(TEXT, str(path), order=3)
    lm = kenlm.Model(str(path))
    assert lm.order == 3
    for context in [("the",), ("the", "cat"), ("on", "the"), ("fish",)]:
        state = kenlm.State()
        lm.NullContextWrite(state)
        for word in context:
            following = kenlm.State()
            lm.BaseScore(state, word, following)
            state = following
        scores = {w: lm.BaseScore(state, w, kenlm.State()) for w in model.vocabulary}
        assert sum(10**s for s in scores.values()) == pytest.approx(1.0, abs=1e-4)
        for word, score in scores.items():
            assert score == pytest.approx(model.log10_prob(word, context), abs=1e-5)
    # The training text is far more likely than the same words shuffled.
    text = " ".join(TEXT[:6])
    words = text.split()
    random.Random(0).shuffle(words)
    assert lm.perplexity(text) < 0.5 * lm.perplexity(" ".join(words))


def test_the_command_builds_the_targets_lm_from_its_transcripts(tiny_corpus, tmp_path):
    out = tmp_path / "lm" / "cs.arpa"
    result = subprocess.run(
        [sys.executable, "-m", "speechbrain_meta.ngram", "--order", "2",
         "--train_csv", tiny_corpus["train"], "--task", "cs", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sentences = task_sentences(tiny_corpus["train"], "cs")
    assert len(sentences) == 8
    assert f"{out}: 8 sentences" in result.stdout
    arpa = out.read_text(encoding="utf-8")
    assert arpa.startswith("\\data\\\nngram 1=") and "\\2-grams:" in arpa
    for word in sentences[0].split():
        assert f"\t{word}\t" in arpa
    with pytest.raises(SetupError, match=r"No 'xx' row .*its tasks: \['bg', 'cs', "):
        task_sentences(tiny_corpus["train"], "xx")


def test_beam_search_with_the_lm_prefers_its_words(tmp_path):
    """Acoustically 'cat' and 'cot' tie; the LM of TEXT picks 'cat'."""
    kenlm_or_skip()
    path = tmp_path / "lm.arpa"
    write_arpa(TEXT, str(path), order=2)
    labels = ["<blank>", " ", "a", "c", "o", "t", "h", "e"]
    frames = [["t"], ["h"], ["e"], [" "], ["c"], ["a", "o"], ["t"]]
    probs = torch.full((1, len(frames), len(labels)), 1e-4)
    for i, options in enumerate(frames):
        for label in options:
            probs[0, i, labels.index(label)] = 1 / len(options)
    log_probs = probs.log().log_softmax(-1)
    lens = torch.ones(1)
    greedy = CTCDecoder(labels, 0)(log_probs, lens)
    assert greedy == [["the", "cat"]]  # the first of a tie
    log_probs[0, 5, labels.index("o")] += 1e-3  # 'o' wins by a hair
    assert CTCDecoder(labels, 0)(log_probs, lens) == [["the", "cot"]]
    for kind in ("beam", "prefix_beam"):
        plain = CTCDecoder(labels, 0, kind=kind, beam_size=8)
        assert plain(log_probs, lens) == [["the", "cot"]]
        with_lm = CTCDecoder(
            labels, 0, kind=kind, beam_size=8, kenlm_model_path=str(path)
        )
        assert with_lm(log_probs, lens) == [["the", "cat"]], kind
    assert EOS not in labels


def test_unknown_decoder_and_lm_without_beam_are_refused():
    with pytest.raises(SetupError, match="ctc_decoder must be one of"):
        CTCDecoder(["<blank>"], 0, kind="viterbi")
    with pytest.raises(SetupError, match="needs a beam search"):
        CTCDecoder(["<blank>"], 0, kenlm_model_path="lm.arpa")

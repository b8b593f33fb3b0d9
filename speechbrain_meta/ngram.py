r"""Word n-gram language models in ARPA format, for CTC beam search with KenLM.

KenLM's ARPA builder (``lmplz``) is not on PyPI, and the pure-Python builders
there did not fit (``arpabo`` 0.3.0 writes a header line and space-separated
fields that KenLM refuses). This module estimates an **interpolated modified
Kneser-Ney** model (Chen & Goodman 1998, the smoothing of ``lmplz``) and
writes it as an ARPA file that ``kenlm.Model`` loads:

* the highest order uses the n-gram counts, the lower orders continuation
  counts (the number of distinct words seen before), except n-grams starting
  with ``<s>``, which keep their counts;
* each order has three discounts, ``D1``, ``D2`` and ``D3+``, from its counts
  of counts; on data too small to estimate them (a count of counts is zero,
  or a discount falls outside its range) they fall back to 0.5, 1 and 1.5, as
  ``lmplz --discount_fallback`` does;
* unigrams are interpolated with the uniform distribution over the
  vocabulary, ``</s>`` and ``<unk>`` included, so every word has a probability.

The probabilities of the words after any context sum to 1 (``tests/test_ngram.py``
checks it through KenLM). Sentences are split at white space, one per line, as
``normalize_text`` writes transcripts.

Command line (the transcripts of one task of a manifest, normalised as in
training)::

    python -m speechbrain_meta.ngram --train_csv data/embedded/train.csv \
        --task cs --order 3 --output results/lm/cs_3gram.arpa

Example
-------
>>> model = KneserNey(["a b", "a b a", "b a"], order=2)
>>> round(sum(10 ** model.log10_prob(w, ("a",)) for w in model.vocabulary), 6)
1.0
>>> model.log10_prob("b", ("a",)) > model.log10_prob("a", ("a",))
True
>>> print(model.arpa().splitlines()[1])
ngram 1=5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from speechbrain_meta.errors import SetupError
from speechbrain_meta.experiment import run_script
from speechbrain_meta.task_manifests import load_task_manifests, task_manifests

__all__ = ["KneserNey", "main", "task_sentences", "write_arpa"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

Gram = Tuple[str, ...]


def _discounts(counts: Iterable[int]) -> Tuple[float, float, float]:
    """Modified Kneser-Ney discounts ``D1, D2, D3+`` from counts of counts."""
    n = Counter(min(count, 4) for count in counts)
    if min(n[1], n[2], n[3], n[4]) == 0:
        return FALLBACK_DISCOUNTS
    y = n[1] / (n[1] + 2 * n[2])
    discounts = (
        1 - 2 * y * n[2] / n[1],
        2 - 3 * y * n[3] / n[2],
        3 - 4 * y * n[4] / n[3],
    )
    if not all(0 < d < k for k, d in enumerate(discounts, start=1)):
        return FALLBACK_DISCOUNTS
    return discounts


class KneserNey:
    """An interpolated modified Kneser-Ney word n-gram model.

    Arguments
    ---------
    sentences : iterable of str
        The training text, one sentence a string, words separated by white
        space; empty sentences are skipped.
    order : int
        The n-gram order (3: trigrams).

    Raises
    ------
    ValueError
        If ``order`` is below 1 or there is no word in ``sentences``.
    """

    def __init__(self, sentences: Iterable[str], order: int = 3):
        if order < 1:
            raise ValueError(f"The n-gram order must be at least 1, not {order}.")
        self.order = order
        raw: Counter = Counter()
        for sentence in sentences:
            words = sentence.split()
            if not words:
                continue
            padded = (BOS, *words, EOS)
            for n in range(1, order + 1):
                for start in range(len(padded) - n + 1):
                    raw[padded[start : start + n]] += 1
        if not raw:
            raise ValueError("No word to estimate an n-gram model from.")
        self.vocabulary = sorted({g[0] for g in raw if len(g) == 1} - {BOS, UNK})
        self.vocabulary.append(UNK)
        # Adjusted counts: continuation counts below the highest order.
        counts: Dict[Gram, int] = {}
        left_words: Dict[Gram, int] = Counter(g[1:] for g in raw if len(g) > 1)
        for gram, count in raw.items():
            if gram == (BOS,):
                continue
            highest = len(gram) == order or gram[0] == BOS
            counts[gram] = count if highest else left_words[gram]
        self.counts = counts
        self.discounts = {
            n: _discounts(c for g, c in counts.items() if len(g) == n)
            for n in range(1, order + 1)
        }
        # Per context: total count and discounted mass (its backoff weight).
        totals: Dict[Gram, float] = defaultdict(float)
        mass: Dict[Gram, float] = defaultdict(float)
        for gram, count in counts.items():
            totals[gram[:-1]] += count
            mass[gram[:-1]] += self.discounts[len(gram)][min(count, 3) - 1]
        self.totals, self.gammas = totals, {h: mass[h] / totals[h] for h in totals}

    def log10_prob(self, word: str, context: Gram = ()) -> float:
        """The log10 probability of ``word`` after ``context`` (last words kept).

        Arguments
        ---------
        word : str
            A word; one outside the vocabulary is ``<unk>``.
        context : tuple of str
            The preceding words, ``<s>`` first at a sentence start.

        Returns
        -------
        float
        """
        if word not in self.vocabulary and word != EOS:
            word = UNK
        context = tuple(context)
        return math.log10(
            self._prob(word, context[max(0, len(context) + 1 - self.order) :])
        )

    def _prob(self, word: str, context: Gram) -> float:
        if not context:
            lower = 1 / len(self.vocabulary)
        else:
            lower = self._prob(word, context[1:])
        if context not in self.totals:
            return lower
        count = self.counts.get((*context, word), 0)
        discount = self.discounts[len(context) + 1][min(count, 3) - 1] if count else 0
        return (count - discount) / self.totals[context] + self.gammas[context] * lower

    def arpa(self) -> str:
        """The model in ARPA format (log10 probabilities and backoff weights)."""
        grams: Dict[int, List[Gram]] = defaultdict(list)
        for gram in self.counts:
            grams[len(gram)].append(gram)
        grams[1] += [(BOS,)] + [(UNK,)] * ((UNK,) not in self.counts)
        lines = ["\\data\\"]
        lines += [f"ngram {n}={len(grams[n])}" for n in range(1, self.order + 1)]
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for gram in sorted(grams[n]):
                prob = -99.0 if gram == (BOS,) else self.log10_prob(gram[-1], gram[:-1])
                fields = [f"{prob:.7f}", " ".join(gram)]
                if n < self.order and gram in self.gammas:
                    fields.append(f"{math.log10(self.gammas[gram]):.7f}")
                lines.append("\t".join(fields))
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)


def write_arpa(sentences: Iterable[str], path: str, order: int = 3) -> KneserNey:
    """Estimate a :class:`KneserNey` model of ``sentences`` and write its ARPA file.

    Arguments
    ---------
    sentences : iterable of str
        One sentence a string.
    path : str
        The ARPA file to write (folders created).
    order : int
        The n-gram order.

    Returns
    -------
    KneserNey
        The model written.
    """
    model = KneserNey(sentences, order)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(model.arpa())
    return model


def task_sentences(
    train_csv, task: str, task_key: str = "lang", keep_text_verbatim: bool = False
) -> List[str]:
    """The transcripts of ``task`` in a split's manifests, normalised as in training.

    Arguments
    ---------
    train_csv : str, mapping or list
        As the YAML key (:mod:`speechbrain_meta.task_manifests`).
    task : str
        The task (language) whose rows to keep.
    task_key : str
        The task column.
    keep_text_verbatim : bool
        Keep the transcripts as written.

    Returns
    -------
    list of str

    Raises
    ------
    speechbrain_meta.errors.SetupError
        If the manifests have no row of ``task``.
    """
    rows = load_task_manifests(
        task_manifests(train_csv, "train_csv"),
        task_key=task_key,
        option="train_csv",
        replacements={"data_root": "$data_root"},  # only the text is read
        keep_text_verbatim=keep_text_verbatim,
    )
    sentences = [row["wrd"] for row in rows.values() if str(row[task_key]) == task]
    if not sentences:
        tasks = sorted({str(row[task_key]) for row in rows.values()})
        raise SetupError(f"No '{task}' row in {train_csv} (its tasks: {tasks}).")
    return sentences


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m speechbrain_meta.ngram``: the ARPA model of a task's transcripts."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_meta.ngram", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--train_csv", required=True, help="training manifest")
    parser.add_argument("--task", required=True, help="the target task (language)")
    parser.add_argument("--output", required=True, help="the ARPA file to write")
    parser.add_argument("--order", type=int, default=3, help="n-gram order")
    parser.add_argument("--task_key", default="lang", help="the task column")
    parser.add_argument("--keep_text_verbatim", action="store_true")
    args = parser.parse_args(argv)
    sentences = task_sentences(
        args.train_csv, args.task, args.task_key, args.keep_text_verbatim
    )
    model = write_arpa(sentences, args.output, args.order)
    sizes = ", ".join(
        f"{sum(len(g) == n for g in model.counts)} {n}-grams"
        for n in range(1, args.order + 1)
    )
    print(f"{args.output}: {len(sentences)} sentences, {sizes}")


if __name__ == "__main__":
    run_script(main, sys.argv[1:])

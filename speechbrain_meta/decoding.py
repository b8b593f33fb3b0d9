"""CTC decoding to words: greedy, beam search or prefix beam search, with an LM.

:class:`CTCDecoder` turns the CTC log-probabilities of a batch into the words
of each utterance, the same way in evaluation (:class:`speechbrain_meta.asr.ASR`),
adaptation curves and inference (:mod:`speechbrain_meta.inference`). The YAML
keys (``hparams/models/ctc.yaml``) choose it:

* ``ctc_decoder``: ``greedy`` (SpeechBrain's ``ctc_greedy_decode``), ``beam``
  (``speechbrain.decoders.ctc.CTCBeamSearcher``) or ``prefix_beam``
  (``CTCPrefixBeamSearcher``);
* ``beam_size``, and an optional KenLM n-gram model of words,
  ``kenlm_model_path`` (ARPA or KenLM binary; see :mod:`speechbrain_meta.ngram`),
  weighted by ``alpha``, with the word insertion bonus ``beta``.

The output layer may have more rows than the character encoder has labels
(spare rows for the letters of new languages): greedy decoding skips a spare
row it emits, as :func:`label_words` does; beam search only searches the
labels.

Example
-------
>>> labels = ["<blank>", "a", "b", " "]
>>> decoder = CTCDecoder(labels, blank_index=0)
>>> frames = torch.tensor([[1, 1, 0, 3, 2, 5]])  # a a <blank> ' ' b <spare>
>>> log_probs = torch.nn.functional.one_hot(frames, 6).float().log_softmax(-1)
>>> decoder(log_probs, torch.ones(1))
[['a', 'b']]
>>> CTCDecoder(labels, blank_index=0, kind="beam", beam_size=4)(
...     log_probs, torch.ones(1)
... )
[['a', 'b']]
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import speechbrain as sb
import torch
from speechbrain.decoders.ctc import CTCBeamSearcher, CTCPrefixBeamSearcher

from speechbrain_meta.errors import SetupError

__all__ = [
    "CTC_DECODERS",
    "CTCDecoder",
    "ctc_greedy_labels",
    "encoder_labels",
    "label_words",
]

CTC_DECODERS = {
    "greedy": None,
    "beam": CTCBeamSearcher,
    "prefix_beam": CTCPrefixBeamSearcher,
}


def label_words(tokens, ind2lab: Mapping[int, str]) -> list:
    """The words of a sequence of label indices (indices without a label skipped).

    Arguments
    ---------
    tokens : sequence of int
        Decoded label indices.
    ind2lab : mapping
        Index to label (a character), as ``CTCTextEncoder.ind2lab``.

    Returns
    -------
    list of str
        The labels joined, split at white space.

    Example
    -------
    >>> label_words([1, 3, 9, 2], {1: "a", 2: "b", 3: " "})
    ['a', 'b']
    """
    return "".join(ind2lab[t] for t in map(int, tokens) if t in ind2lab).split()


def ctc_greedy_labels(
    log_probs: torch.Tensor, wav_lens: torch.Tensor, blank_id: int, num_labels: int
) -> list:
    """SpeechBrain's ``ctc_greedy_decode``, without the rows that have no label.

    Also the ``decoding_function`` of the exported inference YAMLs, so that
    SpeechBrain's own ``EncoderASR`` decodes as the evaluation does.

    Arguments
    ---------
    log_probs : torch.Tensor
        ``(batch, frames, outputs)``.
    wav_lens : torch.Tensor
        Relative lengths.
    blank_id : int
        The blank's index.
    num_labels : int
        Indices from this one on have no label.

    Returns
    -------
    list of list of int
    """
    sequences = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=blank_id)
    return [[t for t in sequence if t < num_labels] for sequence in sequences]


def encoder_labels(encoder) -> list:
    """The labels of a ``CTCTextEncoder``, in index order (0 to its size - 1)."""
    return [encoder.ind2lab[index] for index in range(len(encoder))]


class CTCDecoder:
    """Words from CTC log-probabilities, by greedy or beam search decoding.

    Arguments
    ---------
    labels : sequence of str
        The label of each output index, from 0 (see :func:`encoder_labels`);
        output rows past them have no label.
    blank_index : int
        The index of the CTC blank.
    kind : str
        ``greedy``, ``beam`` or ``prefix_beam``.
    beam_size : int
        Width of the beam (beam searches only).
    kenlm_model_path : str, optional
        A KenLM word n-gram model (``.arpa`` or binary) for shallow fusion
        (beam searches only; needs the ``kenlm`` package: ``pip install
        speechbrain-meta[lm]``).
    alpha : float
        Weight of the language model.
    beta : float
        Word insertion bonus (weight of the number of words).

    Raises
    ------
    speechbrain_meta.errors.SetupError
        For an unknown ``kind``, or a language model with greedy decoding.
    """

    def __init__(
        self,
        labels: Sequence[str],
        blank_index: int,
        kind: str = "greedy",
        beam_size: int = 10,
        kenlm_model_path: Optional[str] = None,
        alpha: float = 0.5,
        beta: float = 1.5,
    ):
        if kind not in CTC_DECODERS:
            raise SetupError(
                f"ctc_decoder must be one of {list(CTC_DECODERS)}, not {kind!r}."
            )
        if kind == "greedy" and kenlm_model_path is not None:
            raise SetupError(
                "kenlm_model_path needs a beam search: set ctc_decoder to beam or "
                "prefix_beam."
            )
        self.labels = list(labels)
        self.blank_index = blank_index
        self.kind = kind
        self.searcher = None
        if kind != "greedy":
            self.searcher = CTC_DECODERS[kind](
                blank_index=blank_index,
                vocab_list=self.labels,
                space_token=" ",
                kenlm_model_path=kenlm_model_path,
                alpha=alpha,
                beta=beta,
                beam_size=beam_size,
            )

    @classmethod
    def from_hparams(cls, hparams: Mapping, encoder) -> CTCDecoder:
        """The decoder the YAML keys choose, over the labels of ``encoder``.

        Arguments
        ---------
        hparams : mapping
            ``blank_index`` and the optional ``ctc_decoder`` (default
            ``greedy``), ``beam_size``, ``kenlm_model_path``, ``alpha``,
            ``beta``.
        encoder : speechbrain.dataio.encoder.CTCTextEncoder
            The character encoder.

        Returns
        -------
        CTCDecoder
        """
        options = {
            key: hparams[key]
            for key in ("beam_size", "kenlm_model_path", "alpha", "beta")
            if hparams.get(key) is not None
        }
        return cls(
            encoder_labels(encoder),
            hparams["blank_index"],
            kind=hparams.get("ctc_decoder") or "greedy",
            **options,
        )

    def __call__(self, log_probs: torch.Tensor, wav_lens: torch.Tensor) -> list:
        """Decode a batch.

        Arguments
        ---------
        log_probs : torch.Tensor
            CTC log-probabilities, ``(batch, frames, outputs)``.
        wav_lens : torch.Tensor
            Relative lengths, ``(batch,)``.

        Returns
        -------
        list of list of str
            The words of each utterance.
        """
        if self.searcher is None:
            sequences = ctc_greedy_labels(
                log_probs, wav_lens, self.blank_index, len(self.labels)
            )
            ind2lab = dict(enumerate(self.labels))
            return [label_words(sequence, ind2lab) for sequence in sequences]
        hyps = self.searcher(log_probs[..., : len(self.labels)], wav_lens)
        return [hyp[0].text.split() for hyp in hyps]

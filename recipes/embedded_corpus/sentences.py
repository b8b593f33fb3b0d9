"""Natural sentences for the embedded corpus, from Debian text packages.

Sources (see ``corpus.yaml``) are read into passages, passages are split into
sentences, and a sentence is kept when a synthesiser can read it the way its
normalised transcript says (:func:`is_usable`). Sentences are de-duplicated after
:func:`speechbrain_meta.text.normalize_text`.

Example
-------
>>> list(split_sentences('He came. "Did you see it?" she asked... No!'))
['He came.', 'Did you see it?', 'she asked...', 'No!']
>>> limits = {"min_words": 2, "max_words": 12, "max_chars": 90}
>>> is_usable("Das ist gut.", "abcdefghijklmnopqrstuvwxyzäöü", ["mist*"], limits)
True
>>> is_usable("So ein Mist!", "abcdefghijklmnopqrstuvwxyzäöü", ["mist*"], limits)
False
"""

import re
from pathlib import Path

from recipes.debian_sources import fetch_package
from recipes.fillets_dialogs import read_dialogs
from speechbrain_meta.text import is_clean, normalize_text

__all__ = [
    "NotEnoughTextError",
    "is_usable",
    "language_sentences",
    "read_passages",
    "split_sentences",
]

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'»”“)])\s+")
_LEADING = "-–—\"'«»“”„‚‘’([ "
_TRAILING = "\"'«»“”„‚‘’)] "
_FINAL_PUNCTUATION = ".!?…,;: "
_ATTRIBUTION = re.compile(r"^\s*(--|—|―)")
_FORTUNE_SEPARATOR = re.compile(r"^%\s*$", flags=re.MULTILINE)
_WORD = re.compile(r"[^\W\d_]+")


class NotEnoughTextError(RuntimeError):
    """A sentence source has no usable text, or a language has too little."""


def split_sentences(passage: str):
    """Yield the sentences of a passage, without enclosing quotes or dashes.

    Arguments
    ---------
    passage : str
        Running text; line breaks count as spaces.

    Yields
    ------
    str
        Each sentence, ending with its punctuation.
    """
    text = " ".join(passage.split())
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.lstrip(_LEADING).rstrip(_TRAILING)
        if sentence:
            yield sentence


def _matches(word: str, blocked: str) -> bool:
    if blocked.endswith("*"):
        return word.startswith(blocked[:-1])
    return word == blocked


def is_usable(sentence: str, alphabet: str, offensive: list[str], limits: dict) -> bool:
    """Whether a sentence goes into the corpus.

    It must be clean (:func:`speechbrain_meta.text.is_clean`), start with a
    capital letter (no fragment), have ``min_words`` to ``max_words`` words after
    normalisation and at most ``max_chars`` characters, use only the letters of
    ``alphabet``, contain no full stop before its end (abbreviations), no word
    in capitals (acronyms, Roman numerals) and no ``offensive`` word.

    Arguments
    ---------
    sentence : str
        A raw sentence.
    alphabet : str
        Letters allowed in the normalised sentence.
    offensive : list of str
        Words that exclude a sentence; ``word*`` excludes every word starting
        with ``word``.
    limits : dict
        ``min_words``, ``max_words`` and ``max_chars``.

    Returns
    -------
    bool
        True when the sentence is kept.

    Example
    -------
    >>> limits = {"min_words": 2, "max_words": 12, "max_chars": 90}
    >>> alphabet = "abcdefghijklmnopqrstuvwxyz"
    >>> [is_usable(s, alphabet, [], limits) for s in
    ...  ["I like it.", "Call the FBI.", "Meet Mr. Smith.", "and then", "Café time."]]
    [True, False, False, False, False]
    >>> is_usable("¿Qué pasa?", "abcdefghijklmnopqrstuvwxyzáéíñóúü", [], limits)
    True
    """
    if len(sentence) > limits["max_chars"] or not is_clean(sentence):
        return False
    first_letter = next((c for c in sentence if c.isalpha()), "")
    if not first_letter.isupper() or "." in sentence.rstrip(_FINAL_PUNCTUATION):
        return False
    if any(len(word) > 1 and word.isupper() for word in _WORD.findall(sentence)):
        return False
    words = normalize_text(sentence).split()
    if not limits["min_words"] <= len(words) <= limits["max_words"]:
        return False
    if set("".join(words)) - set(alphabet):
        return False
    return not any(_matches(w, blocked) for w in words for blocked in offensive)


def _fortune_passages(path: Path) -> list[str]:
    passages = []
    for entry in _FORTUNE_SEPARATOR.split(path.read_text(encoding="utf-8")):
        lines = [line for line in entry.splitlines() if not _ATTRIBUTION.match(line)]
        passages.append(" ".join(lines))
    return passages


def read_passages(source: dict, download_folder: str) -> list[str]:
    """Read the passages (fortune entries, paragraphs, dialogue lines) of a source.

    Arguments
    ---------
    source : dict
        ``format`` (``fortune``, ``paragraphs`` or ``fillets``), ``package`` (a
        Debian package), and ``files`` (paths inside it) or, for ``fillets``,
        ``language``.
    download_folder : str
        Cache of the Debian packages.

    Returns
    -------
    list of str
        The passages, in file order.

    Raises
    ------
    NotEnoughTextError
        When a listed file is not in the package.
    ValueError
        When the format is unknown.
    """
    root = fetch_package(source["package"], download_folder)
    if source["format"] == "fillets":
        return [line.text for line in read_dialogs(root, source["language"])]
    if source["format"] not in ("fortune", "paragraphs"):
        raise ValueError(f"Unknown sentence source format '{source['format']}'.")
    passages = []
    for name in source["files"]:
        path = root / name
        if not path.is_file():
            raise NotEnoughTextError(
                f"The sentence source file {name} is not in the Debian package "
                f"{source['package']}."
            )
        if source["format"] == "fortune":
            passages.extend(_fortune_passages(path))
        else:
            passages.extend(path.read_text(encoding="utf-8").splitlines())
    return passages


def _describe(source: dict) -> str:
    detail = source.get("language") or ", ".join(source.get("files", []))
    return f"{source['format']} source {source['package']} ({detail})"


def language_sentences(
    lang: str, settings: dict, limits: dict, download_folder: str
) -> list[str]:
    """Return the usable sentences of one language, unique after normalisation.

    Arguments
    ---------
    lang : str
        Language code (used in error messages).
    settings : dict
        The language's entry in ``corpus.yaml``: ``sources``, ``alphabet``,
        ``offensive`` and optionally ``exclude``.
    limits : dict
        Sentence length limits (see :func:`is_usable`).
    download_folder : str
        Cache of the Debian packages.

    Returns
    -------
    list of str
        Raw sentences sorted by their normalised form; when two sentences
        normalise alike the first one read is kept.

    Raises
    ------
    NotEnoughTextError
        When a source yields no usable sentence.
    """
    excluded = set()
    for source in settings.get("exclude", []):
        for passage in read_passages(source, download_folder):
            excluded.add(normalize_text(passage))
            excluded.update(normalize_text(s) for s in split_sentences(passage))
    kept = {}
    for source in settings["sources"]:
        found = 0
        for passage in read_passages(source, download_folder):
            for sentence in split_sentences(passage):
                if not is_usable(
                    sentence, settings["alphabet"], settings["offensive"], limits
                ):
                    continue
                found += 1
                key = normalize_text(sentence)
                if key not in excluded:
                    kept.setdefault(key, sentence)
        if found == 0:
            raise NotEnoughTextError(
                f"The {_describe(source)} has no usable sentence for language '{lang}'."
            )
    return [kept[key] for key in sorted(kept)]

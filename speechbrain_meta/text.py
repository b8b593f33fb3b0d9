"""Text normalisation for multilingual ASR transcripts.

Every transcript that enters a manifest, whatever its language or source, goes
through :func:`normalize_text`: Unicode NFC, casefolded, punctuation removed,
language-specific letters kept (``ř``, ``ß`` → ``ss`` by casefolding, ``ё``...).

Example
-------
>>> normalize_text("Příliš žluťoučký kůň!")
'příliš žluťoučký kůň'
>>> normalize_text("  L'été, déjà ?  ")
'l été déjà'
>>> is_clean("Room 101 is free")
False
"""

import re
import unicodedata

__all__ = ["is_clean", "normalize_text"]

_SPACES = re.compile(r"\s+")


def _is_letter(char: str) -> bool:
    category = unicodedata.category(char)
    # Letters and the combining marks some scripts need (Devanagari, Thai, ...).
    return category.startswith("L") or category in ("Mn", "Mc")


def normalize_text(text: str) -> str:
    """Return ``text`` in the normal form used by every manifest.

    Arguments
    ---------
    text : str
        A raw sentence in any language.

    Returns
    -------
    str
        NFC-normalised, casefolded text in which every character that is not a
        letter became a space, with runs of spaces collapsed.

    Example
    -------
    >>> normalize_text("Guten Tag, Straße!")
    'guten tag strasse'
    """
    text = unicodedata.normalize("NFC", text).casefold()
    text = "".join(c if _is_letter(c) else " " for c in text)
    return _SPACES.sub(" ", text).strip()


def is_clean(text: str) -> bool:
    """Whether a raw sentence can be read aloud unambiguously by a synthesiser.

    Sentences with digits or with symbols that are spoken as words (``%``,
    ``&``, ``@``, ``$``, ``#``, ``+``, ``=``, ``/``, ``*``, ``<``, ``>``, ``_``,
    ``|``, ``~``) are rejected: their spoken form and their transcript differ.

    Arguments
    ---------
    text : str
        A raw sentence.

    Returns
    -------
    bool
        True when the sentence has no digits and no spoken symbols.

    Example
    -------
    >>> is_clean("Where is the cat?")
    True
    >>> is_clean("50% off & more")
    False
    """
    if any(unicodedata.category(c) == "Nd" for c in text):
        return False
    return not any(c in "%&@$#+=/*<>_|~\\^{}[]" for c in text)

"""Text normalisation for multilingual ASR transcripts.

Every transcript that enters a manifest, whatever its language or source, goes
through :func:`normalize_text`: Unicode NFC, casefolded, punctuation removed,
language-specific letters kept (``ř``, ``ß`` → ``ss`` by casefolding, ``ё``...).

Without a language (the embedded corpus, the Czech recordings, and every
published result) every character that is not a letter becomes a space. With a
language (the Common Voice and FLEURS recipes), the characters typed for an
apostrophe (:data:`APOSTROPHES`: ``’ ʼ ‘ ´`` and the backtick) are first
unified to ``'``, which is then kept *between two letters* in the languages
that write it as part of words (:data:`APOSTROPHE_LANGUAGES`: ``l'été``,
``don't``, ``м'ясо``, ``c'hoant``) and removed everywhere else, like the other
punctuation; Catalan also keeps its middle dot inside words (``col·lecció``,
:data:`IN_WORD_MARKS`).

Example
-------
>>> normalize_text("Příliš žluťoučký kůň!")
'příliš žluťoučký kůň'
>>> normalize_text("  L'été, déjà ?  ")
'l été déjà'
>>> normalize_text("  L’été, déjà ?  ", language="fr")
"l'été déjà"
>>> normalize_text("'Rock 'n' roll', he said.", language="en")
'rock n roll he said'
>>> normalize_text("Wie geht's?", language="cs")  # no apostrophe in Czech words
'wie geht s'
>>> is_clean("Room 101 is free")
False
"""

import re
import unicodedata
from typing import Optional

__all__ = [
    "APOSTROPHES",
    "APOSTROPHE_LANGUAGES",
    "IN_WORD_MARKS",
    "is_clean",
    "language_key",
    "normalize_text",
]

_SPACES = re.compile(r"\s+")

# Characters typed for an apostrophe, unified to "'" when a language is given:
# right single quotation mark, modifier letter apostrophe, left single
# quotation mark, acute accent, grave accent.
APOSTROPHES = "\u2019\u02bc\u2018\u00b4\u0060"
_TO_APOSTROPHE = str.maketrans({char: "'" for char in APOSTROPHES})

# The languages that write the apostrophe as part of words (elision, a letter
# of the alphabet, a glottal stop, a suffix boundary), by ISO 639 code, each
# with a word that keeps it. In them an apostrophe between two letters is
# kept; everywhere else (and in every other language) it becomes a space.
APOSTROPHE_LANGUAGES: dict[str, str] = {
    "af": "ma's",  # Afrikaans: plurals and 'n
    "ast": "d'asturies",  # Asturian: elision
    "be": "з'ява",  # Belarusian: the apostrophe is a letter of the alphabet
    "br": "c'hoant",  # Breton: c'h is a letter
    "ca": "l'home",  # Catalan: elision
    "co": "l'isula",  # Corsican: elision
    "cy": "i'r",  # Welsh: elision
    "de": "geht's",  # German: elision
    "en": "don't",  # English: contractions and possessives
    "fi": "vaa'an",  # Finnish: syllable boundary of consonant gradation
    "fr": "l'été",  # French: elision
    "fur": "l'aghe",  # Friulian: elision
    "ga": "d'fhág",  # Irish: elision
    "gd": "b'fhearr",  # Scottish Gaelic: elision
    "gn": "ñe'ẽ",  # Guarani: the glottal stop (puso)
    "gv": "y'n",  # Manx: elision
    "ha": "ya'ya",  # Hausa: glottalised consonants
    "it": "l'anno",  # Italian: elision
    "kw": "a'n",  # Cornish: elision
    "lb": "d'kand",  # Luxembourgish: elided article
    "lg": "ng'ombe",  # Luganda: ng' is a letter
    "lij": "l'ægua",  # Ligurian: elision
    "nl": "auto's",  # Dutch: plurals, zo'n
    "oc": "l'ostal",  # Occitan: elision
    "om": "bu'aa",  # Oromo: the glottal stop (hudhaa)
    "pt": "d'água",  # Portuguese: elision
    "rm": "l'aua",  # Romansh: elision
    "rw": "n'abantu",  # Kinyarwanda: elision
    "sc": "s'abba",  # Sardinian: elision
    "so": "ba'an",  # Somali: the glottal stop
    "sw": "ng'ombe",  # Swahili: ng' is a letter
    "tr": "türkiye'de",  # Turkish: suffixes of proper nouns
    "uk": "м'ясо",  # Ukrainian: the apostrophe is a letter of the alphabet
    "uz": "o'zbek",  # Uzbek (Latin script): o' and g' are letters
    "wa": "l'aiwe",  # Walloon: elision
}

# Further characters that some languages keep between two letters, each with a
# word that has it.
IN_WORD_MARKS: dict[str, dict[str, str]] = {
    lang: {"'": word} for lang, word in APOSTROPHE_LANGUAGES.items()
}
IN_WORD_MARKS["ca"]["\u00b7"] = "col·lecció"  # Catalan: the middle dot of l·l


def _is_letter(char: str) -> bool:
    category = unicodedata.category(char)
    # Letters and the combining marks some scripts need (Devanagari, Thai, ...).
    return category.startswith("L") or category in ("Mn", "Mc")


def language_key(language: str) -> str:
    """Return the ISO 639 code that picks a language's rules, from any tag.

    Arguments
    ---------
    language : str
        A language code or tag: ``fr``, ``sv-SE`` (Common Voice), ``pt_br``
        (FLEURS), ``cmn_hans_cn``...

    Returns
    -------
    str
        Its first subtag, casefolded.

    Example
    -------
    >>> language_key("sv-SE"), language_key("pt_br"), language_key("FR")
    ('sv', 'pt', 'fr')
    """
    return re.split(r"[-_]", language.strip(), maxsplit=1)[0].casefold()


def normalize_text(text: str, language: Optional[str] = None) -> str:
    """Return ``text`` in the normal form used by every manifest.

    Arguments
    ---------
    text : str
        A raw sentence in any language.
    language : str, optional
        The sentence's language (a code or tag, see :func:`language_key`).
        None (the default) keeps the form of the embedded corpus, which the
        published results use: no character but the letters is kept.

    Returns
    -------
    str
        NFC-normalised, casefolded text in which every character that is not a
        letter became a space, with runs of spaces collapsed. With a
        ``language``, typographic apostrophes are ``'`` first, and the
        characters of :data:`IN_WORD_MARKS` of the language (the apostrophe of
        :data:`APOSTROPHE_LANGUAGES`) are kept where they stand between two
        letters.

    Example
    -------
    >>> normalize_text("Guten Tag, Straße!")
    'guten tag strasse'
    >>> normalize_text("Aujourd’hui, c'est « l'été ».", "fr-FR")
    "aujourd'hui c'est l'été"
    >>> normalize_text("Мʼясо — це «м'ясо».", "uk")
    "м'ясо це м'ясо"
    >>> normalize_text("Una col·lecció d’art.", "ca")
    "una col·lecció d'art"
    >>> normalize_text("Una col·lecció d’art.", "es")
    'una col lecció d art'
    """
    text = unicodedata.normalize("NFC", text).casefold()
    if language is None:
        text = "".join(c if _is_letter(c) else " " for c in text)
        return _SPACES.sub(" ", text).strip()
    text = text.translate(_TO_APOSTROPHE)
    marks = IN_WORD_MARKS.get(language_key(language), {})
    kept = []
    for index, char in enumerate(text):
        if _is_letter(char):
            kept.append(char)
        elif (
            char in marks
            and 0 < index < len(text) - 1
            and _is_letter(text[index - 1])
            and _is_letter(text[index + 1])
        ):
            kept.append(char)
        else:
            kept.append(" ")
    return _SPACES.sub(" ", "".join(kept)).strip()


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

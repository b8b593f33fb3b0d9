r"""Reads the dialogue lines of Fish Fillets NG (Debian package ``fillets-ng-data``).

Every level folder ``usr/share/games/fillets-ng/script/<level>/`` holds the
English lines in ``dialogs_en.lua`` as ``dialogId("<id>", "<font>", "<English>")``
and one file per translation, ``dialogs_<lang>.lua``, in which each such
``dialogId(...)`` is followed by ``dialogStr("<translation>")``. The demo scenes
have the same layout in ``demo_dialogs_<lang>.lua``. The font names the
character who speaks the line (``font_big``: the big fish, ``font_small``: the
small fish, ``font_parrot``...). Voiced lines are ``sound/<level>/<lang>/<id>.ogg``.

Example
-------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> level = root / "usr/share/games/fillets-ng/script/barrel"
>>> level.mkdir(parents=True)
>>> _ = (level / "dialogs_cs.lua").write_text(
...     'dialogId("bar-v-co", "font_big", "What now?")\n'
...     'dialogStr("A co teď?")\n', encoding="utf-8")
>>> read_dialogs(root, "cs")
[DialogLine(level='barrel', dialog_id='bar-v-co', font='font_big', text='A co teď?')]
"""

import re
from pathlib import Path
from typing import NamedTuple

__all__ = ["DIALOG_ROOT", "DialogLine", "read_dialogs"]

DIALOG_ROOT = "usr/share/games/fillets-ng"

_STRING = r'"((?:[^"\\]|\\.)*)"'
_TOKEN = re.compile(
    rf"dialogId\(\s*{_STRING}\s*,\s*{_STRING}\s*,\s*{_STRING}\s*\)"
    rf"|dialogStr\(\s*{_STRING}\s*\)"
)
_ESCAPE = re.compile(r"\\(.)")


class DialogLine(NamedTuple):
    """One line of a Fish Fillets NG level, in one language."""

    level: str
    dialog_id: str
    font: str
    text: str


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: " " if m.group(1) == "n" else m.group(1), text)


def _parse_file(path: Path, level: str, lang: str) -> list[DialogLine]:
    lines = []
    pending = None  # the dialogId(...) that waits for its dialogStr(...)
    for match in _TOKEN.finditer(path.read_text(encoding="utf-8")):
        if match.group(1) is not None:
            dialog_id, font, english = match.group(1, 2, 3)
            if lang == "en":
                lines.append(DialogLine(level, dialog_id, font, _unescape(english)))
            else:
                pending = (dialog_id, font)
        elif pending is not None:
            text = _unescape(match.group(4))
            lines.append(DialogLine(level, pending[0], pending[1], text))
            pending = None
    return lines


def read_dialogs(fillets_root: Path, lang: str) -> list[DialogLine]:
    """Return every dialogue line of one language, level by level.

    Arguments
    ---------
    fillets_root : pathlib.Path
        The unpacked ``fillets-ng-data`` package (the folder holding ``usr``).
    lang : str
        Language suffix of the dialogue files: ``"en"`` (the originals) or a
        translation (``"cs"``, ``"de"``, ``"nl"``, ``"sv"``, ``"fr"``, ``"es"``,
        ``"it"``, ``"pl"``, ``"ru"``, ``"bg"``).

    Returns
    -------
    list of DialogLine
        In a stable order (levels and files sorted by name); empty translations
        are kept as empty strings, ids without a translation are left out.
    """
    script = Path(fillets_root) / DIALOG_ROOT / "script"
    lines = []
    for pattern in (f"*/dialogs_{lang}.lua", f"*/demo_dialogs_{lang}.lua"):
        for path in sorted(script.glob(pattern)):
            lines.extend(_parse_file(path, path.parent.name, lang))
    return lines

"""The documentation stays true to the repository.

* every relative Markdown link of ``README.md`` and ``docs/*.md`` points to an
  existing file, and its ``#anchor`` to a heading of that file (GitHub's slug
  rules);
* every fenced code block that runs a command (``python <script>.py``,
  ``.venv/bin/python <script>.py``, ``python -m <module>``, ``torchrun ...
  <script>.py``, ``make <target>``) names scripts, modules, ``hparams/...yaml``
  files and ``make`` targets that exist;
* ``README.md`` stays at most 20 KB.
"""

import re
import unicodedata
from itertools import product
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MAX_README_BYTES = 20 * 1024
DOCUMENTS = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...

PYTHON = r"(?<![\w.-])(?:\S*/)?python3?(?:\.\d+)?"
PYTHON_SCRIPT = re.compile(PYTHON + r"((?:\s+-[A-Za-z]\S*)*)\s+(\S+\.py)\b")
PYTHON_MODULE = re.compile(PYTHON + r"(?:\s+-[A-LN-Za-z]\S*)*\s+-m\s+([\w.]+)(.*)")
TORCHRUN = re.compile(r"\btorchrun\b(.*)")
MAKE = re.compile(r"(?:^|[;&|(]|\btime\b|\s)\s*make((?:\s+-\S+)*)\s+([A-Za-z_][\w.-]*)")
HPARAMS = re.compile(r"hparams/[\w./<>{},*-]*?\.yaml")
SCRIPT_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.py)\b")
PLACEHOLDER = re.compile(r"<[^<>/]+>")


def _documents_ids():
    return [str(path.relative_to(REPO_ROOT)) for path in DOCUMENTS]


def split_blocks(text: str):
    """The prose lines and the fenced code blocks of a Markdown text.

    Returns
    -------
    tuple
        ``(prose, blocks)``: prose as ``(line number, line)`` pairs, blocks as
        ``(first line number, [lines])``.
    """
    prose, blocks = [], []
    block = None
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            if block is None:
                block = (number, [])
            else:
                blocks.append(block)
                block = None
            continue
        if block is None:
            prose.append((number, line))
        else:
            block[1].append(line)
    assert block is None, f"code block opened at line {block[0]} is never closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (github-slugger's rules).

    Markdown syntax is rendered away first (inline code keeps its text, a link
    its label, emphasis markers go); then the text is lowercased, every
    character that is not a letter, digit, mark, connector (``_``), space or
    hyphen is removed, and spaces become hyphens.
    """
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    kept = []
    for char in text.strip().lower():
        category = unicodedata.category(char)
        if char in " -" or category[0] in "LNM" or category == "Pc":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set:
    """The anchors of the headings of a Markdown file, duplicates numbered."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    seen, result = {}, set()
    for _, line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list:
    """``(line number, target)`` of every Markdown link outside code."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
    return found


def test_slug_follows_github_rules():
    assert slug("The protocol: `evaluate_adaptation.py`") == (
        "the-protocol-evaluate_adaptationpy"
    )
    assert slug("Quality goal: does the meta-learned initialisation win?") == (
        "quality-goal-does-the-meta-learned-initialisation-win"
    )
    assert slug("Several GPUs (DDP)") == "several-gpus-ddp"
    assert slug("**Bold** and _emphasis_ + snake_case") == (
        "bold-and-emphasis--snake_case"
    )
    assert slug("Příliš žluťoučký") == "příliš-žluťoučký"


@pytest.mark.parametrize("path", DOCUMENTS, ids=_documents_ids())
def test_relative_links_resolve(path):
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO_ROOT)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)


def _code_lines(lines: list) -> list:
    """The lines of a code block without shell comments, continuations joined."""
    joined, current = [], ""
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    return joined


def expand_braces(text: str) -> list:
    """Shell brace expansion: ``a_{x,y}.yaml`` -> ``[a_x.yaml, a_y.yaml]``."""
    parts = re.split(r"(\{[^{}]*,[^{}]*\})", text)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in product(*options)]


def path_exists(relative: str) -> bool:
    """Whether a repository path exists; ``<placeholder>`` parts match any name."""
    for candidate in expand_braces(relative):
        if PLACEHOLDER.search(candidate):
            pattern = PLACEHOLDER.sub("*", candidate)
            if not any(REPO_ROOT.glob(pattern)):
                return False
        elif not (REPO_ROOT / candidate).exists():
            return False
    return True


def make_targets() -> set:
    targets = set()
    for line in (REPO_ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z_][\w.-]*(?:\s+[A-Za-z_][\w.-]*)*)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def command_references(line: str) -> dict:
    """The scripts, modules, YAML files and make targets a command line names."""
    found = {"scripts": [], "modules": [], "hparams": [], "make": []}
    is_command = False
    for match in PYTHON_SCRIPT.finditer(line):
        is_command = True
        found["scripts"].append(match.group(2))
    for match in PYTHON_MODULE.finditer(line):
        is_command = True
        module = match.group(1)
        if (REPO_ROOT / module.split(".")[0]).is_dir():
            found["modules"].append(module)
        if module == "pytest":  # test files given to pytest
            found["scripts"] += [
                m.group(1).split("::")[0] for m in SCRIPT_PATH.finditer(match.group(2))
            ]
    for match in TORCHRUN.finditer(line):
        is_command = True
        scripts = SCRIPT_PATH.findall(match.group(1))
        assert scripts, f"torchrun without a script: {line}"
        found["scripts"].append(scripts[0])
    for match in MAKE.finditer(line):
        is_command = True
        found["make"].append(match.group(2))
    if is_command:
        found["hparams"] = HPARAMS.findall(line)
    return found


def command_blocks():
    """Every fenced block that runs something: (document, first line, lines, commands).

    ``commands`` are the block's command lines (comments left out,
    continuations joined); ``lines`` are all of its lines.
    """
    for path in DOCUMENTS:
        _, blocks = split_blocks(path.read_text(encoding="utf-8"))
        for start, lines in blocks:
            commands = [
                line
                for line in _code_lines(lines)
                if any(command_references(line).values())
            ]
            if commands:
                yield path, start, lines, commands


def test_command_blocks_name_existing_scripts_yamls_and_targets():
    targets = make_targets()
    problems, count = [], 0
    for path, start, lines, commands in command_blocks():
        count += 1
        where = f"{path.relative_to(REPO_ROOT)}, code block at line {start}"
        scripts, modules, make = [], [], []
        for line in commands:
            found = command_references(line)
            scripts += found["scripts"]
            modules += found["modules"]
            make += found["make"]
        for script in scripts:
            if script.startswith(("/", "~")):
                continue  # outside the repository (e.g. /tmp)
            if not path_exists(script.removeprefix("./")):
                problems.append(f"{where}: no script {script}")
        for module in modules:
            base = module.replace(".", "/")
            if not (path_exists(base + ".py") or path_exists(base + "/__init__.py")):
                problems.append(f"{where}: no module {module}")
        # Every YAML of the block, comments included.
        for yaml_path in HPARAMS.findall("\n".join(lines)):
            if not path_exists(yaml_path):
                problems.append(f"{where}: no YAML {yaml_path}")
        for target in make:
            if target not in targets:
                problems.append(f"{where}: no make target {target}")
    assert count > 0, "no command block found: the patterns are broken"
    assert not problems, "\n".join(problems)


def test_command_patterns():
    found = command_references(
        "OMP_NUM_THREADS=1 .venv/bin/python train.py hparams/maml_ctc.yaml "
        "--init_from results/x"
    )
    assert found["scripts"] == ["train.py"]
    assert found["hparams"] == ["hparams/maml_ctc.yaml"]
    found = command_references(
        "torchrun --nproc_per_node 4 train.py hparams/maml_attention.yaml"
    )
    assert found["scripts"] == ["train.py"]
    assert command_references("rm -rf results/demo && time make demo")["make"] == [
        "demo"
    ]
    found = command_references(".venv/bin/python -m recipes.fillets_cs.prepare --x y")
    assert found["modules"] == ["recipes.fillets_cs.prepare"]
    assert not any(command_references("hparams/maml_ctc.yaml alone").values())
    assert not any(command_references("ipython notebook.py; cmake build").values())
    assert path_exists("hparams/{maml,reptile}_<model>.yaml")
    assert not path_exists("hparams/{maml,nosuch}_<model>.yaml")
    assert not path_exists("nosuch.py")
    assert expand_braces("a{1,2}b") == ["a1b", "a2b"]


def test_readme_is_at_most_20_kb():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, (
        f"README.md is {size} bytes; move details to docs/ (limit {MAX_README_BYTES})"
    )

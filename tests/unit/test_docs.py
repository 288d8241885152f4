"""The documentation cannot drift from the code: the config-keys page lists exactly the config dataclasses'
keys with their defaults, every `--section.key` flag the docs mention exists, every relative link resolves,
and the README stays a front page."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

from engine.config.load import apply_override
from engine.config.tree import Config
from engine.stages.specs import STAGE_SPECS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIG_PAGE = ROOT / "docs" / "config.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

# A key row of the config page: | `section.key` | `TOML default` | meaning |
KEY_ROW = re.compile(r"^\|\s*`([a-z_]+(?:\.[a-z_]+)+)`\s*\|\s*`([^`]*)`\s*\|")
FLAG = re.compile(r"(?<![\w-])--([a-z_]+(?:\.[a-z_]+)+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
QUOTED_KEY = re.compile(r"`([a-z_]+(?:\.[a-z_*]+)+)")
NOT_KEYS = {"model.safetensors"}  # the exported weights file, not the model section
PLACEHOLDER_FLAGS = {"section.key"}  # the synopsis: python -m engine.train [--section.key VALUE ...]


def config_keys(cls=Config, prefix: str = "") -> dict[str, object]:
    """Every key the command line accepts as --<key>, walked through nested sections, with its default."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(config_keys(hints[f.name], key + "."))
        else:
            keys[key] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return keys


def documented_keys() -> dict[str, str]:
    rows = {}
    for line in CONFIG_PAGE.read_text().splitlines():
        match = KEY_ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"docs/config.md lists '{match.group(1)}' twice"
            rows[match.group(1)] = match.group(2)
    return rows


def prose_lines(path: Path):
    """(line number, text) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors, seen = set(), {}
    for _, line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def cli_text(cell: str, value) -> str:
    """How the default would be typed after --key: lists in TOML form, strings unquoted, bools lower case."""
    if isinstance(value, list):
        return cell
    return str(value).lower() if isinstance(value, bool) else str(value)


def looks_like_key(token: str, sections: set[str]) -> bool:
    """A `section.key` in prose, not a file (`model.safetensors`), a whole section (`mae.*`) or a
    results.json path (`stages.pretrain.recon_loss`)."""
    parts = token.split(".")
    if parts[0] == "stages":
        return len(parts) >= 4 and parts[2] in sections
    return parts[0] in sections and token not in NOT_KEYS and parts[-1] != "*"


def test_the_config_page_lists_every_config_key_and_no_other():
    code, page = set(config_keys()), set(documented_keys())
    missing, unknown = sorted(code - page), sorted(page - code)
    assert not missing, f"docs/config.md lacks a row for {missing}: add one per key (| `key` | `default` | meaning |)"
    assert not unknown, f"docs/config.md documents {unknown}, which no config dataclass has: remove or rename the rows"


def test_the_config_page_gives_each_key_its_real_default():
    defaults, page = config_keys(), documented_keys()
    wrong = []
    for key, cell in page.items():
        if key not in defaults:
            continue  # reported by the test above
        try:
            value = tomllib.loads(f"v = {cell}")["v"]
        except tomllib.TOMLDecodeError:
            wrong.append(f"{key}: `{cell}` is not a TOML value")
            continue
        if value != defaults[key] or isinstance(value, bool) != isinstance(defaults[key], bool):
            wrong.append(f"{key}: page says `{cell}`, the dataclass {defaults[key]!r}")
    assert not wrong, "docs/config.md has wrong defaults (write them as TOML values):\n" + "\n".join(wrong)


def test_every_documented_key_works_as_a_flag_and_as_a_one_stage_flag():
    for key, cell in documented_keys().items():
        value = tomllib.loads(f"v = {cell}")["v"]
        text = cli_text(cell, value)
        for flag in (key, f"stages.semi.{key}"):
            tree: dict = {}
            apply_override(tree, flag, text)  # raises ConfigError for a key the command line does not know
            node = tree
            for part in flag.split("."):
                node = node[part]
            assert node == value, f"--{flag} {text} was read as {node!r}"


def test_the_config_page_names_every_stage():
    text = CONFIG_PAGE.read_text()
    assert not [s for s in STAGE_SPECS if f"`{s}`" not in text], "docs/config.md must name every stage of run.stages"


def test_every_config_key_the_docs_mention_exists():
    keys = set(config_keys())
    sections = {key.split(".")[0] for key in keys}
    bad = []
    for path in PAGES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            named = [f for f in FLAG.findall(line) if f not in PLACEHOLDER_FLAGS]
            # `section.key` in prose; `section.*` stands for the whole section
            named += [t for t in QUOTED_KEY.findall(line) if looks_like_key(t, sections)]
            for key in named:
                parts = key.split(".")
                if parts[0] == "stages" and len(parts) >= 4 and parts[1] in STAGE_SPECS:
                    parts = parts[2:]  # stages.<stage>.<section>.<key>: that stage only
                if ".".join(parts) not in keys:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {key}")
    assert not bad, "the docs name config keys that do not exist (renamed or removed?):\n" + "\n".join(bad)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for path in PAGES:
        for number, line in prose_lines(path):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http(s), mailto: not this repository's files
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{number}: ({target})"
                if not dest.exists():
                    broken.append(f"{where} no such file")
                elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                    broken.append(f"{where} no heading with that anchor")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to a page in docs/"


def test_every_doc_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}: add them to its list of docs"

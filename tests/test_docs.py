"""The documentation stays true to the code: every relative link in README.md and
docs/*.md resolves (the file, and the #anchor by GitHub's rules); every
`python -m vgg_jax.X ...` command in a fenced code block names a command-line module and
only flags it defines, its `--config=` file loads and its `--config.FIELD=` overrides
parse and pass the config check; every path named in code (`configs/X.py`,
`src/vgg_jax/...`, `experiments/...`) exists, as does every module of the module map."""

import functools
import json
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
from absl import flags
from conftest import REPO, run_cli
from ml_collections import config_flags

from vgg_jax import config_checks, configuration

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGE = REPO / "src" / "vgg_jax"
FENCE = re.compile(r"^ *(`{3,}|~{3,})(.*)$")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
# Values that stand for the reader's own paths: made to exist before the config check.
PLACEHOLDER_PATH = re.compile(r"^(?:[A-Z][A-Z_]*|~/.*|/path/to/.*|/shared/.*)$")


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@functools.cache
def split_markdown(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(the text outside fenced code blocks, [(language, body) of each block])."""
    prose, blocks, fence, language, body = [], [], None, "", []
    for line in path.read_text().splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, body = match.group(1), match.group(2).strip().lower(), []
        elif (
            fence is not None
            and match
            and match.group(1).startswith(fence)
            and not match.group(2).strip()
        ):
            blocks.append((language, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    assert fence is None, f"{doc_id(path)}: a code block is not closed"
    return "\n".join(prose), blocks


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation but
    hyphens and underscores dropped, each space a hyphen."""
    text = LINK.sub(r"\1", heading)
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = split_markdown(path)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(found)


def links(path: Path) -> list[str]:
    prose, _ = split_markdown(path)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans hold no links
    return [target for _, target in LINK.findall(prose)]


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("Checkpoints, resuming, preemption") == "checkpoints-resuming-preemption"
    assert github_anchor("Data that does not fit: streaming") == "data-that-does-not-fit-streaming"
    assert (
        github_anchor("Weights: published, files, `init_from`")
        == "weights-published-files-init_from"
    )
    assert github_anchor("predict, evaluate, export") == "predict-evaluate-export"
    assert github_anchor("**Bold** [link](x.md) 1.5x") == "bold-link-15x"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_every_code_block_says_its_language(path: Path):
    """So that no command hides from the checks below in an untagged block."""
    _, blocks = split_markdown(path)
    assert all(language for language, _ in blocks), f"{doc_id(path)}: a block without a language"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_relative_links_resolve(path: Path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target}: no {destination.relative_to(REPO)}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{doc_id(path)}: " + "; ".join(broken)


def test_docs_exist_and_are_linked_from_the_readme():
    guides = {p.name for p in DOCS[1:]}
    assert {"training.md", "data.md", "multihost.md", "pretrained.md"} <= guides
    assert {"benchmarking.md", "troubleshooting.md", "architecture.md"} <= guides
    readme_targets = {t.partition("#")[0] for t in links(REPO / "README.md")}
    assert {f"docs/{name}" for name in guides} <= readme_targets


QUICK_START = [
    'pip install -e ".[tfds,test]"',
    "python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16",
    "python -m pytest -q -n 2",
]


def test_quick_start_is_the_readmes_first_block():
    """CI (.ci/run) installs and tests 'as the README says': these three commands."""
    _, blocks = split_markdown(REPO / "README.md")
    first = [line.split("#")[0].strip() for line in blocks[0][1].splitlines()]
    assert first == QUICK_START
    ci = (REPO / ".ci" / "run").read_text()
    assert QUICK_START[0] in ci and QUICK_START[2] in ci


# ------------------------------------------------------------------------- commands


def shell_commands(path: Path) -> list[list[str]]:
    """Each command of the document's shell blocks as words: continuation lines joined,
    comments dropped, split at ;, && and |."""
    commands = []
    for language, body in split_markdown(path)[1]:
        if language not in SHELL_LANGUAGES:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            current: list[str] = []
            for word in words:
                if word in (";", "&&", "||", "|"):
                    commands.append(current)
                    current = []
                else:
                    current.append(word)
            commands.append(current)
    return [c for c in commands if c]


def vgg_jax_commands() -> list[tuple[str, str, list[str]]]:
    """(document, module, arguments) of every `python -m vgg_jax.X ...` in a shell block."""
    found = []
    for path in DOCS:
        for words in shell_commands(path):
            for i, word in enumerate(words[:-1]):
                if word == "-m" and words[i + 1].startswith("vgg_jax"):
                    found.append((doc_id(path), words[i + 1], words[i + 2 :]))
    return found


COMMANDS = vgg_jax_commands()


def test_the_docs_show_every_command():
    shown = {module for _, module, _ in COMMANDS}
    cli = {"vgg_jax.main", "vgg_jax.predict", "vgg_jax.evaluate", "vgg_jax.export"}
    assert cli | {"vgg_jax.benchmark"} <= shown


# Imports each command-line module in one interpreter and lists the flags it defines
# (calling its define_flags where it has one), then removes them: absl refuses a flag
# name that a second module defines.
FLAG_LISTER = """
import importlib, json, sys
from absl import app, flags, logging
FLAGS = flags.FLAGS
result = {"common": sorted(FLAGS)}  # absl's own: --verbosity, --help, --flagfile, ...
for name in sys.argv[1:]:
    before = set(FLAGS)
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        result[name] = {"error": str(error)}
        continue
    runner = getattr(module, "run", None)
    home = sys.modules[runner.__module__] if runner else module
    if hasattr(home, "define_flags"):
        home.define_flags()
    new = sorted(set(FLAGS) - before)
    result[name] = {
        "flags": new,
        "booleans": [n for n in new if FLAGS[n].boolean],
        "configs": [n for n in new if type(FLAGS[n]).__name__ == "_ConfigFlag"],
        "entry_point": "__main__" in open(module.__file__).read(),
    }
    for flag in new:
        delattr(FLAGS, flag)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def cli_flags() -> dict:
    modules = sorted({module for _, module, _ in COMMANDS})
    result = run_cli("-c", FLAG_LISTER, *modules, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def flag_name(word: str) -> str | None:
    if not word.startswith("-") or word in ("-", "--"):
        return None
    return word.lstrip("-").partition("=")[0]


@pytest.mark.parametrize(
    "doc, module, arguments", COMMANDS, ids=[f"{d}:{m}" for d, m, _ in COMMANDS]
)
def test_command_names_a_module_and_its_flags(doc, module, arguments, cli_flags):
    found = cli_flags[module]
    assert "error" not in found, f"{doc}: {module} does not import: {found['error']}"
    assert found["entry_point"], f"{doc}: {module} is no command (no __main__ block)"
    special = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"}
    known = set(found["flags"]) | set(cli_flags["common"]) | special
    negated = {f"no{name}" for name in found["booleans"]}
    unknown = []
    for word in arguments:
        name = flag_name(word)
        if name is None:
            continue
        config, _, field = name.partition(".")
        if config in found["configs"] and field:
            continue  # --config.FIELD: checked against the config below
        if name not in known | negated:
            unknown.append(word)
    assert not unknown, f"{doc}: {module} has no flag {unknown}"


def config_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """The --config=FILE of a command, and its --config.FIELD=VALUE overrides."""
    config_file, overrides = None, []
    for word in arguments:
        if word.startswith("--config="):
            config_file = word.partition("=")[2]
        elif word.startswith("--config."):
            overrides.append(word)
    return config_file, overrides


CONFIG_COMMANDS = [
    (doc, module, arguments)
    for doc, module, arguments in COMMANDS
    if any(word.startswith("--config") for word in arguments)
]


@pytest.mark.parametrize(
    "doc, module, arguments", CONFIG_COMMANDS, ids=[f"{d}:{m}" for d, m, _ in CONFIG_COMMANDS]
)
def test_command_config_loads_and_passes_the_check(doc, module, arguments, tmp_path):
    """Parsed as the CLI parses it (ml_collections' config flag), then checked as the CLI
    checks it; a reader's own paths (DIR, ~/photos, /path/to/...) are stood in for."""
    config_file, overrides = config_arguments(arguments)
    assert config_file, f"{doc}: --config.FIELD overrides without --config=FILE"
    path = REPO / config_file
    assert path.is_file(), f"{doc}: no config file {config_file}"
    default_fields = set(configuration.default_config())
    stand_ins = []
    for word in overrides:
        field, _, value = word[len("--config.") :].partition("=")
        assert field in default_fields, f"{doc}: no config field {field!r} in {word}"
        if PLACEHOLDER_PATH.match(value) and field in ("data_dir", "init_from"):
            stand_in = tmp_path / Path(value).name
            stand_in.touch()
            value = str(stand_in)
        stand_ins.append(f"--config.{field}={value}")
    argv = ["prog", f"--config={path}", *stand_ins]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    config_checks.validate(flag_values.config)


# ---------------------------------------------------------------------------- paths

CODE_PATH = re.compile(
    r"(?<![\w/~.$<{-])((?:configs|src|experiments|tests|docs)/[\w./-]*\w(?:/)?)(?![\w<{*])"
)


def code_texts(path: Path) -> list[str]:
    """The document's code: inline code spans and fenced blocks."""
    prose, blocks = split_markdown(path)
    return re.findall(r"`([^`\n]+)`", prose) + [body for _, body in blocks]


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_paths_named_in_code_exist(path: Path):
    missing = []
    for code in code_texts(path):
        for named in CODE_PATH.findall(code):
            if not (REPO / named).exists():
                missing.append(named)
    # The README's config table shortens 'configs/vgg11.py, vgg13.py' after the first.
    prose, _ = split_markdown(path)
    for row in re.findall(r"^\| `configs/[^|]*\|", prose, re.M):
        missing += [
            f"configs/{n}"
            for n in re.findall(r"`(?:configs/)?(\w+\.py)`", row)
            if not (REPO / "configs" / n).exists()
        ]
    assert not missing, f"{doc_id(path)} names {sorted(set(missing))}, which do not exist"


def test_module_map_names_existing_modules():
    """docs/architecture.md's module map: every `name.py` and `folder/` it names is in
    src/vgg_jax (so a module moved or renamed is moved in the map too)."""
    prose, _ = split_markdown(REPO / "docs" / "architecture.md")
    section = prose[prose.index("## Modules") :]
    files = {p.name for p in PACKAGE.rglob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    named = re.findall(r"`([\w/]+\.py|\w+/)`", section)
    assert len(named) > 30
    missing = [
        name
        for name in named
        if (name.endswith("/") and name[:-1] not in folders)
        or (name.endswith(".py") and not (PACKAGE / name).exists() and name not in files)
    ]
    assert not missing, f"the module map names {missing}, not in src/vgg_jax"

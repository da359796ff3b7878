"""The README is a contract: every ovdense command in it parses with today's CLI (its flags, choices and presets),
the files it names exist, the recipes it names load, its Python snippets compile and import what exists, and its
tables of presets and releases say what the code says. (The commands that run offline also run in other tests: the
demo, segment with the shipped models, synth, train with --max-steps, convert, eval.)"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

from ovdense.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
REPO = Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S) if lang == language]


def _commands() -> list[list[str]]:
    """The argv of every `ovdense ...` (or `python -m ovdense.cli ...`, torchrun's too) in the bash blocks."""
    found = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if "ovdense.cli" in words:
                    found.append(words[words.index("ovdense.cli") + 1:])
                elif words[:1] == ["ovdense"]:
                    found.append(words[1:])
    return found


COMMANDS = _commands()


def test_the_readme_has_commands_of_every_kind():
    kinds = {argv[0] for argv in COMMANDS if argv}
    assert {"demo", "segment", "detect", "ground", "eval", "train", "synth", "convert", "models", "serve",
            "export", "pseudo-label"} <= kinds


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:70] for a in COMMANDS])
def test_every_command_parses(argv, capsys):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`ovdense {' '.join(argv)}` does not parse: {capsys.readouterr().err}")
    assert callable(args.func)


def test_every_file_it_names_exists():
    named = set(re.findall(r"(?<![\w/.-])((?:configs|benchmarks|scripts|src/ovdense)/[\w./-]+\.(?:yaml|py|sh|txt))",
                           README))
    assert len(named) > 20
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, missing


def test_every_python_snippet_compiles_and_imports_what_exists():
    snippets = _blocks("python") + [re.search(r'python -c "(.*?)"', line).group(1)
                                    for block in _blocks("bash") for line in block.splitlines()
                                    if 'python -c "' in line]
    assert snippets
    for snippet in snippets:
        compile(snippet, "README", "exec")
        for module, names in re.findall(r"^\s*from (ovdense[\w.]*) import ([\w, ]+)", snippet, re.M):
            imported = importlib.import_module(module)
            for name in names.split(","):
                name = name.split(" as ")[0].strip()
                assert hasattr(imported, name), f"{module}.{name}"


def test_the_presets_table_says_what_the_presets_are():
    from ovdense.presets import PRESETS
    rows = re.findall(r"^\| `([\w-]+)` \| (\d+)[^|]*\| (?:(\d+) / (\d+)|whole image)", README, re.M)
    assert {name for name, *_ in rows} == set(PRESETS)
    for name, short, crop, stride in rows:
        preset = PRESETS[name]
        assert preset.short_side == int(short), name
        assert (preset.crop, preset.stride) == ((int(crop), int(stride)) if crop else (None, None)), name


def test_every_release_of_the_zoo_is_in_the_readme_with_its_command():
    from ovdense.zoo import RELEASES
    for release in RELEASES:
        assert release.command in README, release.name

"""Every `fedmnist` subcommand's `--help` says what it does and shows how it is typed, and
`fedmnist --version` answers: read from the real parser (`flows.cli.build_parser`), so a
subcommand added later without a description or an example fails here by name."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from flows.cli import build_parser
from flows.cli_help import EXAMPLES


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


SUBCOMMANDS = dict(_subcommands(build_parser()))


def test_the_command_line_has_its_known_subcommands() -> None:
    names = {" ".join(path) for path in SUBCOMMANDS}
    expected = {"data", "run", "server", "serve", "models list", "models export", "ui"}
    expected |= {"lab up", "lab down", "workers check", "workers trust", "report"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", sorted(SUBCOMMANDS), ids=" ".join)
def test_a_subcommand_help_has_a_description_and_an_example(path: tuple[str, ...]) -> None:
    parser = SUBCOMMANDS[path]
    text = parser.format_help()
    description = (parser.description or "").strip()
    assert description, f"`fedmnist {' '.join(path)}` has no description"
    assert " ".join(description.split()) in " ".join(text.split())
    assert EXAMPLES in text, f"`fedmnist {' '.join(path)} --help` shows no examples"
    examples = text.split(EXAMPLES, 1)[1].strip().splitlines()
    typed = f"fedmnist {' '.join(path)}"
    assert any(e.strip().startswith(typed) for e in examples), (typed, examples)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import fedcore

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"fedmnist (\S+) \(federated-mnist, Python 3\.\d+\.\d+\)\n", out), out
    assert out.split()[1] == fedcore.__version__

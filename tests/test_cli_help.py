"""Every command's --help: each option explained, and the exit codes of that command only,
the same as the docs' tables (docs/reference/cli.md)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from autocalls_async.cli import build_parser, main
from autocalls_async.cli.exits import EXIT_CODES_HELP, EXITS

COMMANDS = ("reply", "bulk", "results", "mock-server", "demo")
PAGE = Path(__file__).parents[1] / "docs" / "reference" / "cli.md"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def listed_codes(help_text: str) -> list[int]:
    """The codes of a help's ``exit codes:`` section, in order."""
    section = help_text.split("\nexit codes:\n", 1)[1].split("\n\n", 1)[0]
    return [int(m.group(1)) for m in re.finditer(r"^  (\d+) ", section, re.MULTILINE)]


def documented(columns: int, table: int) -> dict[str, set[int]]:
    """The docs' exit-code table number ``table``: for each command, the codes whose cell is
    not "—" (a code that command does not return)."""
    text = PAGE.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    tables = [block for block in text.split("\n\n") if block.startswith("| exit |")]
    header, _, *rows = tables[table].splitlines()
    names = [cell.strip().strip("`") for cell in header.split("|")[2:-1]]
    assert len(names) == columns
    codes: dict[str, set[int]] = {name: set() for name in names}
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        for name, cell in zip(names, cells[1:], strict=True):
            if not cell.startswith("—"):
                codes[name].add(int(cells[0]))
    return codes


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    commands = subparsers(parser)
    assert sorted(commands) == sorted(COMMANDS)
    (listing,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for choice in listing._choices_actions:  # the list of commands in the program's --help
        assert choice.help, choice.dest
    for name, command in [("", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            where = f"{name or 'autocalls-async'} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help is not argparse.SUPPRESS, f"{where}: no help"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_help_lists_its_own_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    assert listed_codes(capsys.readouterr().out) == list(EXITS[command])


def test_the_program_lists_every_code_and_the_docs_each_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert EXIT_CODES_HELP in text
    every = {code for codes in EXITS.values() for code in codes}
    assert listed_codes(text) == sorted(every)
    docs = {**documented(2, 0), **documented(3, 1)}
    assert docs == {command: set(codes) for command, codes in EXITS.items()}


def test_reply_does_not_list_what_only_bulk_returns(capsys: pytest.CaptureFixture[str]) -> None:
    """reply has no --max-replies and no OUT: 9 and 10 are bulk's; bulk stops at a 401 or an
    empty balance, and fails other rows one by one (exit 1): 4, 6, 7 and 8 are reply's."""
    assert main(["reply", "--help"]) == 0
    reply = set(listed_codes(capsys.readouterr().out))
    assert main(["bulk", "--help"]) == 0
    bulk = set(listed_codes(capsys.readouterr().out))
    assert reply - bulk == {4, 6, 7, 8}
    assert bulk - reply == {9, 10}

"""Every option and argument of ``llm-proxy server``, ``migrate`` and every ``manage`` command says
what it is for in ``--help``."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from llm_proxy.runtime.cli import main


def commands(
    command: click.Command, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """``command`` and, for a group, every command under it, each with the words that run it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from commands(sub, (*path, name))


DOCUMENTED = [
    pair for top in ("server", "migrate", "manage") for pair in commands(main.commands[top], (top,))
]


def test_the_walk_reaches_every_manage_command() -> None:
    reached = {" ".join(path) for path, _ in DOCUMENTED}
    for expected in (
        "server",
        "migrate",
        "manage project create",
        "manage project list",
        "manage project get",
        "manage project update",
        "manage project delete",
        "manage token generate",
        "manage token list",
        "manage token get",
        "manage token revoke",
        "manage token update",
    ):
        assert expected in reached


@pytest.mark.parametrize(
    ("path", "command"), DOCUMENTED, ids=[" ".join(path) for path, _ in DOCUMENTED]
)
def test_every_option_and_argument_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help, f"{' '.join(path)} has no description"
    undocumented = [
        param.human_readable_name
        for param in command.params
        if isinstance(param, click.Option | click.Argument) and not (param.help or "").strip()
    ]
    assert undocumented == [], f"{' '.join(path)}: no help for {undocumented}"

    shown = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for param in command.params:
        assert isinstance(param, click.Option | click.Argument)
        assert (param.help or "").split()[0] in shown.stdout, param.human_readable_name


SECRET_OPTIONS = [
    (("manage", "project", "create"), "--api-key"),
    (("manage", "project", "update"), "--api-key"),
    (("manage", "token", "revoke"), "--value"),
    (("manage", "project", "list"), "--management-token"),
    (("benchmark",), "--token"),
    (("benchmark",), "--compare-token"),
]


@pytest.mark.parametrize(("path", "option"), SECRET_OPTIONS)
def test_an_option_taking_a_secret_says_the_command_line_shows_it_and_how_not_to(
    path: tuple[str, ...], option: str
) -> None:
    command: click.Command = main
    for word in path:
        assert isinstance(command, click.Group)
        command = command.commands[word]
    [param] = [p for p in command.params if isinstance(p, click.Option) and option in p.opts]
    assert "visible to other users" in (param.help or ""), option
    alternative = "MANAGEMENT_TOKEN" if option == "--management-token" else "- reads it from stdin"
    assert alternative in (param.help or ""), option

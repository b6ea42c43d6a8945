"""Secrets a command takes without their being on its command line, where every user of the
machine can read them (``ps``, ``/proc/<pid>/cmdline``): ``-`` reads one line of stdin, and a
terminal is asked, the answer hidden."""

from __future__ import annotations

import sys

import click

STDIN = "-"
# The end of the help of an option taking a secret.
ON_THE_COMMAND_LINE = (
    "A value given on the command line is visible to other users of this machine (ps)."
)


def ask_secret(prompt: str) -> str:
    """Asked on the terminal (on stderr, so stdout holds only the result), the answer hidden."""
    answer: str = click.prompt(prompt, hide_input=True, err=True)
    return answer.strip()


def secret_option_value(value: str, option: str, prompt: str) -> str:
    """``value`` as given, or for ``-`` the secret from stdin: asked for on a terminal, else its
    first line, stripped."""
    if value != STDIN:
        return value
    if sys.stdin.isatty():
        return ask_secret(prompt)
    line = sys.stdin.readline().strip()
    if not line:
        raise click.BadParameter("- reads the value from stdin, which gave none", param_hint=option)
    return line

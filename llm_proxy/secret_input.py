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


def configured_token(name: str, value: str) -> str:
    """A bearer token as configured, without the whitespace around it (a file mounted from a
    Kubernetes Secret usually ends in a newline). Raises ValueError naming ``name``, never
    showing the value, when what is left cannot travel in an ``Authorization`` header the same
    from every client: only visible ASCII does (HTTP libraries refuse or re-encode the rest, so a
    token holding it would start a server no client can authenticate to)."""
    token = value.strip()
    if not all("!" <= char <= "~" for char in token):
        raise ValueError(
            f"{name}: must be visible ASCII characters only (no spaces, control characters or"
            " non-ASCII letters inside it); the value is not shown"
        )
    return token


def configured_password(name: str, value: str) -> str:
    """A password (or user name) as configured, without the whitespace around it. Raises
    ValueError naming ``name``, never showing the value, when it holds a control character,
    which nobody can type at a browser's sign-in prompt."""
    password = value.strip()
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in password):
        raise ValueError(f"{name}: must not hold control characters; the value is not shown")
    return password

"""``REQUIRED_SETTINGS``: variables a start must be given, never left to a default.

An instance that is one of several must share its secrets and its database with the others: left
unset, a secret is generated under this instance's DATA_DIR and the database defaults to a SQLite
file there, so tokens issued by one instance, and upstream keys stored through it, mean nothing
to the next. A Kubernetes Secret whose key is present but empty gives exactly that, silently: the
variable is set, to nothing, which counts as unset. Listing the variables here turns it into a
start-up error naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import click
from click.core import ParameterSource

from llm_proxy.runtime.settings import SettingsError

_META_KEY = "llm_proxy.required_settings"
_Command = TypeVar("_Command", bound=Callable[..., object])


def required_settings_option(func: _Command) -> _Command:
    """``--required-settings`` / REQUIRED_SETTINGS. Kept out of the command's parameters (in the
    context's ``meta``): it names which of the settings must be given, it is not one of them."""
    return click.option(
        "--required-settings",
        envvar="REQUIRED_SETTINGS",
        show_envvar=True,
        expose_value=False,
        callback=_remember,
        help="Variables this start must be given, comma-separated (such as MANAGEMENT_TOKEN,"
        "ENCRYPTION_KEY,DATABASE_URL): one unset or empty stops start-up, instead of a value of"
        " this instance's own (generated, or the default) that other instances do not share.",
    )(func)


def _remember(context: click.Context, _param: click.Parameter, value: str | None) -> None:
    context.meta[_META_KEY] = value


def check_required_settings(context: click.Context, *, reads_all: bool = True) -> None:
    """Raise SettingsError naming a variable REQUIRED_SETTINGS lists that this start lacks.

    A command that reads only some of the server's variables (``migrate``) passes ``reads_all``
    False: the same list, set once for both (a Compose file, a pod template), then requires of
    it only what it reads, and the server alone refuses a name that is no variable at all."""
    given = configured_variables(context)
    required = context.meta.get(_META_KEY) or ""
    if not reads_all:
        required = ",".join(name for name in required.split(",") if name.strip() in given)
    check_required(required, given)


def configured_variables(context: click.Context) -> dict[str, bool]:
    """Each variable a command's options read, and whether this start was given a value for it
    (a flag, or the variable set to something other than blanks)."""
    given: dict[str, bool] = {}
    for param in context.command.params:
        if not param.envvar or param.name is None:
            continue
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
        value = context.params.get(param.name)
        source = context.get_parameter_source(param.name)
        configured = (
            source not in (None, ParameterSource.DEFAULT)
            and value is not None
            and (not isinstance(value, str) or bool(value.strip()))
        )
        for name in names:
            given[name] = configured
    return given


def check_required(required: str | None, given: dict[str, bool]) -> None:
    """Raise SettingsError naming the first variable of ``required`` (comma-separated) that this
    start was not given; a name that is no variable of the command is refused too."""
    for place, name in enumerate((part.strip() for part in (required or "").split(",")), 1):
        if not name:
            continue
        if name not in given:
            raise SettingsError(
                f"REQUIRED_SETTINGS: {_shown(name, place)} is not a variable llm-proxy reads"
            )
        if not given[name]:
            raise SettingsError(
                f"{name}: unset or empty, and REQUIRED_SETTINGS requires it (this instance would"
                " use one of its own, which no other instance shares); if it comes from a"
                " Secret, give that key a value"
            )


# What a variable's name looks like (HTTPS_PROXY, https_proxy): anything else may be a value.
_NAME = re.compile(r"[A-Z][A-Z0-9_]*|[a-z][a-z0-9_]*")


def _shown(entry: str, place: int) -> str:
    """An entry that is no variable, named in the refusal only when it looks like a name (its
    name alone for NAME=value): an env line pasted into the list, or a Secret's value templated
    where its key's name belongs, would otherwise put the secret in the error and the logs."""
    name, equals, _value = entry.partition("=")
    if _NAME.fullmatch(name.strip()):
        return repr(name.strip() + ("=…" if equals else ""))
    return f"entry {place} (not shown: it is no name, and may be a value)"

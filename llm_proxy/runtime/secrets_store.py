"""Secrets the operator did not configure are generated once and kept under ``DATA_DIR`` (mode 0600).

Each lives in its own file so an operator can rotate one by deleting it, and so a later start reuses
the same values instead of locking everyone out.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GeneratedSecret:
    value: str
    created: bool  # True when this start generated it


def load_or_create(data_dir: Path, name: str, make: Callable[[], str]) -> GeneratedSecret:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        return GeneratedSecret(value, created=False)
    value = make()
    # O_EXCL + 0600 from the start: the secret never exists with looser permissions.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(tmp, path)
    return GeneratedSecret(value, created=True)


def new_management_token() -> str:
    return "mgmt-" + secrets.token_urlsafe(32)


def new_admin_password() -> str:
    return secrets.token_urlsafe(18)


def new_encryption_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()

"""Refused credentials on the operator surfaces (the management API's token, the admin pages'
password): counted on ``/metrics`` and logged, so that someone guessing shows, at most once every
few seconds per surface with how many were refused (see :mod:`llm_proxy.sparse_warning`).
"""

from __future__ import annotations

from llm_proxy.sparse_warning import SparseWarning
from llm_proxy.stats import STATS

_WARNINGS = {
    surface: SparseWarning("auth.credentials_refused") for surface in ("management", "admin")
}


def refused(surface: str, client_ip: str | None) -> None:
    """Note a wrong credential sent to ``surface`` (``management`` or ``admin``)."""
    STATS.auth_failures[surface] += 1
    _WARNINGS[surface].happened(surface=surface, client_ip=client_ip)

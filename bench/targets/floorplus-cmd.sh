#!/bin/bash
# PROXY_CMD for the floorplus lab anchor (floorplus.py: the floor plus llm-proxy's per-request
# guarantees at their cheapest), on the pyfloor anchor's venv (httptools + uvloop). Env:
# FLOORPLUS_PORT (18098; PROXY_URL must match), PYFLOOR_VENV, FLOORPLUS_WITHOUT (see floorplus.py).
set -eu
venv=${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}
if ! "$venv/bin/python" -c 'import httptools, uvloop' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q httptools==0.9.0 uvloop==0.23.0 >&2
fi
exec "$venv/bin/python" "$(dirname "${BASH_SOURCE[0]}")/floorplus.py" --port "${FLOORPLUS_PORT:-18098}" \
  --upstream "$MOCK_UPSTREAM_URL" --upstream-key "$MOCK_UPSTREAM_KEY" --token sk-floorplus-bench-0123456789abcdef

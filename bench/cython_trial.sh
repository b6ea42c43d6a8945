#!/bin/bash
# cython_trial.sh [DIR]: a worktree of HEAD in DIR (default /tmp/llm-proxy-cython) with the request
# path's modules compiled by Cython as they are (pure Python, no type declarations), to count with
#   bash bench/instructions_per_request.sh . DIR
# Lab tool: Cython goes to /tmp/cython-lib (pip --target), not into .venv; gcc and the Python
# headers must be there (they are on this kind of machine). See bench/README.md, fifth step.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-/tmp/llm-proxy-cython}
lib=/tmp/cython-lib
[ -d $lib/Cython ] || "$checkout/.venv/bin/pip" install -q --target $lib "cython==3.3.1" "setuptools==80.9.0"
rm -rf "$dir"; git -C "$checkout" worktree prune; git -C "$checkout" worktree add -f -q --detach "$dir" HEAD
cd "$dir"
PYTHONPATH=$lib "$checkout/.venv/bin/python" - > "$dir/cython-build.log" 2>&1 <<'PY'
from Cython.Build import cythonize
from setuptools import setup

modules = [
    "llm_proxy/http/front.py", "llm_proxy/http/policy.py", "llm_proxy/http/exchange_io.py",
    "llm_proxy/http/messages.py", "llm_proxy/http/client.py", "llm_proxy/proxy/handler.py",
    "llm_proxy/proxy/admission.py", "llm_proxy/proxy/exchange.py", "llm_proxy/proxy/metrics.py",
    "llm_proxy/events/offload.py", "llm_proxy/proxy/body_scan.py", "llm_proxy/proxy/api_config.py",
]
# annotation_typing off: with it, Cython would turn annotations into C types and type checks,
# which changes behaviour (a float parameter given an int); this measures compilation alone.
setup(
    script_args=["build_ext", "--inplace"],
    ext_modules=cythonize(modules, language_level=3, quiet=True,
                          compiler_directives={"annotation_typing": False, "binding": True}),
)
PY
echo "compiled: $(find llm_proxy -name '*.so' | wc -l) modules in $dir"

#!/bin/bash
# instructions_per_request.sh [--anchors | CHECKOUT...]: user-space instructions per request of the llm-proxy
# server of each CHECKOUT (default: this one; another checkout's code runs on this one's .venv
# through PYTHONPATH), of pyfloor and of floorplus (bench/targets/floorplus.py; FLOORPLUS_WITHOUT
# prices its parts; FLOORPLUS_COMPILED=DIR adds the Cython builds of bench/floorplus_compiled.sh),
# counted by valgrind's callgrind over a fixed number of requests (N, default 2000, over C=8 connections) after a warm-up, against the bench's nginx mock.
#
# Unlike CPU time on a shared VM, the count repeats to within 0.1 % from run to run, so a change of
# 1 % is visible in one run. It leaves out the kernel (the same system calls for both, see
# bench/README.md) and the events process. Under callgrind the server runs ~50x slower, so the
# events hand-off ships ~10 exchanges per batch instead of hundreds: its per-batch share is
# over-counted. SPLIT=1 adds where the count goes (bench/instructions_split.py). Needs valgrind
# (apt-get install valgrind) and a prior ../shared/bench/run.sh.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$checkout/bench/lab.sh"
n=${N:-2000} c=${C:-8}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
d=$(mktemp -d /tmp/instructions.XXXXXX)
lab_mock $d
trap 'kill ${vpid:-} 2>/dev/null || true; nginx -c $d/mock.conf -s stop 2>/dev/null || true' EXIT
count() { # NAME PORT TOKEN: warm up, count N requests, print instructions per request
  local name=$1 port=$2 token=$3
  python3 "$checkout/bench/instructions_client.py" $port $token 400 $c
  callgrind_control -i on $vpid >/dev/null 2>&1
  python3 "$checkout/bench/instructions_client.py" $port $token $n $c
  callgrind_control -i off $vpid >/dev/null 2>&1
  callgrind_control -d $vpid >/dev/null 2>&1
  sleep 1
  local ir; ir=$(grep -h "^totals:" $d/$name.cg* | awk '{s+=$2} END {print s}')
  echo "$name: $((ir / n)) instructions per request (n=$n c=$c)"
  [ "${SPLIT:-}" != 1 ] || python3 "$checkout/bench/instructions_split.py" $d/$name.cg.1 | tail -n +2
  kill $vpid; wait $vpid 2>/dev/null || true
}
wait_up() { for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return; sleep 0.5; done; exit 1; }
free() { ! curl -s -o /dev/null "http://127.0.0.1:$1/" || { echo "port $1 is taken" >&2; exit 1; }; }
i=0
if [ "${1:-}" = --anchors ]; then targets=(); else targets=("${@:-$checkout}"); fi  # --anchors: the floors only
for target in "${targets[@]}"; do
  i=$((i + 1)); port=$((18110 + i)); mkdir -p $d/$i; code=$(cd "$target" && pwd); free $port
  # (From $d: ``python -m`` puts the working directory ahead of PYTHONPATH.)
  (cd $d && export PYTHONPATH=$code && lab_llm_proxy "$code" $d $d/$i $port \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$d/llm-proxy-$i.cg \
    "$checkout/.venv/bin/python" -m llm_proxy server > $d/$i/server.log 2>&1) &
  vpid=$!
  wait_up http://127.0.0.1:$port
  count llm-proxy-$i $port "$(lab_token http://127.0.0.1:$port)" | sed "s#^llm-proxy-$i#llm-proxy ($target)#"
done
anchor() { # NAME SCRIPT PORT TOKEN: count a floor script (pyfloor, or floorplus, see bench/targets)
  local name=$1 script=$2 port=$3 token=$4
  free $port
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$d/$name.cg \
    "${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}/bin/python" "$script" \
    --port $port --upstream http://127.0.0.1:18080 --upstream-key $LAB_UPSTREAM_KEY --token $token \
    > $d/$name.log 2>&1 &
  vpid=$!
  wait_up http://127.0.0.1:$port
  count $name $port $token
}
anchor pyfloor "$checkout/../shared/bench/anchors/pyfloor.py" 18119 $LAB_PYFLOOR_TOKEN
anchor floorplus "$checkout/bench/targets/floorplus.py" 18118 $LAB_PYFLOOR_TOKEN
if [ -n "${FLOORPLUS_COMPILED:-}" ]; then  # the builds of bench/floorplus_compiled.sh
  anchor floorplus-cython-untyped "$FLOORPLUS_COMPILED/run_untyped.py" 18117 $LAB_PYFLOOR_TOKEN
  anchor floorplus-cython-typed "$FLOORPLUS_COMPILED/run_typed.py" 18116 $LAB_PYFLOOR_TOKEN
fi
echo "(callgrind files: $d)"

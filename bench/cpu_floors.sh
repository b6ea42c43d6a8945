#!/bin/bash
# cpu_floors.sh: CPU µs per request (all, and in user space) and requests/s at c=64 of pyfloor,
# floorplus, floorplus with its six priced parts left out ("floorplus-bare") and, with
# FLOORPLUS_COMPILED=DIR (bench/floorplus_compiled.sh), floorplus's typed Cython build with and
# without those parts; ROUNDS (3) rounds of DUR (4) s each, the servers alternated so that the
# host's slow minutes fall on all of them. Against the bench's nginx mock (run
# ../shared/bench/run.sh once first). See bench/README.md, twenty-second step.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$checkout/bench/lab.sh"
d=/tmp/cpu-floors; rm -rf $d; mkdir -p $d
lab_mock $d
python=${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}/bin/python
bare=events,hash,ids,policy,timers,capture
pids=()
trap 'kill ${pids[*]} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null || true' EXIT
serve() { # NAME PORT [VAR=VALUE...] SCRIPT: start a floor on PORT
  local name=$1 port=$2; shift 2
  env "$@" --port $port --upstream http://127.0.0.1:18080 --upstream-key $LAB_UPSTREAM_KEY \
    --token $LAB_PYFLOOR_TOKEN > $d/$name.log 2>&1 &
  pids+=($!); echo "$name $port $!" >> $d/servers
}
serve pyfloor 18201 "$python" "$checkout/../shared/bench/anchors/pyfloor.py"
serve floorplus 18202 "$python" "$checkout/bench/targets/floorplus.py"
serve floorplus-bare 18203 FLOORPLUS_WITHOUT=$bare "$python" "$checkout/bench/targets/floorplus.py"
if [ -n "${FLOORPLUS_COMPILED:-}" ]; then
  serve cython-typed 18204 "$python" "$FLOORPLUS_COMPILED/run_typed.py"
  serve cython-typed-bare 18205 FLOORPLUS_WITHOUT=$bare "$python" "$FLOORPLUS_COMPILED/run_typed.py"
fi
sleep 2
hz=$(getconf CLK_TCK)
for round in $(seq "${ROUNDS:-3}"); do
  while read -r name port pid; do
    read -r user0 system0 < <(awk '{print $14, $15}' /proc/$pid/stat)
    out=$(BENCH_TOKEN=$LAB_PYFLOOR_TOKEN wrk -t2 -c64 -d"${DUR:-4}"s -s "$checkout/../shared/bench/wrk_post.lua" \
      http://127.0.0.1:$port/v1/chat/completions | grep WRKJSON | sed 's/WRKJSON //')
    read -r user1 system1 < <(awk '{print $14, $15}' /proc/$pid/stat)
    echo "$out" | python3 -c "
import json, sys
run = json.load(sys.stdin); n = run['requests']
cpu = lambda ticks: round(ticks / $hz * 1e6 / n, 1)
print('round $round  $name:', round(n / run['duration_us'] * 1e6), 'requests/s,',
      cpu($user1 - $user0 + $system1 - $system0), 'µs CPU per request, of which user', cpu($user1 - $user0))"
  done < $d/servers
done

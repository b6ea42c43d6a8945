#!/bin/bash
# quiet_latency.sh [--stream] [quiet_latency.py options] [-- CHECKOUT...]: bench/quiet_latency.py
# against direct, pyfloor and the llm-proxy server of each CHECKOUT (default: this one; another
# checkout's code runs on this one's .venv through PYTHONPATH), each on its own port from 18095 on.
# Without --stream: the bench's nginx mock (run ../shared/bench/run.sh once first), requests
# --pause-ms apart. With --stream: the harness's streaming mock (INTERVAL ms between its 20
# chunks, default 10), whose streams are the pause. Env: PYFLOOR_VENV as for lab.sh.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$checkout/bench/lab.sh"
options=() checkouts=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; checkouts=("$@"); break; fi
  options+=("$1"); shift
done
[ ${#checkouts[@]} -gt 0 ] || checkouts=("$checkout")
stream=0; for o in "${options[@]}"; do [ "$o" = --stream ] && stream=1; done
d=/tmp/quiet-latency; rm -rf $d; mkdir -p $d
pids=()
trap 'kill ${pids[*]:-} ${LAB_PYFLOOR_PID:-} ${LAB_SSE_PID:-} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null || true' EXIT
if [ $stream = 1 ]; then
  lab_sse $d; upstream=18081
else
  lab_mock $d; upstream=18080
fi
"${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}/bin/python" "$checkout/../shared/bench/anchors/pyfloor.py" \
  --port 18097 --upstream http://127.0.0.1:$upstream --upstream-key $LAB_UPSTREAM_KEY \
  --token $LAB_PYFLOOR_TOKEN > "$d/pyfloor.log" 2>&1 &
LAB_PYFLOOR_PID=$!
targets=("direct=$upstream:$LAB_UPSTREAM_KEY" "pyfloor=18097:$LAB_PYFLOOR_TOKEN")
port=18095
for c in "${checkouts[@]}"; do
  [ $port = 18097 ] && port=18098
  lab_build_server "$c" $d $port
  pids+=($LAB_BUILD_PID)
  targets+=("$(basename "$c")=$port:$(lab_token http://127.0.0.1:$port)")
  port=$((port + 1))
done
"$checkout/.venv/bin/python" "$checkout/bench/quiet_latency.py" "${options[@]}" "${targets[@]}"

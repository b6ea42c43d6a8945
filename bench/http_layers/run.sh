#!/bin/bash
# bench/http_layers/run.sh [ROUNDS]: llm-proxy's front door against uvicorn's httptools protocol,
# granian (ASGI and RSGI) and a raw httptools protocol, each answering the bench's chat POST with a
# fixed JSON and no upstream (apps.py). Per round and server: wrk c=1 for 5 s (p50, p99), wrk c=64
# with 2 threads for 5 s (requests/s), and the CPU time per request of the server's processes over
# the c=64 run (/proc/<pid>/stat, children included: granian runs its workers as child processes).
# Creates /tmp/http-layers-venv (uvicorn, granian, pinned) on first use; the front door runs on the
# checkout's .venv. Needs wrk (apt-get install wrk).
set -eu
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checkout=$(cd "$here/../.." && pwd)
venv=${HTTP_LAYERS_VENV:-/tmp/http-layers-venv}
lua=$checkout/../shared/bench/wrk_post.lua
if ! "$venv/bin/python" -c 'import uvicorn, granian' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q uvicorn==0.55.0 granian==2.8.9 httptools==0.9.0 uvloop==0.23.0 >&2
fi
pids=()
trap 'kill ${pids[*]} 2>/dev/null || true' EXIT
start() { "$@" > /dev/null 2>&1 & pids+=($!); }
cd "$here"
start "$venv/bin/python" apps.py raw 18131
start env PYTHONPATH="$checkout" "$checkout/.venv/bin/python" apps.py front 18132
start "$venv/bin/uvicorn" apps:asgi_app --port 18133 --http httptools --loop uvloop --no-access-log \
  --log-level warning --lifespan off
granian=("$venv/bin/granian" --workers 1 --runtime-threads 1 --loop uvloop --no-ws --http 1 --log-level warning)
start "${granian[@]}" --interface asgi --port 18134 apps:asgi_app
start "${granian[@]}" --interface rsgi --port 18135 apps:rsgi_app
names=(raw front uvicorn granian-asgi granian-rsgi)
for port in 18131 18132 18133 18134 18135; do
  for _ in $(seq 100); do curl -sf -X POST -d '{}' "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done
ticks() { local t=0 p; for p in $1 $(pgrep -P $1 || true); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
wrk_json() { wrk "$@" -s "$lua" | sed -n 's/^WRKJSON //p'; }
echo "server        p50 c=1 us  p99 c=1 us  req/s c=64  CPU us/request c=64"
for round in $(seq "${1:-3}"); do
  for i in 0 1 2 3 4; do
    port=$((18131 + i)) pid=${pids[$i]} url="http://127.0.0.1:$((18131 + i))/v1/chat/completions"
    c1=$(wrk_json -t1 -c1 -d5s "$url")
    before=$(ticks $pid)
    c64=$(wrk_json -t2 -c64 -d5s "$url")
    after=$(ticks $pid)
    python3 - "${names[$i]}" "$c1" "$c64" $((after - before)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
name, c1, c64, ticks, hz = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rps = c64["requests"] / c64["duration_us"] * 1e6
print(f"{name:<13} {c1['p50_us']:>10} {c1['p99_us']:>11} {rps:>11.0f} {ticks / hz * 1e6 / c64['requests']:>20.1f}")
PY
  done
done

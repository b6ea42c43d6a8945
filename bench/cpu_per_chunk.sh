#!/bin/bash
# cpu_per_chunk.sh: CPU µs per relayed SSE chunk of the llm-proxy server (+ its events process) and of
# pyfloor, on long streams: ../shared/bench/sse_mock.py sends CHUNKS chunks INTERVAL_MS apart per
# stream, CONCURRENCY streams at a time, STREAMS in all (bench/stream_client.py counts what arrives).
# Run on a quiet machine. Env: PYFLOOR_VENV (the anchors' venv with httptools and uvloop).
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$checkout/../shared/bench
python=$checkout/.venv/bin/python
pyfloor_python=${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}/bin/python
source "$checkout/bench/lab.sh"
CHUNKS=${CHUNKS:-200} INTERVAL_MS=${INTERVAL_MS:-1} CONCURRENCY=${CONCURRENCY:-32} STREAMS=${STREAMS:-320}
d=/tmp/prof/chunks; rm -rf $d; mkdir -p $d
trap 'kill ${mpid:-} ${spid:-} ${fpid:-} 2>/dev/null || true' EXIT
$python $shared/sse_mock.py --port 18081 --key $LAB_UPSTREAM_KEY --chunks $CHUNKS --interval-ms $INTERVAL_MS &
mpid=$!
cat > "$d/api.yaml" <<YAML
default_api: openai
apis:
  openai:
    base_url: http://127.0.0.1:18081
    allowed_endpoints: [/v1/chat/completions]
    allowed_methods: [POST]
YAML
API_CONFIG_PATH=$d/api.yaml DATABASE_URL=sqlite:///$d/proxy.db DATA_DIR=$d MANAGEMENT_TOKEN=$LAB_MANAGEMENT_TOKEN \
  LISTEN_ADDR=127.0.0.1:18095 LOG_LEVEL=warning LOG_FORMAT=json PRICES_PATH=$checkout/config/prices.yaml \
  $checkout/.venv/bin/llm-proxy server > $d/server.log 2>&1 &
spid=$!
$pyfloor_python $shared/anchors/pyfloor.py --port 18097 --upstream http://127.0.0.1:18081 --upstream-key $LAB_UPSTREAM_KEY --token sk-pyfloor-bench-0123456789abcdef > $d/pyfloor.log 2>&1 &
fpid=$!
tok=$(lab_token http://127.0.0.1:18095)
epid=$(pgrep -P $spid -f events_process || true)
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
hz=$(getconf CLK_TCK)
measure() { # name url token pids...
  local name=$1 url=$2 token=$3; shift 3
  local before=(); for pid in "$@"; do before+=($(ticks $pid)); done
  chunks=$($python $checkout/bench/stream_client.py --url $url/v1/chat/completions --token $token \
           --streams $STREAMS --concurrency $CONCURRENCY --expect $CHUNKS)
  local i=0 line="$name streams=$STREAMS chunks=$chunks"
  for pid in "$@"; do
    after=$(ticks $pid); us=$(python3 -c "print(round(($after-${before[$i]})/$hz*1e6/$chunks,2))"); line="$line cpu_us_per_chunk[$pid]=$us"; i=$((i+1))
  done
  echo "$line"
}
$python $checkout/bench/stream_client.py --url http://127.0.0.1:18095/v1/chat/completions --token $tok --streams 8 --concurrency 8 --expect $CHUNKS >/dev/null
for rep in 1 2; do
measure llm-proxy http://127.0.0.1:18095 $tok $spid $epid
measure pyfloor http://127.0.0.1:18097 sk-pyfloor-bench-0123456789abcdef $fpid
done

#!/bin/bash
# cpu_per_chunk.sh: CPU µs per relayed SSE chunk of the llm-proxy server (+ its events process) and of
# pyfloor, on long streams: ../shared/bench/sse_mock.py sends CHUNKS chunks INTERVAL_MS apart per
# stream, CONCURRENCY streams at a time, STREAMS in all (bench/stream_client.py counts what arrives).
# Run on a quiet machine. Env: PYFLOOR_VENV (the anchors' venv with httptools and uvloop).
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$checkout/.venv/bin/python
source "$checkout/bench/lab.sh"
CHUNKS=${CHUNKS:-200} INTERVAL_MS=${INTERVAL_MS:-1} CONCURRENCY=${CONCURRENCY:-32} STREAMS=${STREAMS:-320}
d=/tmp/prof/chunks; rm -rf $d; mkdir -p $d
trap 'kill ${LAB_SSE_PID:-} ${LAB_SERVER_PID:-} ${LAB_PYFLOOR_PID:-} 2>/dev/null || true' EXIT
INTERVAL=$INTERVAL_MS lab_sse $d
lab_servers $checkout $d http://127.0.0.1:18081
spid=$LAB_SERVER_PID fpid=$LAB_PYFLOOR_PID epid=$LAB_EVENTS_PID tok=$LAB_TOKEN
hz=$(getconf CLK_TCK)
measure() { # name url token pids...
  local name=$1 url=$2 token=$3; shift 3
  local before=(); for pid in "$@"; do before+=($(lab_ticks $pid)); done
  chunks=$($python $checkout/bench/stream_client.py --url $url/v1/chat/completions --token $token \
           --streams $STREAMS --concurrency $CONCURRENCY --expect $CHUNKS)
  local i=0 line="$name streams=$STREAMS chunks=$chunks"
  for pid in "$@"; do
    after=$(lab_ticks $pid); us=$(python3 -c "print(round(($after-${before[$i]})/$hz*1e6/$chunks,2))"); line="$line cpu_us_per_chunk[$pid]=$us"; i=$((i+1))
  done
  echo "$line"
}
$python $checkout/bench/stream_client.py --url http://127.0.0.1:18095/v1/chat/completions --token $tok --streams 8 --concurrency 8 --expect $CHUNKS >/dev/null
for rep in 1 2; do
measure llm-proxy http://127.0.0.1:18095 $tok $spid $epid
measure pyfloor http://127.0.0.1:18097 $LAB_PYFLOOR_TOKEN $fpid
done

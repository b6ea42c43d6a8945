#!/bin/bash
# cpu_per_request.sh: CPU µs per request (all, and in user space) of the llm-proxy server (+ its events process) and of
# pyfloor, at c=1 and c=64,
# against the bench's nginx mock (the config of the latest /tmp/bench-run-*: run ../shared/bench/run.sh
# once first). Run on a quiet machine. Env: PROFILE=1 adds a py-spy profile at c=64 (PYSPY: its
# path), PYFLOOR_VENV (the anchors' venv with httptools and uvloop).
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$checkout/../shared/bench
source "$checkout/bench/lab.sh"
d=/tmp/prof/run; rm -rf $d; mkdir -p $d
lab_mock $d
trap 'kill ${LAB_SERVER_PID:-} ${LAB_PYFLOOR_PID:-} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null || true' EXIT
lab_servers $checkout $d http://127.0.0.1:18080
spid=$LAB_SERVER_PID fpid=$LAB_PYFLOOR_PID epid=$LAB_EVENTS_PID tok=$LAB_TOKEN
hz=$(getconf CLK_TCK)
measure() { # name url token conns threads pids...
  local name=$1 url=$2 token=$3 c=$4 t=$5; shift 5
  local before=() before_user=(); for pid in "$@"; do before+=($(lab_ticks $pid)); before_user+=($(lab_user_ticks $pid)); done
  out=$(BENCH_TOKEN=$token wrk -t$t -c$c -d10s -s $shared/wrk_post.lua $url/v1/chat/completions | grep WRKJSON | sed 's/WRKJSON //')
  reqs=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  p50=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_us"])')
  local i=0 line="$name c=$c requests=$reqs p50=${p50}us"
  for pid in "$@"; do
    after=$(lab_ticks $pid); us=$(python3 -c "print(round(($after-${before[$i]})/$hz*1e6/$reqs,1))")
    user=$(lab_user_ticks $pid); user_us=$(python3 -c "print(round(($user-${before_user[$i]})/$hz*1e6/$reqs,1))")
    line="$line cpu_us_per_req[$pid]=$us (user $user_us)"; i=$((i+1))
  done
  echo "$line"
}
BENCH_TOKEN=$tok wrk -t1 -c8 -d3s -s $shared/wrk_post.lua http://127.0.0.1:18095/v1/chat/completions >/dev/null
BENCH_TOKEN=$LAB_PYFLOOR_TOKEN wrk -t1 -c8 -d3s -s $shared/wrk_post.lua http://127.0.0.1:18097/v1/chat/completions >/dev/null
for rep in 1 2; do
measure llm-proxy http://127.0.0.1:18095 $tok 1 1 $spid $epid
measure pyfloor http://127.0.0.1:18097 $LAB_PYFLOOR_TOKEN 1 1 $fpid
measure llm-proxy http://127.0.0.1:18095 $tok 64 2 $spid $epid
measure pyfloor http://127.0.0.1:18097 $LAB_PYFLOOR_TOKEN 64 2 $fpid
done
if [ "${PROFILE:-}" = 1 ]; then
  (sleep 1; BENCH_TOKEN=$tok wrk -t2 -c64 -d12s -s $shared/wrk_post.lua http://127.0.0.1:18095/v1/chat/completions >/dev/null) &
  load=$!
  if [ -n "$epid" ]; then ${PYSPY:-py-spy} record -p $epid -d 10 -r 500 -f raw -o $d/profile-events-c64.txt --nonblocking >/dev/null 2>&1 & fi
  ${PYSPY:-py-spy} record -p $spid -d 10 -r 1000 -f raw -o $d/profile-c64.txt --nonblocking >/dev/null 2>&1
  wait $load  # (not a bare wait: the server and pyfloor are children too)
fi

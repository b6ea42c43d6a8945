#!/bin/bash
# tail_ab.sh CHECKOUT_A CHECKOUT_B: the latency tail of two llm-proxy builds, alternated on one
# machine: both servers up (ports 18095 and 18096, each checkout's code on this one's .venv through
# PYTHONPATH) in front of the bench's nginx mock (run ../shared/bench/run.sh once first); ROUNDS
# rounds (default 5) of DUR seconds (default 8) of `wrk -tT -cC` (default 1 and 1) against each in
# turn. Per run: wrk's percentiles, the CPU µs per request of the server and of its events process,
# and with PERF=1 the scheduler waits of the request chain (wrk, nginx, the server) from
# `perf sched` (bench/sched_waits.py), at the cost of perf's own load. Events dropped or bodies
# shed are printed at the end, for both.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$checkout/bench/lab.sh"
a=$(cd "${1:?CHECKOUT_A}" && pwd) b=$(cd "${2:?CHECKOUT_B}" && pwd)
d=/tmp/tail-ab; rm -rf $d; mkdir -p $d
lab_mock $d
declare -A token server events
trap 'kill ${server[*]:-} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null || true' EXIT
for build in 18095:$a 18096:$b; do
  lab_build_server "${build#*:}" $d ${build%%:*}
  server[${build%%:*}]=$LAB_BUILD_PID
done
for port in 18095 18096; do
  token[$port]=$(lab_token http://127.0.0.1:$port)
  events[$port]=$(pgrep -P ${server[$port]} -f events_process)
done
export BENCH_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
run_wrk() { # port seconds
  BENCH_TOKEN=${token[$1]} wrk -t${T:-1} -c${C:-1} -d$2s -s "$checkout/../shared/bench/wrk_post.lua" \
    http://127.0.0.1:$1/v1/chat/completions | grep WRKJSON | sed 's/WRKJSON //'
}
for port in 18095 18096; do run_wrk $port 3 >/dev/null; done  # warm-up
for round in $(seq ${ROUNDS:-5}); do
  for port in 18095 18096; do
    s0=$(lab_ticks ${server[$port]}) e0=$(lab_ticks ${events[$port]}) waits=""
    if [ "${PERF:-0}" = 1 ]; then
      perf sched record -q -a -o $d/sched.data -- sleep ${DUR:-8} 2>/dev/null &
      perf_pid=$!; sleep 0.2
      out=$(run_wrk $port ${DUR:-8}); wait $perf_pid
      perf sched timehist -i $d/sched.data > $d/timehist.txt 2>/dev/null
      waits=" | $("$checkout/.venv/bin/python" "$checkout/bench/sched_waits.py" $d/timehist.txt)"
    else
      out=$(run_wrk $port ${DUR:-8})
    fi
    s1=$(lab_ticks ${server[$port]}) e1=$(lab_ticks ${events[$port]})
    echo "$out" | python3 -c "
import json, sys
w = json.load(sys.stdin); n = w['requests']; hz = $(getconf CLK_TCK)
print('round $round %s: %d requests, p50 %d p90 %d p99 %d p99.9 %d us; CPU per request: server %.1f, events %.1f us$waits'
      % ('$(basename $([ $port = 18095 ] && echo $a || echo $b))', n, w['p50_us'], w['p90_us'], w['p99_us'], w['p999_us'],
         ($s1 - $s0) / hz * 1e6 / n, ($e1 - $e0) / hz * 1e6 / n))"
  done
done
for port in 18095 18096; do
  echo "$port: $(curl -s http://127.0.0.1:$port/metrics | grep -E '^llm_proxy_events_(dropped|request_bodies_shed)_total' \
    | awk '$2 > 0' | tr '\n' ' ')"
done

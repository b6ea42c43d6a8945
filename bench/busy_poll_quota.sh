#!/bin/bash
# busy_poll_quota.sh: busy polling under a CPU quota. Two llm-proxy servers (adaptive polling up to 300 µs, and off),
# each with its events process in a cgroup-v1 `cpu` group of QUOTA/100000 CPU (default 0.5), against the
# nginx mock of the latest /tmp/bench-run-* (run ../shared/bench/run.sh once first); idle CPU over 30 s,
# then wrk c=1 and c=64 for 10 s each, alternating, 3 times. Needs root and /sys/fs/cgroup/cpu.
set -eu
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); shared=$checkout/../shared/bench
source "$checkout/bench/lab.sh"
d=/tmp/prof/quota; rm -rf $d; mkdir -p $d
lab_mock $d
pids=()
cleanup() { kill ${pids[@]} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null; sleep 1; for g in poll nopoll; do rmdir /sys/fs/cgroup/cpu/llm-$g 2>/dev/null || true; done; }
trap cleanup EXIT
declare -A port=([poll]=18101 [nopoll]=18102) micros=([poll]=300 [nopoll]=0) tok
for g in poll nopoll; do
  cg=/sys/fs/cgroup/cpu/llm-$g; mkdir -p $cg; echo 100000 > $cg/cpu.cfs_period_us; echo ${QUOTA:-50000} > $cg/cpu.cfs_quota_us
  mkdir -p $d/$g
  ( echo $BASHPID > $cg/cgroup.procs; exec env API_CONFIG_PATH=$d/api.yaml DATABASE_URL=sqlite:///$d/$g/proxy.db DATA_DIR=$d/$g MANAGEMENT_TOKEN=$LAB_MANAGEMENT_TOKEN \
    LISTEN_ADDR=127.0.0.1:${port[$g]} LOG_LEVEL=warning LOG_FORMAT=json LLM_PROXY_BUSY_POLL_MICROS=${micros[$g]} $checkout/.venv/bin/llm-proxy server > $d/$g/server.log 2>&1 ) &
  pids+=($!)
done
for g in poll nopoll; do u=http://127.0.0.1:${port[$g]}
  tok[$g]=$(lab_token $u)
  BENCH_TOKEN=${tok[$g]} wrk -t1 -c8 -d3s -s $shared/wrk_post.lua $u/v1/chat/completions >/dev/null
done
cpu() { awk '{s+=$1} END {print s}' <(for p in $(cat /sys/fs/cgroup/cpu/llm-$1/cgroup.procs); do awk '{print $14+$15}' /proc/$p/stat; done); }
idle_before=(); for g in poll nopoll; do idle_before+=($(cpu $g)); done; sleep 30
i=0; for g in poll nopoll; do echo "$g idle CPU over 30 s: $(( $(cpu $g) - ${idle_before[$i]} )) ticks"; i=$((i+1)); done
for rep in 1 2 3; do for g in poll nopoll; do for c in 1 64; do t=$([ $c = 1 ] && echo 1 || echo 2)
  out=$(BENCH_TOKEN=${tok[$g]} wrk -t$t -c$c -d10s -s $shared/wrk_post.lua http://127.0.0.1:${port[$g]}/v1/chat/completions | grep WRKJSON | sed 's/WRKJSON //')
  echo "rep$rep $g c=$c $(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("rps %.0f p50 %dus p99 %dus" % (d["requests"]/d["duration_us"]*1e6, d["p50_us"], d["p99_us"]))') throttled=$(grep nr_throttled /sys/fs/cgroup/cpu/llm-$g/cpu.stat | awk '{print $2}')"
done; done; done

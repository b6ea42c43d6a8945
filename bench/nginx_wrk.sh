#!/usr/bin/env bash
# The reference harness of the latency issue: nginx as the upstream, wrk as the client.
#
# Prints, for nginx's own proxy_pass (the floor) and for llm-proxy: the p50 latency added at
# concurrency 1, the throughput at concurrency 64 relative to calling nginx directly, and the added
# time to first byte of a small SSE stream. Needs nginx and wrk (Debian: apt-get install nginx-light
# wrk) and the project's .venv (make run or make test once).
#
#   bash bench/nginx_wrk.sh [seconds per measurement, default 5] [runs, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${1:-5}
RUNS=${2:-3}
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)"; exit 2; }
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 2; }

WORK=$(mktemp -d)
stop_all() {
  kill "$(cat "$WORK/proxy.pid" 2>/dev/null)" 2>/dev/null || true
  for name in upstream floor; do
    [ -f "$WORK/$name/nginx.pid" ] && kill "$(cat "$WORK/$name/nginx.pid")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$WORK"
}
trap stop_all EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); FLOOR=$(free_port); PROXY=$(free_port)
ANSWER='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
STREAM='data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\ndata: [DONE]\n\n'
# Two nginx instances of one worker each: the upstream, and the floor's proxy_pass. Sharing one
# worker would make the floor proxy and its own upstream take turns on one process, which no
# proxy under test has to do.
nginx_conf() {  # name, server block
  mkdir -p "$WORK/$1/logs"
  cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes 1;
error_log $WORK/$1/logs/error.log;
pid $WORK/$1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $WORK/$1/body; proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fcgi; uwsgi_temp_path $WORK/$1/uwsgi; scgi_temp_path $WORK/$1/scgi;
  $2
}
CONF
  nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf"
}
nginx_conf upstream "server {
    listen 127.0.0.1:$UP;
    location /v1/chat/completions { default_type application/json; return 200 '$ANSWER'; }
    location /v1/stream { default_type text/event-stream; return 200 '$STREAM'; }
  }"
nginx_conf floor "upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$FLOOR;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }
  }"
cat > "$WORK/api.yaml" <<CONF
apis:
  openai:
    base_url: http://127.0.0.1:$UP
    allowed_endpoints: [/v1/chat/completions, /v1/stream]
CONF
MGMT=mgmt-bench-$RANDOM$RANDOM
DATA_DIR="$WORK/data" API_CONFIG_PATH="$WORK/api.yaml" LISTEN_ADDR=127.0.0.1:$PROXY MANAGEMENT_TOKEN=$MGMT \
  LOG_FORMAT=json .venv/bin/llm-proxy server > "$WORK/proxy.log" 2>&1 &
echo $! > "$WORK/proxy.pid"
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PROXY/health" >/dev/null && break; sleep 0.2; done
PROJECT=$(curl -sf -X POST "http://127.0.0.1:$PROXY/manage/projects" -H "Authorization: Bearer $MGMT" \
  -d '{"name":"bench","api_key":"sk-bench-upstream"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
TOKEN=$(curl -sf -X POST "http://127.0.0.1:$PROXY/manage/tokens" -H "Authorization: Bearer $MGMT" \
  -d "{\"project_id\":\"$PROJECT\",\"duration_minutes\":600}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

for path in chat stream; do
  cat > "$WORK/$path.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
done

# p50 in microseconds, and requests/s, of one wrk run.
measure() {  # url lua connections
  local out; out=$(wrk -t1 -c"$3" -d"${SECONDS_PER}s" --latency -s "$2" "$1")
  local p50; p50=$(awk '/ 50%/ {print $2}' <<<"$out")
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  python3 - "$p50" "$rps" <<'PY'
import sys
v, rps = sys.argv[1], float(sys.argv[2])
scale = {"us": 1.0, "ms": 1000.0}.get(v[-2:])
us = float(v[:-2]) * scale if scale else float(v[:-1]) * 1e6  # wrk prints us, ms or s
print(f"{us:.1f} {rps:.0f}")
PY
}

# Each route's latency is compared with direct measurements taken just before and just after it
# (their mean), so a drift of the machine between measurements does not land on one route.
direct_p50() { measure "http://127.0.0.1:$UP/v1/$1" "$WORK/$2.lua" 1 | cut -d' ' -f1; }
echo "run | route | added p50 at c=1 (ms) | throughput at c=64 vs direct | added TTFB streams (ms)"
for run in $(seq "$RUNS"); do
  read -r _ d_rps <<<"$(measure "http://127.0.0.1:$UP/v1/chat/completions" "$WORK/chat.lua" 64)"
  d_p50=$(direct_p50 chat/completions chat); ds_p50=$(direct_p50 stream stream)
  for route in "nginx proxy_pass:$FLOOR" "llm-proxy:$PROXY"; do
    name=${route%%:*}; port=${route##*:}
    read -r p50 _ <<<"$(measure "http://127.0.0.1:$port/v1/chat/completions" "$WORK/chat.lua" 1)"
    d_p50_after=$(direct_p50 chat/completions chat)
    read -r s_p50 _ <<<"$(measure "http://127.0.0.1:$port/v1/stream" "$WORK/stream.lua" 1)"
    ds_p50_after=$(direct_p50 stream stream)
    read -r _ rps <<<"$(measure "http://127.0.0.1:$port/v1/chat/completions" "$WORK/chat.lua" 64)"
    python3 -c "print(f'$run | $name | {($p50-($d_p50+$d_p50_after)/2)/1000:.3f} | {$rps/$d_rps:.2f} | {($s_p50-($ds_p50+$ds_p50_after)/2)/1000:.3f}')"
    d_p50=$d_p50_after; ds_p50=$ds_p50_after
  done
done

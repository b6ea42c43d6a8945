# Sourced by the bench's lab scripts (cpu_per_request.sh, busy_poll_quota.sh): what they share.
# Needs a prior run of ../shared/bench/run.sh, whose nginx mock config (the latest /tmp/bench-run-*) is reused.

LAB_UPSTREAM_KEY=sk-bench-upstream-0123456789abcdef0123456789abcdef
LAB_MANAGEMENT_TOKEN=mgmt-bench-0123456789abcdef

# lab_mock DIR: start the harness's nginx mock (port 18080) with its files under DIR, and write
# DIR/api.yaml pointing llm-proxy at it. Stop it with: nginx -c DIR/mock.conf -s stop
lab_mock() {
  local d=$1
  mkdir -p "$d/mock-tmp"
  sed -e "s#/tmp/bench-run-[a-z0-9_]*/mock-nginx-tmp#$d/mock-tmp#g" -e "s#/tmp/bench-run-[a-z0-9_]*/#$d/#g" \
    "$(ls -t /tmp/bench-run-*/mock-nginx.conf | head -1)" > "$d/mock.conf"
  nginx -c "$d/mock.conf"
  lab_api_yaml "$d" 18080
}

# lab_api_yaml DIR PORT: write DIR/api.yaml pointing llm-proxy at an upstream on PORT.
lab_api_yaml() {
  cat > "$1/api.yaml" <<YAML
default_api: openai
apis:
  openai:
    base_url: http://127.0.0.1:$2
    allowed_endpoints: [/v1/chat/completions, /v1/models]
    allowed_methods: [GET, POST]
YAML
}

# lab_sse DIR: start the harness's streaming mock (port 18081; CHUNKS chunks, default 20, INTERVAL
# ms apart, default 10) and write DIR/api.yaml pointing llm-proxy at it; sets LAB_SSE_PID.
lab_sse() {
  local d=$1 here
  here=$(dirname "${BASH_SOURCE[0]}")
  mkdir -p "$d"
  "$here/../.venv/bin/python" "$here/../../shared/bench/sse_mock.py" --port 18081 --key $LAB_UPSTREAM_KEY \
    --chunks "${CHUNKS:-20}" --interval-ms "${INTERVAL:-10}" > "$d/sse.log" 2>&1 &
  LAB_SSE_PID=$!
  lab_api_yaml "$d" 18081
}

# lab_token URL: wait for the llm-proxy server at URL, create a project holding the mock's key and
# print a token for it.
lab_token() {
  local u=$1 m=$LAB_MANAGEMENT_TOKEN p
  for _ in $(seq 100); do curl -sf "$u/health" >/dev/null && break; sleep 0.2; done
  p=$(curl -sf -X POST "$u/manage/projects" -H "Authorization: Bearer $m" -H 'Content-Type: application/json' \
        -d "{\"name\":\"b\",\"api_key\":\"$LAB_UPSTREAM_KEY\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -sf -X POST "$u/manage/tokens" -H "Authorization: Bearer $m" -H 'Content-Type: application/json' \
    -d "{\"project_id\":\"$p\",\"duration_minutes\":600}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

# lab_llm_proxy CHECKOUT DIR DATA_DIR PORT COMMAND...: run COMMAND (the server, or a tool wrapping it)
# in place of this shell, with the settings of a lab server (DIR/api.yaml, a SQLite store in DATA_DIR)
# and CHECKOUT's own config/prices.yaml (a build of another version may not read this one's).
lab_llm_proxy() {
  local checkout=$1 d=$2 data=$3 port=$4; shift 4
  exec env API_CONFIG_PATH=$d/api.yaml DATABASE_URL=sqlite:///$data/proxy.db DATA_DIR=$data \
    MANAGEMENT_TOKEN=$LAB_MANAGEMENT_TOKEN LISTEN_ADDR=127.0.0.1:$port LOG_LEVEL=warning LOG_FORMAT=json \
    PRICES_PATH=$checkout/config/prices.yaml "$@"
}

# lab_build_server CHECKOUT DIR PORT: start, in the background, an llm-proxy server running
# CHECKOUT's code (on this checkout's .venv, through PYTHONPATH) on PORT, with DIR/api.yaml, its data
# and log in DIR/PORT; sets LAB_BUILD_PID (the server's pid).
lab_build_server() {
  local build here
  build=$(cd "$1" && pwd) here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mkdir -p "$2/$3"
  (PYTHONPATH=$build lab_llm_proxy "$build" "$2" "$2/$3" "$3" "$here/.venv/bin/llm-proxy" server \
    > "$2/$3/server.log" 2>&1) &
  LAB_BUILD_PID=$!
}

# lab_servers CHECKOUT DIR UPSTREAM_URL: start the llm-proxy server of CHECKOUT (port 18095, with
# DIR/api.yaml) and pyfloor (port 18097, PYFLOOR_VENV's python) in front of UPSTREAM_URL, and set
# LAB_SERVER_PID, LAB_EVENTS_PID, LAB_PYFLOOR_PID and LAB_TOKEN (a token of the server's).
LAB_PYFLOOR_TOKEN=sk-pyfloor-bench-0123456789abcdef
lab_servers() {
  local checkout=$1 d=$2 upstream=$3
  lab_llm_proxy $checkout $d $d 18095 "$checkout/.venv/bin/llm-proxy" server > "$d/server.log" 2>&1 &
  LAB_SERVER_PID=$!
  "${PYFLOOR_VENV:-/tmp/perf-anchors/pyfloor-venv}/bin/python" "$checkout/../shared/bench/anchors/pyfloor.py" \
    --port 18097 --upstream "$upstream" --upstream-key $LAB_UPSTREAM_KEY --token $LAB_PYFLOOR_TOKEN > "$d/pyfloor.log" 2>&1 &
  LAB_PYFLOOR_PID=$!
  LAB_TOKEN=$(lab_token http://127.0.0.1:18095)
  LAB_EVENTS_PID=$(pgrep -P $LAB_SERVER_PID -f events_process || true)
}

# lab_ticks PID: the CPU time (user + system) of PID so far, in clock ticks; lab_user_ticks PID: user only.
lab_ticks() { awk '{print $14+$15}' /proc/$1/stat; }
lab_user_ticks() { awk '{print $14}' /proc/$1/stat; }

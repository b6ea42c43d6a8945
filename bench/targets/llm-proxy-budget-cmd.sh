#!/bin/bash
# PROXY_CMD for the budgeted llm-proxy targets (llm-proxy-budget-redis.env, llm-proxy-budget-store.env):
# the checkout's server, as anchors/llm-proxy-cmd.sh starts it, plus the settings a budgeted token needs.
# Env: LLM_PROXY_CHECKOUT (default: where run.sh was started), LLM_PROXY_BENCH_PORT (PROXY_URL must match),
# LLM_PROXY_BENCH_REDIS_PORT (set: start a private redis-server there and keep budget holds in it;
# unset or empty: holds in the SQLite store), LLM_PROXY_SERVER_ARGS (extra server flags).
set -eu
checkout=${LLM_PROXY_CHECKOUT:-${BENCH_CALLER_DIR:-$PWD}}
port=${LLM_PROXY_BENCH_PORT:?}
redis_port=${LLM_PROXY_BENCH_REDIS_PORT:-}
# One scratch dir per target and phase: the harness starts each target twice (json, stream).
d=$BENCH_RUN_DIR/${PROXY_NAME:-llm-proxy-budget-$port}-$BENCH_PHASE
mkdir -p "$d"
cat >"$d/api.yaml" <<YAML
default_api: openai
apis:
  openai:
    base_url: $MOCK_UPSTREAM_URL
    allowed_endpoints: [/v1/chat/completions, /v1/models]
    allowed_methods: [GET, POST]
YAML
# PRICES_PATH is absolute: the harness runs this in its run dir, where the default (relative)
# config/prices.yaml does not exist, and a budgeted token is refused for a model without a price.
export API_CONFIG_PATH=$d/api.yaml DATABASE_URL=sqlite:///$d/proxy.db DATA_DIR=$d \
       PRICES_PATH=$checkout/config/prices.yaml \
       MANAGEMENT_TOKEN=${LLM_PROXY_BENCH_MGMT:-mgmt-bench-0123456789abcdef} \
       LISTEN_ADDR=127.0.0.1:$port LOG_LEVEL=warning LOG_FORMAT=json

if [ -z "$redis_port" ]; then
  # Store ledger: holds are one transaction on the token's row in SQLite. The default bus
  # (memory) is set explicitly so that an LLM_PROXY_EVENT_BUS in the caller's env can't leak in.
  export LLM_PROXY_EVENT_BUS=memory
  exec "$checkout/.venv/bin/llm-proxy" server ${LLM_PROXY_SERVER_ARGS:-}
fi

# Redis ledger: the server only uses Redis (budget holds, rpm windows, events) when the event bus
# is "redis"; REDIS_URL alone changes nothing (llm_proxy/runtime/app.py).
export LLM_PROXY_EVENT_BUS=redis REDIS_URL=redis://127.0.0.1:$redis_port/0
# A redis already answering on the port (left over from another run) would hold stale state.
if redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  echo "llm-proxy-budget-cmd.sh: port $redis_port already answers as redis; stop it first" >&2
  exit 1
fi
rpid='' spid=''
# No `exec` here: this shell stays to stop both children, on SIGTERM/SIGINT from the harness (or
# PR_SET_PDEATHSIG, which reaches this shell only) and when either child exits. The server goes
# first, so the events it drains at shutdown (and their budget settlements) still find Redis.
cleanup() {
  trap - TERM INT EXIT
  if [ -n "$spid" ]; then kill -TERM "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true; fi
  if [ -n "$rpid" ]; then kill -TERM "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true; fi
}
trap 'exit 143' TERM
trap 'exit 130' INT
trap cleanup EXIT
# Redis runs in its own session, so the harness's SIGTERM to our process group doesn't stop it
# before the server; --pdeathsig stops it should this shell be SIGKILLed. Nothing is persisted
# (--save '' --appendonly no): every start begins from an empty Redis.
setsid setpriv --pdeathsig TERM redis-server --bind 127.0.0.1 --port "$redis_port" --save '' \
  --appendonly no --dir "$d" --logfile "$d/redis.log" &
rpid=$!
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  kill -0 "$rpid" 2>/dev/null || { echo "redis-server exited; see $d/redis.log" >&2; exit 1; }
  sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null
"$checkout/.venv/bin/llm-proxy" server ${LLM_PROXY_SERVER_ARGS:-} &
spid=$!
# Whichever exits first ends the target (the EXIT trap stops the other).
wait -n "$rpid" "$spid"

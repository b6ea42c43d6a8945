#!/bin/bash
# PROXY_SETUP for the budgeted llm-proxy targets: a project holding the mock's key and a token with a
# budget, created through the management API; the token is printed last (the harness uses the last line).
# LLM_PROXY_BENCH_BUDGET_USD (default 1000000, the API's maximum: the c=64 phase never spends it;
# empty: no budget, an unlimited token on the same server settings).
set -eu
u=${PROXY_URL:?}
m=${LLM_PROXY_BENCH_MGMT:-mgmt-bench-0123456789abcdef}
budget=${LLM_PROXY_BENCH_BUDGET_USD-1000000}
limit=${budget:+,\"budget_usd\":$budget}
p=$(curl -sf -X POST "$u/manage/projects" -H "Authorization: Bearer $m" -H 'Content-Type: application/json' \
      -d "{\"name\":\"bench-$RANDOM\",\"api_key\":\"$MOCK_UPSTREAM_KEY\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
t=$(curl -sf -X POST "$u/manage/tokens" -H "Authorization: Bearer $m" -H 'Content-Type: application/json' \
      -d "{\"project_id\":\"$p\",\"duration_minutes\":600$limit}")
# The token's id on stderr, for GET /manage/tokens/{id} (spent_usd) when run by hand.
echo "$t" | python3 -c 'import json,sys; t=json.load(sys.stdin); print("token id", t["id"], "budget_usd", t["budget_usd"], file=sys.stderr); print(t["token"])'

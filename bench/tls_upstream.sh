#!/bin/bash
# tls_upstream.sh: what the proxy adds in front of a TLS upstream, as OpenAI is reached. The bench's
# nginx mock (the config of the latest /tmp/bench-run-*: run ../shared/bench/run.sh once first) is
# served on 19080 over TLS (a self-signed certificate that llm-proxy trusts through SSL_CERT_FILE)
# and on 19081 in plain text; in front of it llm-proxy (19095 to the TLS port, 19096 to the plain
# one) and nginx's proxy_pass (19090, TLS to the upstream, keep-alive, sessions reused). wrk at c=1
# and c=64 against each and against the mock directly, ROUNDS rounds (default 3), the targets'
# order reversed every other round. Prints, per round, p50 and p99 at c=1 and requests/s at c=64,
# and the server's and its events process's CPU µs per request at c=64.
#   bash bench/tls_upstream.sh [ROUNDS]
set -eu
rounds=${1:-3}
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$checkout/../shared/bench
source "$checkout/bench/lab.sh"
d=/tmp/tls-upstream; rm -rf $d; mkdir -p $d/mock-tmp $d/proxy-tmp $d/tls $d/plain
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout $d/key.pem -out $d/cert.pem 2>/dev/null
sed -e "s#/tmp/bench-run-[a-z0-9_]*/mock-nginx-tmp#$d/mock-tmp#g" -e "s#/tmp/bench-run-[a-z0-9_]*/#$d/#g" \
  -e "s#listen 127.0.0.1:18080 backlog=4096;#listen 127.0.0.1:19080 ssl backlog=4096; listen 127.0.0.1:19081 backlog=4096; ssl_certificate $d/cert.pem; ssl_certificate_key $d/key.pem;#" \
  "$(ls -td /tmp/bench-run-* | head -1)/mock-nginx.conf" > $d/mock.conf
grep -q 19080 $d/mock.conf || { echo "the mock's listen line was not found in $d/mock.conf" >&2; exit 1; }
proxy_key=sk-tls-bench-proxy-0123456789abcdef
user=""; [ "$(id -u)" = 0 ] && user="user root root;"
cat > $d/proxy.conf <<NGINX
$user
worker_processes 1;
error_log $d/proxy.error.log warn;
pid $d/proxy.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
$(for k in client_body proxy fastcgi uwsgi scgi; do echo "  ${k}_temp_path $d/proxy-tmp/$k;"; done)
  upstream mock { server 127.0.0.1:19080; keepalive 128; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:19090 backlog=4096;
    location / {
      if (\$http_authorization != "Bearer $proxy_key") { return 401; }
      proxy_pass https://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $LAB_UPSTREAM_KEY";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $d/cert.pem;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
NGINX
nginx -c $d/mock.conf
nginx -c $d/proxy.conf
trap 'kill ${tls_pid:-} ${plain_pid:-} 2>/dev/null; nginx -c $d/mock.conf -s stop 2>/dev/null; nginx -c $d/proxy.conf -s stop 2>/dev/null || true' EXIT
lab_api_yaml $d/tls 19080; sed -i "s#http://127.0.0.1:19080#https://127.0.0.1:19080#" $d/tls/api.yaml
lab_api_yaml $d/plain 19081
(SSL_CERT_FILE=$d/cert.pem lab_llm_proxy $checkout $d/tls $d/tls 19095 "$checkout/.venv/bin/llm-proxy" server > $d/tls/server.log 2>&1) &
tls_pid=$!
(lab_llm_proxy $checkout $d/plain $d/plain 19096 "$checkout/.venv/bin/llm-proxy" server > $d/plain/server.log 2>&1) &
plain_pid=$!
tls_token=$(lab_token http://127.0.0.1:19095)
plain_token=$(lab_token http://127.0.0.1:19096)
tls_events=$(pgrep -P $tls_pid -f events_process || true)
hz=$(getconf CLK_TCK)
# target: name url token server-pid events-pid
targets=(
  "direct-plain http://127.0.0.1:19081 $LAB_UPSTREAM_KEY - -"
  "direct-tls https://127.0.0.1:19080 $LAB_UPSTREAM_KEY - -"
  "nginx-tls http://127.0.0.1:19090 $proxy_key - -"
  "llm-proxy-plain http://127.0.0.1:19096 $plain_token $plain_pid -"
  "llm-proxy-tls http://127.0.0.1:19095 $tls_token $tls_pid $tls_events"
)
wrk_json() { # url token conns threads
  BENCH_TOKEN=$2 wrk -t$4 -c$3 -d10s -s $shared/wrk_post.lua $1/v1/chat/completions | grep WRKJSON | sed 's/WRKJSON //'
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
for t in "${targets[@]}"; do set -- $t; BENCH_TOKEN=$3 wrk -t1 -c8 -d2s -s $shared/wrk_post.lua $2/v1/chat/completions >/dev/null; done
for round in $(seq "$rounds"); do
  order=("${targets[@]}")
  if [ $((round % 2)) = 0 ]; then order=(); for ((i=${#targets[@]}-1; i>=0; i--)); do order+=("${targets[$i]}"); done; fi
  for t in "${order[@]}"; do
    set -- $t
    c1=$(wrk_json $2 $3 1 1)
    before=0; [ "$4" != - ] && before=$(lab_ticks $4)
    ebefore=0; [ "$5" != - ] && ebefore=$(lab_ticks $5)
    c64=$(wrk_json $2 $3 64 2)
    reqs=$(echo "$c64" | field requests)
    cpu=""
    [ "$4" != - ] && cpu=" server_cpu_us=$(python3 -c "print(round(($(lab_ticks $4)-$before)/$hz*1e6/$reqs,1))")"
    [ "$5" != - ] && cpu="$cpu events_cpu_us=$(python3 -c "print(round(($(lab_ticks $5)-$ebefore)/$hz*1e6/$reqs,1))")"
    printf '%-16s round %s  c=1 p50 %4sus p99 %5sus  c=64 %6s req/s%s\n' "$1" "$round" \
      "$(echo "$c1" | field p50_us)" "$(echo "$c1" | field p99_us)" "$((reqs / 10))" "$cpu"
  done
done

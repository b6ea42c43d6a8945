# syntax=docker/dockerfile:1
# Build stage: a wheel-installed virtualenv, so the runtime image needs no compiler.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/llm-proxy
COPY pyproject.toml README.md ./
COPY llm_proxy ./llm_proxy
COPY dispatcher ./dispatcher
COPY admin_ui ./admin_ui
RUN /opt/llm-proxy/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/llm-proxy/bin/pip install --no-cache-dir '.[cloudwatch]'

# Runtime stage: the same `llm-proxy server` that `make run` starts, as a non-root user.
# The same image runs `llm-proxy migrate` and `llm-proxy dispatcher` (see docker-compose.yml and
# the Helm chart under deploy/helm/llm-proxy).
FROM python:3.11-slim
# tini as PID 1: it reaps what a dead process leaves behind (with --workers, the events process of
# a worker that died is adopted by PID 1) and hands SIGTERM to the server, which as PID 1 itself
# would ignore it until its handlers are installed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llmproxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin llmproxy
WORKDIR /app
COPY --from=build /opt/llm-proxy /opt/llm-proxy
COPY config ./config
# Private from the start (0700, the server's user): a named volume begins as a copy of this
# directory, mode included, and a dispatcher's never passes through the server's start, which
# tightens DATA_DIR.
RUN install -d -m 0700 -o 10001 -g 10001 /app/data
ENV PATH=/opt/llm-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    LISTEN_ADDR=0.0.0.0:8080 \
    DATA_DIR=/app/data \
    DATABASE_URL=sqlite:////app/data/llm-proxy.db \
    API_CONFIG_PATH=/app/config/api_providers.yaml \
    LOG_FORMAT=json
VOLUME ["/app/data"]
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# The check reads LISTEN_ADDR exactly as the server does (its option, its parser, its bind's name
# resolution), so a container started with another LISTEN_ADDR stays healthy and one the server
# refuses is not reported healthy: a wildcard address is reached through loopback. It connects
# directly: HTTP_PROXY is meant for upstream traffic and would otherwise carry the check away.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-m", "llm_proxy.runtime.healthcheck"]
ENTRYPOINT ["tini", "--", "llm-proxy"]
CMD ["server", "--file-event-log", "/app/data/events.jsonl"]

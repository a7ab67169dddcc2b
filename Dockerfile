# gateway: a Stripe subscription gate in front of an existing web app.
#
#   docker build -t gateway .                       # wheels from PyPI (needs internet)
#   docker build -t gateway --target offline --build-context wheelhouse=DIR .
#                                                   # offline: wheels made by `pip wheel . -w DIR`
#
# BASE must be a Debian-like image with python3 (venv module included), useradd and
# ca-certificates; the tests build on a debootstrap stand-in for it (README, "Docker").
# Stage names are fixed (no ARG in FROM): builders skip the unused variant by name.
ARG BASE=python:3.11-slim

# ---- what every variant of the image shares: user, volume, settings, labels, healthcheck
FROM ${BASE} AS runtime
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

# ---- offline: the venv from the prebuilt wheels of the `wheelhouse` build context
FROM ${BASE} AS venv-offline
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheelhouse . /wheels/
RUN python3 -m venv /opt/gate \
    && /opt/gate/bin/pip install --no-index --find-links /wheels gateway \
    && /opt/gate/bin/gateway --help >/dev/null

FROM runtime AS offline
COPY --from=venv-offline /opt/gate /opt/gate

# ---- default: the venv from PyPI (only /opt/gate reaches the image: no sources or caches)
FROM ${BASE} AS venv-pypi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN python3 -m venv /opt/gate && /opt/gate/bin/pip install /src \
    && /opt/gate/bin/gateway --help >/dev/null

FROM runtime AS pypi
COPY --from=venv-pypi /opt/gate /opt/gate

# syntax=docker/dockerfile:1
# Switchboard: multi-stage build. The builder installs the package into a venv; the runtime
# image copies only that venv (no compiler, no pip cache, no sources beyond the package).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p relay api shared \
    && touch relay/__init__.py api/__init__.py shared/__init__.py \
    && pip install . \
    && pip uninstall -y switchboard
COPY relay ./relay
COPY api ./api
COPY shared ./shared
RUN pip install --no-deps . && python -m compileall -q /opt/venv

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data \
    PORT=8080
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --home-dir /data --no-create-home switchboard \
    && mkdir -p /data && chown switchboard:switchboard /data
COPY --from=builder /opt/venv /opt/venv
USER switchboard
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# Liveness only (/ready is for the load balancer); python instead of curl keeps the image small.
# Follows PORT and speaks TLS when the server does (self-signed certificates accepted: loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,ssl,sys,urllib.request as u; tls=bool(os.environ.get('TLS_CERT_FILE')); ctx=ssl._create_unverified_context() if tls else None; r=u.urlopen(('https' if tls else 'http')+'://127.0.0.1:'+os.environ.get('PORT','8080')+'/health', timeout=4, context=ctx); sys.exit(0 if r.status==200 else 1)"]
# SIGTERM drains (close 1001, flush, exit within SHUTDOWN_TIMEOUT_S): give it that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchboard"]
CMD ["serve"]

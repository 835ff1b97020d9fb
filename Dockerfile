# backupd: Redis backup sidecar.
# The base is a build argument so the same file builds from the official image on a normal
# machine and from a locally built Debian image where no registry is reachable, e.g.
#   --build-arg BASE_IMAGE=localhost/debian-py:bookworm
# Only `python3` is used: plain Debian images have no `python` alias.
ARG BASE_IMAGE=python:3.12-slim-bookworm
# The server that drills (`verify --drill`) and `verify --deep` run: take it from the image
# production runs, so that it loads what production writes (a 7.0 server cannot load the RDB 12
# of redis:7 = 7.4). Its Debian (glibc) variant: redis:8-bookworm, valkey/valkey:8-bookworm;
# an -alpine (musl) binary does not run here. compose.yaml passes its own Redis image.
ARG REDIS_IMAGE=redis:7-bookworm

# --- the drill server: only its binary is used ------------------------------------------------
FROM ${REDIS_IMAGE} AS drill-server

# --- builder: install backupd and its dependencies into a self-contained venv -------------------
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# The whole (dockerignored) context: pyproject.toml, README and the backupd package.
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/python3 -c "import backupd"

# --- final image --------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# uid/gid 999: the uid the official redis image writes dump.rdb (mode 0600) with.
RUN groupadd --system --gid 999 backupd \
 && useradd --system --uid 999 --gid 999 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin backupd \
 && install -d -o 999 -g 999 -m 0700 /backups \
 && install -d -m 0755 /etc/backupd
# redis-server (or valkey-server) from REDIS_IMAGE: a drill starts it as a throwaway server on
# a backup file; started as redis-check-rdb it is the check tool (the same binary picks its
# role by name). The build fails here when the binary does not run on this base.
COPY --from=drill-server /usr/local/bin/*-server /usr/local/bin/
WORKDIR /usr/local/bin
RUN if [ -e valkey-server ]; then server=valkey-server; else server=redis-server; fi \
 && if [ ! -e redis-server ]; then ln -s "$server" redis-server; fi \
 && ln -sf "$server" redis-check-rdb \
 && redis-server --version \
 && redis-check-rdb --version
# Same base in both stages, so the venv's interpreter symlink stays valid.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BACKUPD_CONFIG=/etc/backupd/config.toml
# Numeric so that runtimes can check "non-root" without reading /etc/passwd.
USER 999:999
WORKDIR /backups
# Health and metrics endpoint.
EXPOSE 9721
# start-period: the first health check may wait for Redis and the storage backend.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["backupd", "health"]
# backupd finishes or aborts the running backup on SIGTERM; give it a stop grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["backupd"]
CMD ["run"]

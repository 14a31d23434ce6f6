# zaiproxy container image: `docker build -t zaiproxy:0.1.0 .`
#
# Two stages: `build` compiles the Cython ledger (_native/_ledger.pyx) into a wheel with gcc;
# `runtime` installs only that wheel and its dependencies, so no compiler, no sources and no
# build tools reach the image. The wheel installs the folders _native/ and tui/ as
# zaiproxy._native and zaiproxy_tui (pyproject.toml): no other top-level import names.
# tests/test_container.py runs the build stage's steps outside Docker (same COPYs, same
# `pip wheel` command) and checks what comes out.

# ---- build: the wheel with the compiled extension -----------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc + libc headers for the extension (the python image ships Python.h).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The [build-system] requires of pyproject.toml (tests/test_container.py keeps them equal),
# installed once so `pip wheel` can build without an isolated environment.
RUN pip install "setuptools>=77" "wheel" "Cython>=3.0"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY _native/ _native/
COPY zaiproxy/ zaiproxy/
COPY tui/ tui/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /dist/ /tmp/dist/
# The wheel + its dependencies from PyPI; then fail the build (not the first start) if the
# native ledger does not import, as `make dev` does.
RUN pip install /tmp/dist/zaiproxy-*.whl \
 && rm -rf /tmp/dist \
 && python -c "import zaiproxy._native._ledger, zaiproxy._native._relay, zaiproxy._native._framing, zaiproxy._native._pump" \
 && groupadd --system --gid 10001 zaiproxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/zaiproxy --no-create-home \
      --shell /usr/sbin/nologin zaiproxy \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/zaiproxy

# Listen on every interface (the proxy's default is 127.0.0.1); the DuckDB history and the
# adaptive-rate state live on the volume. The ledger segment goes to /dev/shm (64 MB in
# Docker by default; the segment takes ~1.5 MB at the default 4096 rows).
ENV ZAIPROXY_HOST=0.0.0.0 \
    ZAIPROXY_HISTORY_PATH=/var/lib/zaiproxy/history.duckdb \
    ZAIPROXY_STATE_FILE=/var/lib/zaiproxy/adaptive-state.json
WORKDIR /var/lib/zaiproxy
VOLUME ["/var/lib/zaiproxy"]
USER 10001:10001
EXPOSE 8080

# No curl in the slim image: the image's own Python asks /health (200 while the proxy runs).
# The port follows ZAIPROXY_PORT / PORT like the proxy's own configuration.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('ZAIPROXY_PORT') or os.environ.get('PORT') or '8080'), timeout=4)"]

# SIGTERM drains: /ready turns 503, in-flight streams get ZAIPROXY_DRAIN_TIMEOUT (30 s), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["zaiproxy"]
CMD ["serve"]

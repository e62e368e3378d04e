# syntax=docker/dockerfile:1
# The Sogni coordinator (no GPU, no torch): docs/PARTNERS.md. Build from the repository root:
# `make image-coordinator`. Its offer-signing keystore and password come at run time as secret
# files or variables (docker/entrypoint.sh); the database and published epochs live on /data.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libgmp-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/sogni
ENV PATH=/opt/sogni/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sogni_protocol sogni_protocol
COPY sogni_wallet sogni_wallet
COPY sogni_net sogni_net
COPY sogni_chain sogni_chain
COPY sogni_node sogni_node
COPY sogni_coordinator sogni_coordinator
COPY sogni_app sogni_app
COPY sogni_devnet sogni_devnet
RUN pip install ".[coordinator]"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgmp10 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sogni \
 && useradd --uid 10001 --gid sogni --home-dir /home/sogni --create-home --shell /usr/sbin/nologin sogni \
 && mkdir -p /data \
 && chown -R sogni:sogni /data
COPY --from=build /opt/sogni /opt/sogni
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/sogni-entrypoint
ENV PATH=/opt/sogni/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SOGNI_COORDINATOR_DATA_DIR=/data \
    SOGNI_COORDINATOR_LISTEN=/ip4/0.0.0.0/tcp/4001 \
    SOGNI_COORDINATOR_HTTP_LISTEN=0.0.0.0:8080 \
    SOGNI_COORDINATOR_LOG_JSON=true
VOLUME ["/data"]
EXPOSE 4001 8080
USER 10001:10001
WORKDIR /home/sogni
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["sogni-entrypoint", "health", "coordinator"]
ENTRYPOINT ["sogni-entrypoint", "coordinator"]
CMD []

# syntax=docker/dockerfile:1
# The Sogni worker node for GPU clouds (Nosana, SaladCloud, any Docker host with an NVIDIA
# GPU): docs/PARTNERS.md. Build from the repository root: `make image-node`.
#
# CUDA comes from the PyTorch wheel: Linux `torch` wheels are CUDA builds that depend on the
# matching nvidia-* runtime wheels (cuBLAS, cuDNN, ...), so a Debian base is enough and the
# CUDA libraries always match the torch they were built for; the host supplies only the
# driver (NVIDIA Container Toolkit). TORCH_INDEX picks another CUDA build for older drivers
# (e.g. https://download.pytorch.org/whl/cu126). The `coreml` extra (macOS) is left out.
#
# Nothing secret is in this image: the keystore and its password are given at run time as
# secret files or variables (docker/entrypoint.sh); models and LoRAs live on the /data volume
# or in a derived image (FROM this one, see docs/PARTNERS.md).

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
# py-libp2p builds fastecdsa from source: a compiler and GMP headers, in this stage only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libgmp-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/sogni
ENV PATH=/opt/sogni/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: its own index decides the CUDA build.
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}"
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
RUN pip install ".[node,partner,quant]"

FROM ${PYTHON_IMAGE}
# libgmp10: fastecdsa at run time. No compiler, no curl: the health check is Python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgmp10 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sogni \
 && useradd --uid 10001 --gid sogni --home-dir /home/sogni --create-home --shell /usr/sbin/nologin sogni \
 && mkdir -p /data/models \
 && chown -R sogni:sogni /data
COPY --from=build /opt/sogni /opt/sogni
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/sogni-entrypoint
# Configuration by environment alone (SOGNI_NODE_*, docs/PARTNERS.md); none of it secret.
ENV PATH=/opt/sogni/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SOGNI_NODE_DATA_DIR=/data \
    SOGNI_NODE_HTTP_LISTEN=0.0.0.0:9860 \
    SOGNI_NODE_LOG_JSON=true \
    SOGNI_NODE_DEVICE=auto
VOLUME ["/data"]
EXPOSE 9860
USER 10001:10001
WORKDIR /home/sogni
STOPSIGNAL SIGTERM
# /healthz: 200 while up (degraded included), 503 while draining; the platform's restart
# policy decides what to do with a failing container.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["sogni-entrypoint", "health", "node"]
# exec form, and the script `exec`s the daemon: SIGTERM reaches Python, which finishes or
# hands back running jobs within SOGNI_NODE_SHUTDOWN_GRACE (give `docker stop -t` more).
ENTRYPOINT ["sogni-entrypoint", "node"]
CMD []

# syntax=docker/dockerfile:1
# spiffe-sidecar: one image for the injected sidecar (`spiffe-sidecar run`) and the admission webhook
# (`spiffe-sidecar webhook`). Build: docker build -t spiffe-sidecar:0.1.0 .   (the chart's default image)

# --- builder: build the wheel and the wheels of every dependency -------------------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY spire ./spire
RUN python -m pip wheel --wheel-dir /wheels .

# --- runtime: no compilers, no source tree, no pip cache; non-root ------------------------------------
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels spiffe-sidecar \
    && python -m pip uninstall -y pip setuptools wheel
# 65532: the conventional "nonroot" uid/gid (distroless); the injector's securityContext uses the same.
USER 65532:65532
WORKDIR /tmp
# The sidecar listens on 8443 (mTLS), 15021 (probes) and 127.0.0.1:15000 (admin); the webhook on 9443.
EXPOSE 8443 15021 9443
ENTRYPOINT ["spiffe-sidecar"]
CMD ["--help"]

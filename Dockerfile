# syntax=docker/dockerfile:1
# spiffe-sidecar: one image for the injected sidecar (`spiffe-sidecar run`) and the admission webhook
# (`spiffe-sidecar webhook`). Build: docker build -t spiffe-sidecar:0.1.0 .   (the chart's default image)
#
# Both stages use the same base, pinned by digest so that a rebuild gets the same bytes (a tag moves).
# python:3.11-slim-bookworm (linux/amd64 + arm64 index) as published on Docker Hub; this workspace has no
# registry access, so the digest was taken from a public record of it, not re-resolved here. To move it:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # then replace both digests below
# The image carries the sidecar only: not the development SPIRE (spire/), not py-spiffe, not grpcio.

# --- builder: build the wheel and the wheels of every dependency -------------------------------------
FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91 AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# spire/ is left out on purpose: the wheel then has no `spire` package (packages.find finds none).
COPY sidecar ./sidecar
RUN python -m pip wheel --wheel-dir /wheels .

# --- runtime: no compilers, no source tree, no pip cache; non-root ------------------------------------
FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels spiffe-sidecar \
    && rm -f /usr/local/bin/spiffe-spire \
    && python -m pip uninstall -y pip setuptools wheel
# 65532: the conventional "nonroot" uid/gid (distroless); the injector's securityContext uses the same.
USER 65532:65532
WORKDIR /tmp
# The sidecar listens on 8443 (mTLS), 15021 (probes), 15020 (read-only /metrics) and 127.0.0.1:15000 (admin);
# the webhook on 9443.
EXPOSE 8443 15021 15020 9443
ENTRYPOINT ["spiffe-sidecar"]
CMD ["--help"]

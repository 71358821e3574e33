# CUDA trainer image: torch (CUDA wheels) + rewardtune + kfp; runs cache-models, train, evaluate and export.
# Build from the repository root: python images/build.py trainer  (names, tags and build args: images/images.yaml).
# BASE_IMAGE defaults to the pinned CUDA base (tag and digest; refresh both with `docker buildx imagetools
# inspect <tag>`); any Debian-like base works: APT_PACKAGES installs python there (empty where the base has
# python3 + venv, as images.yaml's `local` profile's localhost/python:3.11-bookworm does).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rewardtune-trainer" \
      org.opencontainers.image.description="CUDA trainer image: torch (CUDA 12.8 wheels) + rewardtune + kfp; cache-models, train, evaluate" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/rewardtune/rewardtune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="rewardtune"

ARG APT_PACKAGES="python3=3.10.6-1~22.04* python3-venv=3.10.6-1~22.04* ca-certificates=2024*"
# The torch build is a build arg. Default: the CUDA build matching the base image's CUDA 12.8 (PyPI's default
# torch wheel is built for CUDA 13.0), from the cu128 index, which holds only builds for that CUDA.
# PIP_EXTRA_ARGS: extra pip options for every install (local wheels mounted into the build; empty on a registry).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_PACKAGES="torch==2.14.1+cu128 torchvision==0.29.1+cu128"
ARG PIP_EXTRA_ARGS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/rewardtune/.cache/huggingface \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RT_IN_IMAGE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=SC2086,DL3008
RUN if [ -n "${APT_PACKAGES}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ${APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /bin/bash rewardtune

# torch first and explicitly, so pip never picks a build by itself (same rule as the Makefile); versions are
# pinned in TORCH_PACKAGES / APT_PACKAGES (word-split on purpose: SC2086), which hadolint cannot see.
# hadolint ignore=SC2086,DL3013
RUN pip install --index-url "${TORCH_INDEX}" ${PIP_EXTRA_ARGS} ${TORCH_PACKAGES}

WORKDIR /opt/rewardtune
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY configs ./configs
# hadolint ignore=SC2086,DL3013
RUN pip install ${PIP_EXTRA_ARGS} "./[rewards,pipeline,report]" && rm -rf /opt/rewardtune/build

USER 1000:1000
WORKDIR /home/rewardtune
ENTRYPOINT ["rewardtune"]
CMD ["--help"]

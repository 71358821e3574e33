# Slim CPU image: rewardtune + kfp with CPU torch (no CUDA libraries); runs plan-arms, prepare-prompts,
# collect-arm, train-multinode (the TrainJob launcher), report and record-status.
# Build from the repository root: python images/build.py cpu  (names, tags and build args: images/images.yaml).
# BASE_IMAGE defaults to the pinned base (tag and digest; refresh both with `docker buildx imagetools inspect
# <tag>`); any Debian-like base with python3 + venv works: images.yaml's `local` profile builds on
# localhost/python:3.11-bookworm (../shared/tools/container-runtime.sh) with the machine's local wheels.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rewardtune-cpu" \
      org.opencontainers.image.description="Slim CPU image: rewardtune + kfp with CPU torch; prepare-prompts, train-multinode (the TrainJob launcher), report" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/rewardtune/rewardtune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="rewardtune"

# The torch build is a build arg: the CPU index's +cpu wheels by default (no CUDA libraries). TORCH_PACKAGES
# may drop torchvision (nothing the CPU stages run imports it). PIP_EXTRA_ARGS: extra pip options for every
# install, e.g. `--find-links /opt/wheels` for wheels mounted into the build (empty on a real registry).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_PACKAGES="torch==2.14.1+cpu torchvision==0.29.1+cpu"
ARG PIP_EXTRA_ARGS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/rewardtune/.cache/huggingface \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RT_IN_IMAGE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first and explicitly, so pip never picks a build by itself (same rule as the Makefile); versions are
# pinned in TORCH_PACKAGES (word-split on purpose: SC2086), which hadolint cannot see.
# hadolint ignore=SC2086,DL3013
RUN useradd --create-home --uid 1000 --shell /bin/bash rewardtune \
    && python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX}" ${PIP_EXTRA_ARGS} ${TORCH_PACKAGES}

WORKDIR /opt/rewardtune
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY configs ./configs
# hadolint ignore=SC2086,DL3013
RUN pip install ${PIP_EXTRA_ARGS} "./[pipeline,report]" && rm -rf /opt/rewardtune/build

USER 1000:1000
WORKDIR /home/rewardtune
ENTRYPOINT ["rewardtune"]
CMD ["--help"]

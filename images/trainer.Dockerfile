# CUDA trainer image: torch (CUDA wheels) + rewardtune + kfp; runs cache-models, train and evaluate.
# Build from the repository root: python images/build.py trainer  (names/tags come from images/images.yaml).
# The base is pinned by tag and digest; refresh both with `docker buildx imagetools inspect <tag>`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rewardtune-trainer" \
      org.opencontainers.image.description="CUDA trainer image: torch (CUDA 12.8 wheels) + rewardtune + kfp; cache-models, train, evaluate" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/rewardtune/rewardtune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="rewardtune"

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The CUDA build must match the base image's CUDA 12.8 (PyPI's default torch wheel is built for CUDA 13.0).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/rewardtune/.cache/huggingface \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.10.6-1~22.04* \
        python3-venv=3.10.6-1~22.04* \
        ca-certificates=2024* \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /bin/bash rewardtune

# torch first and explicitly, so pip never picks a build by itself (same rule as the Makefile): the +cu128
# local version pins the CUDA build, and the index holds only builds for that CUDA.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}+cu128" "torchvision==${TORCHVISION_VERSION}+cu128"

WORKDIR /opt/rewardtune
COPY pyproject.toml README.md ./
COPY shared ./shared
RUN pip install "./[rewards,pipeline,report]"

USER 1000:1000
WORKDIR /home/rewardtune
ENTRYPOINT ["rewardtune"]
CMD ["--help"]

# CUDA trainer image: torch (CUDA wheels) + rewardtune + kfp; runs cache-models, train and evaluate.
# Build from the repository root: python images/build.py trainer  (names/tags come from images/images.yaml).
# The base is pinned by tag and digest; refresh both with `docker buildx imagetools inspect <tag>`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
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

# torch first and explicitly, so pip never picks a build by itself (same rule as the Makefile).
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/rewardtune
COPY pyproject.toml README.md ./
COPY shared ./shared
RUN pip install "./[rewards,pipeline,report]"

USER 1000:1000
WORKDIR /home/rewardtune
ENTRYPOINT ["rewardtune"]
CMD ["--help"]

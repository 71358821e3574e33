# Slim CPU image: rewardtune + kfp with CPU torch; runs prepare-prompts and report.
# Build from the repository root: python images/build.py cpu  (names/tags come from images/images.yaml).
# The base is pinned by tag and digest; refresh both with `docker buildx imagetools inspect <tag>`.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rewardtune-cpu" \
      org.opencontainers.image.description="Slim CPU image: rewardtune + kfp with CPU torch; prepare-prompts, train-multinode (the TrainJob launcher), report" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/rewardtune/rewardtune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="rewardtune"

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/rewardtune/.cache/huggingface

RUN useradd --create-home --uid 1000 --shell /bin/bash rewardtune \
    && pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/rewardtune
COPY pyproject.toml README.md ./
COPY shared ./shared
RUN pip install "./[pipeline,report]"

USER 1000:1000
WORKDIR /home/rewardtune
ENTRYPOINT ["rewardtune"]
CMD ["--help"]

#!/usr/bin/env bash
# Fill ./.whl with the wheels that benchmarks/gpu_suite.sh needs and the GPU image lacks (it has torch,
# transformers, accelerate, peft, pandas; no diffusers, trl, pydantic, boto3). Run where PyPI is reachable;
# then carry .whl to the GPU machine (ignored by git). Versions: those the project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in diffusers==0.42.1 trl==0.23.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 boto3==1.44.8 botocore==1.44.8 jmespath==1.1.0 s3transfer==0.19.3; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls .whl

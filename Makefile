# The two commands a newcomer needs on a fresh machine (Debian, Python 3.11):
#   make repro   create .venv, install gsclip, run the whole DVC pipeline
#   make test    create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: repro test venv bench clean-venv

venv: $(STAMP)

# Reinstall whenever pyproject.toml changes. torch and torchvision come from the pinned pair in
# pyproject.toml; pip takes them from the machine's local wheel store where it has one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	. $(BIN)/activate && dvc repro

test: $(STAMP)
	. $(BIN)/activate && python -m pytest -q

bench: $(STAMP)
	. $(BIN)/activate && python -m gsclip_lib.benchmark --out benchmarks/results.json

clean-venv:
	rm -rf $(VENV)

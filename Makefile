# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Bring your own torch: TORCH_SPEC="torch==2.5.1" make demo (or pre-install torch in .venv).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so that the unpinned-range dependency in pyproject never pulls CUDA wheels.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/diffdissect demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# ruff (config in pyproject.toml; line length 120) and mypy over src/ (lenient config in pyproject.toml).
lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m ruff format --check src tests
	$(BIN)/python -m mypy src

clean:
	rm -rf $(VENV) runs/demo

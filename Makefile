# Both targets create .venv when it is missing and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned, so no dependency can pull a newer (CUDA) build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,onnx,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vqkit demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check vqkit tests benchmarks scripts
	$(BIN)/ruff format --check vqkit tests benchmarks scripts
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format vqkit tests benchmarks scripts
	$(BIN)/ruff check --fix vqkit tests benchmarks scripts

clean:
	rm -rf $(VENV) demo-out .pytest_cache

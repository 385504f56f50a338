# Set-up and entry points. Each target installs what it needs into .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo web-demo test test-wheel lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/seesr upscale examples/astronaut.png -o outputs/demo --prompt "$$(cat examples/astronaut.txt)" --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-wheel: $(STAMP)   # builds the wheel, installs it into a fresh venv, upscales offline (about a minute)
	$(BIN)/python -m pytest -q -m wheel

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs

web-demo: $(STAMP)
	$(BIN)/pip install --quiet -e ".[demo]"
	$(BIN)/seesr demo

# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make demo   -- the main job: demo data -> local S3 registry -> Prefect retraining flow (validate, train,
#                  evaluate, register, promote) -> predictor on 127.0.0.1:8080 answering a few requests;
#                  the S3 server and the predictor keep running (the demo prints how to stop them)
#   make test   -- the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/tocoad demo --out runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache

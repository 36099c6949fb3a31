# herd: `make train` and `make test` are all a newcomer needs; both create .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast lint format clean speech-corpus

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install herd with its dev tools

train: $(STAMP)  ## the staged recipe (language -> vision -> speech -> fusion) on the embedded data, CPU
	$(BIN)/herd-recipe $(ARGS)

test: $(STAMP)  ## the whole test suite
	$(BIN)/pytest -q $(ARGS)

test-fast: $(STAMP)  ## skip the tests that train models
	$(BIN)/pytest -q -m "not slow" $(ARGS)

speech-corpus: $(STAMP)  ## regenerate src/herd/assets/speech and its CTC units (needs: apt-get install espeak-ng)
	$(BIN)/python -m herd.data.make_speech_corpus
	$(BIN)/python -m herd.data.ctc_units

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:  ## remove caches and logs (keeps .venv)
	rm -rf logs .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

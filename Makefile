# labelling — `make sweep EXP=golgi_asym` and `make test` set everything up themselves.
SHELL := /bin/bash
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP   ?= golgi_asym
ARGS  ?=
export WANDB_SILENT ?= true

.PHONY: help install train sweep test test-all bench bench-quality bench-step app dashboard clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: EXP=<experiment> ARGS='key=value ...' (e.g. ARGS='optim.lr=1e-3 --storage postgresql://...')"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned ==2.13.0 so pip takes the CPU wheel on disk (find-links) instead of a CUDA build
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install labelling with all extras (idempotent)

train: $(STAMP)  ## train one experiment: make train EXP=nuclei_pearson ARGS='trainer.max_epochs=5'
	$(BIN)/python -m labelling train $(EXP) $(ARGS)

sweep: $(STAMP)  ## run or resume the Optuna sweep of EXP (default golgi_asym)
	$(BIN)/python -m labelling sweep $(EXP) $(ARGS)

# Without a display, the napari viewer test runs on a virtual screen when xvfb-run is installed.
HEADLESS := $(if $(DISPLAY),,$(shell command -v xvfb-run >/dev/null 2>&1 && echo "xvfb-run -a"))

test: $(STAMP)  ## lint + fast test suite (no slow tests)
	$(BIN)/ruff check labelling tests bench
	WANDB_MODE=offline $(HEADLESS) $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)  ## every test, including slow training and ../shared/data real-data tests
	WANDB_MODE=offline $(HEADLESS) $(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)  ## speed figures -> bench/report.md (+ report.json)
	$(BIN)/python bench/run.py $(ARGS)

bench-quality: $(STAMP)  ## ours vs a plain MONAI UNet loop, equal wall time, real data -> bench/quality.{json,md}
	$(BIN)/python bench/quality.py $(ARGS)

bench-step: $(STAMP)  ## ms per training step: our fit vs a plain loop over the same net -> bench/step_vs_loop.{json,md}
	$(BIN)/python bench/step_vs_loop.py $(ARGS)

app: $(STAMP)  ## Streamlit page: upload a brightfield image, see predictions, metrics, drift warning
	$(BIN)/streamlit run labelling/app/main.py --server.headless true $(ARGS)

# not echoed: STORAGE may hold a password (the command prints the URL redacted)
dashboard: $(STAMP)  ## optuna-dashboard of EXP's sweep on 127.0.0.1 (STORAGE=<RDB URL>, PORT=8080)
	@$(if $(STORAGE),LABELLING_STORAGE='$(STORAGE)') $(BIN)/python -m labelling dashboard $(EXP) --port $(or $(PORT),8080) $(ARGS)

clean:  ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache wandb

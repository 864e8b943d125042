# Two commands do all set-up on a fresh machine:
#   make demo   -- trains an EAT ensemble (3 Ray actors) on the embedded digits data, prints the metrics table
#   make test   -- runs the whole test suite (slow end-to-end tests included)
# Both create or refresh the local virtual environment .venv when pyproject.toml or constraints.txt
# changed. The venv gets the exact, verified versions of constraints.txt (pyproject.toml only states
# ranges, for `pip install rdml` next to a user's own torch) and every extra: Ray, MLflow, torchvision.

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
FAISS_EXTRA ?= cpu
CONSTRAINTS := constraints.txt
PIP := $(VENV)/bin/pip install --quiet -c $(CONSTRAINTS)

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, at the pinned release: here the local CPU wheel, never the multi-GB CUDA build
	$(PIP) torch
	$(PIP) -e ".[$(FAISS_EXTRA),all,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rdml ensemble --config digits-eat

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=15
	$(VENV)/bin/python -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts runs .pytest_cache build rdml.egg-info

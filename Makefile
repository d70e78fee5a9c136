# Two commands for a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# The venv is created once and reinstalled only when pyproject.toml or constraints.txt changes; constraints.txt
# pins every package to the versions the suite and the benchmark figures were measured with.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo lint test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,serve,sign,cluster,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipelines demo

# ruff (format and lint) and mypy over the tree, as the pre-commit hooks run them
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# the linters first (CI runs exactly this), then the suite: one test file per worker, a worker per core (at most
# 4); a file's module fixtures (trained models, servers) stay on one worker
test: lint
	$(PY) -m pytest -q --numprocesses=auto --maxprocesses=4 --dist=loadfile

bench: $(STAMP)
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.quality ../shared/data/magnetic_tile_defect/magnetic_tile --group-pattern 'num_(\d+)' --group-gap 2000

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

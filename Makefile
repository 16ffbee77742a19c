# Two commands on a fresh machine: `make quickstart` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test bench sample clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/raysemiseg quickstart

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(PY) benchmarks/train_overhead.py

clean:
	rm -rf runs mlruns .pytest_cache

# rebuild the bundled samples (raysemiseg/sample_data: coco-mini, coco-tiny, voc2012-sample) from ../shared/data (maintainers only)
sample: $(STAMP)
	$(VENV)/bin/raysemiseg data make-sample --shared ../shared/data --out raysemiseg/sample_data

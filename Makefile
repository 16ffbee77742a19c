# Two commands on a fresh machine: `make quickstart` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test bench sample clean

# pip byte-compiles every installed file on one core (torch, ray: ~70 s here); --no-compile + compileall on every core
# gives the same .pyc files (imports need them: PYTHONDONTWRITEBYTECODE=1 machines never cache them later) in about
# half that (fresh venv, warm pip cache, 2 cores: 147 s -> 76 + 32 s). A file compileall cannot compile (a package's
# deliberately broken test fixture) is left to be compiled at import, as pip leaves it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
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

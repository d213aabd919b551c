# Two commands do everything on a fresh machine:
#   make demo   create the environment, then run the demo pipeline (writes outputs/)
#   make test   create the environment, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@# DeepSpeed compiles its CPU shared-memory op on a machine's first run (about a minute): once, here
	$(PY) -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) tools/demo.py

# BENCH_ARGS=--quick for a short run; figures also go to outputs/bench.json
bench: $(STAMP)
	$(PY) tools/bench.py $(BENCH_ARGS)

clean:
	rm -rf outputs runs .pytest_cache

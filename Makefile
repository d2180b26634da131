# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build that these machines keep on local disk; an existing torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/sparsec demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

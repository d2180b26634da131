# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build that these machines keep on local disk; an existing torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/sparsec demo

test: setup test-browser
	$(PY) -m pytest -q tests

# The HTML report's screenshot test needs headless Chromium (Debian's package). Installing it needs
# root and the package registry; where either is missing that one test skips and says why.
test-browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: tests/test_html_report.py's screenshot test will skip"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

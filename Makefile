# Quick start: `make demo` and `make test` (see README).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: test demo deps venv test-unit test-netns test-interop test-vm clean

$(PY): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(PY)

venv: $(PY)

deps: venv
	bash tools/install-deps.sh

# Every tier in order; each must pass and collect at least one test.
test: deps
	@rc=0; for t in unit netns interop; do \
	  echo "== pytest -m $$t"; \
	  $(PYTEST) -m $$t -q -p no:cacheprovider || rc=1; \
	done; \
	echo "== vm tier (QEMU): pytest -m vm"; \
	$(PY) tools/vmrun.py -- $(PYTEST) -m vm -q -p no:cacheprovider -p no:hypothesispytest tests/vm || rc=1; \
	exit $$rc

test-unit test-netns test-interop: venv
	$(PYTEST) -m $(@:test-%=%) -q

test-vm: venv
	$(PY) tools/vmrun.py -- $(PYTEST) -m vm -q -p no:cacheprovider -p no:hypothesispytest tests/vm

demo: deps
	$(VENV)/bin/oe-agent mesh

clean:
	rm -rf $(VENV) build *.egg-info

# Quick start: `make demo` and `make test` (see README).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

# The vm tier: all of tests/vm in ONE QEMU boot (tools/vmrun.py prints its wall time).
# Collecting on the host first leaves pytest's rewritten test modules in __pycache__, which
# the guest (20-50x slower at python) then only reads.
VM_PYTEST := $(PYTEST) -m vm -q -p no:cacheprovider -p no:hypothesispytest tests/vm
VM_TIER := env -u PYTHONDONTWRITEBYTECODE $(PYTEST) --co -q -p no:cacheprovider \
  -p no:hypothesispytest tests/vm >/dev/null 2>&1; \
  $(PY) tools/vmrun.py --timeout 3000 -- $(VM_PYTEST)

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
	$(VM_TIER) || rc=1; \
	exit $$rc

test-unit test-netns test-interop: venv
	$(PYTEST) -m $(@:test-%=%) -q

test-vm: venv
	$(VM_TIER)

demo: deps
	$(VENV)/bin/oe-agent mesh

clean:
	rm -rf $(VENV) build *.egg-info

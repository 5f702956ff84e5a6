# Two commands: `make run` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test lint servers image-test bench chaos clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mtp run

servers:
	bash scripts/install-servers.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check framework sidecar tests bench tenant_template

test: $(STAMP) servers lint
	rm -f .coverage .coverage.*
	set +e; PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest \
	  --cov --cov-report=term --cov-report=xml \
	  --json-report --json-report-file=pytest_results.json $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi; \
	exit $$rc

image-test: $(STAMP)
	bash scripts/image-test.sh

bench: $(STAMP)
	bash bench/run_all.sh

# Faults under steady load for 10 minutes (bench/chaos.py): a table for docs/benchmarks.md.
chaos: $(STAMP) servers
	$(PY) bench/chaos.py --minutes $${CHAOS_MINUTES:-10}

clean:
	rm -rf $(VENV) build dist *.egg-info .coverage .coverage.* coverage.xml pytest_results.json

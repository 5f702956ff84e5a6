# Two commands: `make run` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Two test workers: most tests wait on real servers, so two processes on two cores cut
# the suite from ~10 to ~6.5 minutes. A file stays on one worker (module-scoped servers).
XDIST ?= -n 2 --dist loadfile

.PHONY: run test test-lowest lint servers image-test bench chaos clean

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
	  --json-report --json-report-file=pytest_results.json $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi; \
	exit $$rc

# The declared lower bounds, tested: a separate venv with every direct dependency at the
# lowest version pyproject.toml allows (uv's lowest-direct resolution), then the tests of
# the sidecar, the framework and their stores against real servers.
LOWEST ?= .venv-lowest
LOWEST_TESTS ?= tests/foundation tests/sidecar tests/framework tests/identity tests/redis \
  tests/ops tests/conformance tests/delivery/test_probe.py tests/delivery/test_probe_worker.py
test-lowest: $(STAMP) servers
	$(PY) -m pip install -q 'uv>=0.5'
	rm -rf $(LOWEST)
	$(VENV)/bin/uv venv -q --python $(PY) $(LOWEST)
	$(VENV)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct -e '.[dev]'
	set +e; PATH="$(CURDIR)/$(LOWEST)/bin:$$PATH" $(LOWEST)/bin/python -m pytest -q \
	  -p no:cacheprovider $(XDIST) $(LOWEST_TESTS); rc=$$?; \
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
	rm -rf $(VENV) $(LOWEST) build dist *.egg-info .coverage .coverage.* coverage.xml pytest_results.json

# cycles-lite: `make demo` and `make test` need nothing but python3.
# Dev tools (ruff, mypy, coverage, PyYAML, runcycles) go into throwaway venvs here.

PYTHON ?= python3
DEV_VENV ?= .venv-dev
BENCH_VENV ?= .venv-bench
TESTS = $(sort $(basename $(wildcard test_*.py)))
PYENV_ROOT ?= $(HOME)/.pyenv
PY_VERSIONS = 3.8 3.9 3.10 3.11 3.12 3.13
TEST_JOBS ?= 2
TEST_PROCS ?= 6
TEST_ALL_PROCS ?= 2
SHARED ?= ../shared
CONFORMANCE_VENV ?= .venv-conformance

.PHONY: demo examples test test-all lint bench conformance package clean

demo:
	$(PYTHON) examples/demo.py

# Every example runs against a local server it starts itself.
examples: demo
	$(PYTHON) examples/async_agent.py
	$(PYTHON) examples/lambda_handler.py

# Test classes run in TEST_PROCS processes at once (many tests wait on real time, so
# more processes than cores still pays); the output ends as unittest's does.
test:
	$(PYTHON) -W error tools/run_tests.py -j $(TEST_PROCS) $(TESTS)

# Every Python 3.8-3.13 found under pyenv (or on PATH as pythonX.Y), TEST_JOBS versions at
# a time, each in TEST_ALL_PROCS processes.
test-all:
	@pythons=""; for v in $(PY_VERSIONS); do \
	  py=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python 2>/dev/null | tail -n 1); \
	  [ -n "$$py" ] || py=$$(command -v python$$v || true); \
	  if [ -z "$$py" ]; then echo "== python $$v: not found, skipped"; else pythons="$$pythons $$py"; fi; \
	done; \
	[ -n "$$pythons" ] || { echo "no Python 3.8-3.13 found"; exit 1; }; \
	logs=$$(mktemp -d); \
	echo $$pythons | tr ' ' '\n' | xargs -P $(TEST_JOBS) -I{} sh -c \
	  'v=$$({} -c "import sys; print(\"%d.%d\" % sys.version_info[:2])"); \
	   if {} -W error tools/run_tests.py -j $(TEST_ALL_PROCS) $(TESTS) > '"$$logs"'/$$v.log 2>&1; then echo "== python $$v: ok ($$(grep "^Ran" '"$$logs"'/$$v.log))"; \
	   else echo "== python $$v: FAILED"; tail -n 60 '"$$logs"'/$$v.log; exit 1; fi'; \
	status=$$?; rm -rf "$$logs"; exit $$status

$(DEV_VENV)/.ok:
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/python -m pip install -q --disable-pip-version-check ruff mypy coverage pyyaml pytest
	touch $@

lint: $(DEV_VENV)/.ok
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/mypy --strict cycles_lite.py cycles_lite_server.py tools/cycles_lite_build.py

$(BENCH_VENV)/.ok:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check runcycles==0.5.3
	touch $@

bench: $(BENCH_VENV)/.ok
	$(BENCH_VENV)/bin/python bench_cycles_lite.py

$(CONFORMANCE_VENV)/.ok:
	$(PYTHON) -m venv $(CONFORMANCE_VENV)
	$(CONFORMANCE_VENV)/bin/python -m pip install -q --disable-pip-version-check pyyaml
	touch $@

# The protocol's official client-recovery runner (it needs PyYAML, from a throwaway
# venv) runs our adapter once per scenario; the adapter runs the mapped native tests.
# The runner comes from a checkout of https://github.com/runcycles/cycles-protocol:
# `make conformance PROTOCOL_DIR=/path/to/cycles-protocol`.
PROTOCOL_DIR ?= $(SHARED)/reference/official
CONFORMANCE_RUNNER = $(PROTOCOL_DIR)/scripts/run_client_recovery_conformance.py
conformance:
	@if [ ! -f "$(CONFORMANCE_RUNNER)" ]; then \
	  echo "make conformance: the official runner is not at $(CONFORMANCE_RUNNER)." >&2; \
	  echo "Check out https://github.com/runcycles/cycles-protocol and name it:" >&2; \
	  echo "  make conformance PROTOCOL_DIR=/path/to/cycles-protocol" >&2; \
	  exit 2; fi
	@$(MAKE) --no-print-directory $(CONFORMANCE_VENV)/.ok
	$(CONFORMANCE_VENV)/bin/python "$(CONFORMANCE_RUNNER)" \
	  --claim durable --report-json recovery-conformance.json \
	  --adapter $(PYTHON) conformance/cycles_lite_recovery_adapter.py

# The wheel (built by tools/cycles_lite_build.py) and `pip install .`, each in a throwaway
# venv: they import and run, and mypy --strict type-checks a user's script against the
# installed copy, outside the source tree. Neither writes into the source tree.
PKG_VENV ?= /tmp/cycles-lite-pkg
package: $(DEV_VENV)/.ok
	rm -rf build dist *.egg-info $(PKG_VENV) && $(PYTHON) -m venv $(PKG_VENV)
	$(PKG_VENV)/bin/python -m pip install -q --disable-pip-version-check build
	$(PKG_VENV)/bin/python -m build -q --wheel --outdir dist .
	for source in dist/*.whl .; do \
	  $(PKG_VENV)/bin/python -m pip uninstall -q -y cycles-lite 2>/dev/null; \
	  $(PKG_VENV)/bin/python -m pip install -q --disable-pip-version-check $$source && \
	  cp tools/typed_user.py $(PKG_VENV)/ && cd $(PKG_VENV) && \
	  bin/python -c "import cycles_lite, cycles_lite_server; print('installed from $$source:', cycles_lite.__file__)" && \
	  bin/python -c "import typing, cycles_lite as c; [typing.get_type_hints(getattr(c, n)) for n in c.__all__ if isinstance(getattr(c, n), type)]" && \
	  bin/python -m cycles_lite --version && bin/cycles-lite --version && \
	  bin/python -m cycles_lite_server --help > /dev/null && bin/cycles-lite-server --help > /dev/null && \
	  $(abspath $(DEV_VENV))/bin/mypy --strict --python-executable bin/python typed_user.py && \
	  cd $(CURDIR) || exit 1; \
	done
	@if [ -e build ] || ls -d *.egg-info > /dev/null 2>&1; then \
	  echo "the build wrote build/ or *.egg-info into the source tree"; exit 1; fi

clean:
	rm -rf $(DEV_VENV) $(BENCH_VENV) $(CONFORMANCE_VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache __pycache__

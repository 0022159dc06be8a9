# Two commands do all the set-up on a fresh machine:
#   make demo   - the WebSocket demo: three example backends + mplb + a client
#   make test   - the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

# The data plane's compiled modules (mplb/compiled.py lists them), built in place beside
# their .py files; MPLB_PURE_PYTHON=1 runs the .py files instead.
COMPILED_SOURCES := $(wildcard workers/*.pxd) $(patsubst %.pxd,%.py,$(wildcard workers/*.pxd))
# The end-to-end tests that run again on the pure-Python build.
E2E_TESTS := tests/test_http_e2e.py tests/test_websocket_e2e.py tests/test_bad_input.py \
	tests/test_long_lived.py tests/test_reload.py tests/test_tunnel.py \
	tests/test_balancing_e2e.py tests/test_tls.py tests/test_build.py tests/test_memory.py

.PHONY: demo test venv compiled system-deps bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

compiled: $(VENV)/.compiled

$(VENV)/.compiled: $(VENV)/.installed mplb/compiled.py $(COMPILED_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

# Debian packages the tests and benchmarks use (Chromium for the browser tests, wrk,
# nginx and HAProxy for the benchmark).  Installed only when missing and run as root.
system-deps:
	@scripts/install-system-deps

demo: compiled
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./examples/run_websocket_demo.sh

# The whole suite on the compiled build, then the end-to-end tests on the pure-Python one.
test: compiled system-deps
	MPLB_EXPECT_BUILD=compiled $(VENV)/bin/pytest -q -p no:cacheprovider tests
	MPLB_PURE_PYTHON=1 MPLB_EXPECT_BUILD=pure-python \
		$(VENV)/bin/pytest -q -p no:cacheprovider $(E2E_TESTS)

bench: compiled system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/bench

clean:
	rm -rf $(VENV) build *.egg-info workers/*.c workers/*.so

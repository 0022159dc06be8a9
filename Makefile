# Two commands do all the set-up on a fresh machine:
#   make demo   - the WebSocket demo: three example backends + mplb + a client
#   make test   - the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test venv system-deps bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Debian packages the tests and benchmarks use (Chromium for the browser tests, wrk,
# nginx and HAProxy for the benchmark).  Installed only when missing and run as root.
system-deps:
	@scripts/install-system-deps

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./examples/run_websocket_demo.sh

test: venv system-deps
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: venv system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/bench

clean:
	rm -rf $(VENV) build *.egg-info

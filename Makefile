# One command to run the server, one to run the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint browser services bench binary test-binary constraints

CONSTRAINTS := build/constraints.txt

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) server.py serve $(if $(CHAT_JWT_SECRET),,--insecure-dev) $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy --strict server.py protocol.py agent_client.py store.py chat/

# The page tests drive Debian's chromium: installed here when root or sudo allows it
# (CI runs as root); without it they are skipped outside CI and fail under CI=true.
browser:
	bash build/install-browser.sh || echo "no chromium: the page tests will be skipped"

# PostgreSQL and Redis for the several-instances tests (they start their own servers
# on loopback ports and stop them); without them those tests are skipped outside CI.
services:
	bash build/install-services.sh || echo "no postgresql/redis: those tests will be skipped"

# The contract's tests run twice: with the measured reaches beneath trio, trio-websocket
# and httpx on (the default), and with them off (CHAT_FAST_PATHS=0), so that the plain
# library paths they replace stay tested (docs/operations.md, "Fast paths").
CORE_TESTS := tests/test_chat.py tests/test_auth.py tests/test_bad_input.py tests/test_tools.py \
	tests/test_limits.py tests/test_heartbeat.py tests/test_upstream_faults.py tests/test_resume.py \
	tests/test_hostile.py tests/test_sessions_api.py tests/test_instances.py tests/test_chain_ignored.py

test: lint browser services
	$(PY) -m pytest -q
	CHAT_FAST_PATHS=0 $(PY) -m pytest -q $(CORE_TESTS)

# After a deliberate upgrade of a dependency: pin what is installed now.
constraints: $(VENV)/.installed-build
	{ sed -n '1,4p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | grep -v '^-e'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The single executable, dist/chat-agent-server (PyInstaller, pyproject's `build` group).
$(VENV)/.installed-build: $(VENV)/.installed
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,build]'
	touch $@

binary: $(VENV)/.installed-build
	PY=$(PY) bash build/build-binary.sh

# The smoke test against a built executable (tests/test_binary.py).
CHAT_BINARY ?= dist/chat-agent-server

test-binary: $(VENV)/.installed
	CHAT_BINARY=$(abspath $(CHAT_BINARY)) $(PY) -m pytest -q tests/test_binary.py

# The performance benchmark (bench/README.md): a few minutes, prints a table and a JSON line.
bench: $(VENV)/.installed
	$(PY) bench/bench.py $(ARGS)

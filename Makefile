# One command to run the server, one to run the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint browser bench binary test-binary

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) server.py serve $(if $(CHAT_JWT_SECRET),,--insecure-dev) $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy --strict server.py protocol.py agent_client.py store.py

# The page tests drive Debian's chromium: installed here when root or sudo allows it
# (CI runs as root); without it they are skipped outside CI and fail under CI=true.
browser:
	bash build/install-browser.sh || echo "no chromium: the page tests will be skipped"

test: lint browser
	$(PY) -m pytest -q

# The single executable, dist/chat-agent-server (PyInstaller, pyproject's `build` group).
$(VENV)/.installed-build: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,build]'
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

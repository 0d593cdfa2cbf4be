#!/usr/bin/env bash
# Build ONE self-contained executable, dist/chat-agent-server (Linux x86-64), from
# build/chat-agent-server.spec, then check that it starts (`--help`, `check-config`).
# Needs PyInstaller: `make binary` installs it (pyproject's optional group `build`).
# Work files go to build/out/ (ignored by git); PY overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

"$PY" -m PyInstaller --noconfirm --log-level WARN \
    --distpath dist --workpath build/out build/chat-agent-server.spec

BINARY=dist/chat-agent-server
"$BINARY" --help >/dev/null
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
env -u CHAT_CONFIG "$BINARY" check-config --insecure-dev --db "$scratch/chat.db" 2>/dev/null
size_mb="$(du -m "$BINARY" | cut -f1)"
echo "built $BINARY (${size_mb} MB, $(uname -m))"

#!/usr/bin/env bash
# Build ONE self-contained executable, dist/chat-agent-server (Linux x86-64), from
# build/chat-agent-server.spec, then check that it starts (`--help`, `check-config`).
# Needs PyInstaller: `make binary` installs it (pyproject's optional group `build`).
# Work files go to build/out/ (ignored by git); PY overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

# Level 0: the bundled modules (the PYZ) are stored, not deflated. PyInstaller compresses
# each module on its own; inflating the ~350 that are imported before the server listens
# took ~55 ms of every start on the 2-core VM (the spec stores everything else likewise:
# its "Start-up").
# --clean: PyInstaller would otherwise reuse a PYZ cached in build/out by an earlier
# build, whatever its compression.
PYINSTALLER_ZLIB_COMPRESSION_LEVEL=0 "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath dist --workpath build/out build/chat-agent-server.spec

BINARY=dist/chat-agent-server
"$BINARY" --help >/dev/null
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
env -u CHAT_CONFIG "$BINARY" check-config --insecure-dev --db "$scratch/chat.db" 2>/dev/null
size_mb="$(du -m "$BINARY" | cut -f1)"
echo "built $BINARY (${size_mb} MB, $(uname -m))"

#!/usr/bin/env bash
# apt-get install the packages named after the caller's name, as root or through sudo
# (CI runs as root). Shared by install-browser.sh and install-services.sh.
#     bash build/apt-install.sh CALLER PACKAGE...
set -euo pipefail

caller="$1"
shift

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "$caller: need root (or sudo) to apt-get install $*" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "$@"

#!/usr/bin/env bash
# Install the headless browser the page tests drive (tests/test_page.py): Debian's
# chromium, via apt-get. Idempotent: does nothing when /usr/bin/chromium exists.
# CI runs this as root; elsewhere it uses sudo when it is available.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

bash "$(dirname "$0")/apt-install.sh" install-browser chromium
/usr/bin/chromium --version

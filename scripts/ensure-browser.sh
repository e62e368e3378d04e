#!/usr/bin/env bash
# A headless browser for the status-page test (tests/e2e/test_status_page.py): Debian's
# chromium. Installed when this runs as root with apt-get; otherwise a warning, and that one
# test is skipped with a reason naming the package.
set -euo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (the status-page test loads /status in a headless browser)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "warning: chromium is not installed (sudo apt-get install chromium);" \
       "the status-page browser test will be skipped" >&2
fi

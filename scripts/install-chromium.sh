#!/usr/bin/env bash
# Debian's chromium for the browser tests (Playwright drives it; never `playwright install`).
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: chromium not found; browser tests will be skipped (install Debian's chromium)" >&2
    exit 0
fi
echo "installing chromium (Debian) for the browser tests ..."
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; browser tests will be skipped" >&2

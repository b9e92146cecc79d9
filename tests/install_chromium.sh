#!/usr/bin/env sh
# Headless Chromium for the report's browser test (tests/test_report.py). Idempotent; never fails the
# build: without it (no root, no package mirror) that one test is skipped and says why.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "note: could not install chromium; the report browser test will be skipped"
else
    echo "note: chromium is missing and installing it needs root (apt-get install chromium); the report browser test will be skipped"
fi
exit 0

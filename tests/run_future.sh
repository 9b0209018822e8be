#!/usr/bin/env bash
# `make test-future`: the whole suite with every process it starts living OFFSET in the future.
#
# libfaketime shifts the wall clock of pytest and of everything it starts (gateways, workers,
# redis, nginx, Prometheus, Playwright's driver), OpenSSL's certificate and CRL checks
# included, which the injectable clock cannot reach. A test that compares a fixed calendar
# date with something made "now", or material made with a lifetime that runs out (a
# certificate issued for a year, a CRL, a token, a posture report) fails here long before it
# would fail in CI. The monotonic clock moves by the same offset (leaving it alone makes
# libfaketime turn Python's absolute-deadline sleeps into EINVAL), so durations are unchanged.
# Chromium is the one process kept on real time (see browser_env() in tests/e2e/test_browser.py).
set -euo pipefail
cd "$(dirname "$0")/.."
offset=${1:-+400d}
shift || true
lib=$(find /usr/lib /usr/local/lib -name 'libfaketime.so.1' -path '*faketime*' 2>/dev/null | grep -v MT | head -n 1 || true)
if [ -z "$lib" ]; then
  echo "test-future: libfaketime is not installed (Debian package: faketime)" >&2
  exit 2
fi
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
export FAKETIME="$offset"
# Each process reads FAKETIME once; no file lookups per call.
export FAKETIME_NO_CACHE=0
now=$(date -u +%Y-%m-%dT%H:%MZ)
echo "test-future: the suite at ${now} (${offset} from today)"
exec .venv/bin/pytest -q -p no:cacheprovider "$@"

#!/bin/sh
# The browser that tests/test_serve_browser.py drives: Debian's chromium (Playwright's own browser download cannot
# be relied on). Installed with apt when this runs as root; otherwise it says how, and the browser test is skipped.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    exit $?
fi
echo "no chromium: the browser test will be skipped (install it with: sudo apt-get install chromium)" >&2
exit 0

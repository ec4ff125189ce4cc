#!/usr/bin/env bash
# Installs what the tests need and the Rust toolchain does not bring:
# redis-server (the Redis storage suite and system tests start a real one),
# python3 (the gopush-cluster compatibility client) and prometheus (promtool
# checks and unit-tests the alerts; the monitoring test runs a real server) and
# chromium (the JS client's demo page is tested in it). protoc comes from the
# protoc-bin-vendored crate, so no system package is needed for it.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# The JS client's demo page is tested in real headless Chromium.
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
# Node 20 or later runs the JS client's tests (its WebSocket); Debian's own
# nodejs is older, so it is not installed from here.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
  echo "Node.js 20 or later is needed for clients/js (make js-test); found: $(node --version 2>/dev/null || echo none)" >&2
  exit 1
fi
install_helm_lib() {
  # Helm's own library, for `helm lint` in make test (no Helm binary needed).
  python3 -c "import helm_sdkpy" 2>/dev/null && return 0
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "installing python3-pip with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  echo "installing helm-sdkpy with pip"
  # Debian's system Python refuses plain installs (PEP 668); this is a test tool.
  python3 -m pip install --quiet --ignore-requires-python --no-deps helm-sdkpy 2>/dev/null ||
    python3 -m pip install --quiet --ignore-requires-python --no-deps --break-system-packages helm-sdkpy
}
if [ ${#missing[@]} -eq 0 ]; then install_helm_lib; exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with sudo apt-get"
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "missing: ${missing[*]}. Install them (Debian: apt-get install -y ${missing[*]}) and run make test again." >&2
  exit 1
fi
install_helm_lib

#!/usr/bin/env bash
# make e2e-local: the e2e suite (e2e/) on a real Kubernetes control plane on this machine,
# the process harness in ../shared/k8s (real kube-apiserver and kube-controller-manager, pods as
# local processes in a private network namespace, the "image" mapped to target/release).
#
# Builds the release binaries (the image) and the e2e tests, brings the control plane up in its
# own RUN_DIR and network namespace, runs the suite inside that namespace (pod IPs are only
# reachable there), always tears the control plane down, and prints one line per scenario.
# Not part of make test: CI cannot build the two control-plane binaries.
#
# Env: K8S_HARNESS   the harness folder (default ../shared/k8s beside the repository)
#      E2E_RUN_DIR   state of this run (default target/e2e-local)
#      E2E_NETNS     network namespace (default pk-e2e)
#      E2E_TESTS     cargo test filter (default: every e2e test)
#      KEEP=1        leave the control plane up afterwards (tear down with cluster-down.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
K8S=${K8S_HARNESS:-$ROOT/../shared/k8s}
BIN=${XDG_CACHE_HOME:-$HOME/.cache}/k8s-apiserver/bin
export RUN_DIR=${E2E_RUN_DIR:-$ROOT/target/e2e-local}
export NETNS=${E2E_NETNS:-pk-e2e}

missing=()
[ -x "$K8S/cluster-up.sh" ] || missing+=("the process harness at $K8S (set K8S_HARNESS)")
APISERVER_BIN=${KUBE_APISERVER:-$BIN/kube-apiserver}
KCM_BIN=${KUBE_CONTROLLER_MANAGER:-$BIN/kube-controller-manager}
[ -x "$APISERVER_BIN" ] || missing+=("kube-apiserver at $APISERVER_BIN (or set KUBE_APISERVER)")
[ -x "$KCM_BIN" ] || missing+=("kube-controller-manager at $KCM_BIN (or set KUBE_CONTROLLER_MANAGER)")
command -v etcd >/dev/null || missing+=("etcd (apt-get install etcd-server)")
command -v kubectl >/dev/null || missing+=("kubectl (apt-get install kubernetes-client)")
command -v redis-server >/dev/null || missing+=("redis-server, run by the full example's Redis pod (apt-get install redis-server)")
python3 -c "import helm_sdkpy" 2>/dev/null || missing+=("Helm's library for Python (scripts/ensure-deps.sh installs helm-sdkpy)")
[ "$(id -u)" = 0 ] || missing+=("root (the harness makes a network namespace and mount namespaces)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "make e2e-local cannot run here; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  cat >&2 <<EOF
The two control-plane binaries are built from Kubernetes v1.28 sources, which no package
registry ships; $K8S/README.md says how (about 20 minutes on two cores):
  fetch the source tree, apt-get install -t bookworm-backports golang-1.21-go, then
  GOFLAGS=-mod=vendor CGO_ENABLED=0 go build -tags providerless -o $BIN/kube-apiserver ./cmd/kube-apiserver
  GOFLAGS=-mod=vendor CGO_ENABLED=0 go build -tags providerless -o $BIN/kube-controller-manager ./cmd/kube-controller-manager
EOF
  exit 1
fi

echo "== building the image (target/release) and the e2e tests"
cargo build --release --bins
cargo test --release -p pushcluster-e2e --no-run

export IMAGE_MAP="pushcluster=$ROOT/target/release,redis=$(dirname "$(command -v redis-server)")"
export FRESH=1
mkdir -p "$RUN_DIR"
down() {
  if [ "${KEEP:-}" = 1 ]; then
    echo "control plane left up: RUN_DIR=$RUN_DIR $K8S/cluster-down.sh"
  else
    "$K8S/cluster-down.sh" >/dev/null 2>&1 || true
  fi
}
trap down EXIT
echo "== control plane up (RUN_DIR=$RUN_DIR, network namespace $NETNS)"
eval "$("$K8S/cluster-up.sh")"

export E2E_BIN_DIR=target/release
export E2E_IMAGE=ghcr.io/pushcluster/pushcluster:e2e
export E2E_IMAGE_UPGRADE=ghcr.io/pushcluster/pushcluster:e2e-next
export E2E_REDIS_IMAGE=redis:7
# anyhow errors without a backtrace each: the scenario lines are what matter.
export RUST_LIB_BACKTRACE=0
LOG=$RUN_DIR/e2e.log
echo "== e2e suite (log: $LOG)"
set +e
# shellcheck disable=SC2086
$IN_NETNS cargo test --release -p pushcluster-e2e --offline --no-fail-fast -- --test-threads=1 --nocapture ${E2E_TESTS:-} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
echo
echo "== scenarios"
grep -E '^(PASS|FAIL) |^SKIP|^[0-9]+ passed, [0-9]+ failed|^test .* (ok|FAILED)$' "$LOG" || true
exit "$rc"

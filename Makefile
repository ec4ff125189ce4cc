# pushcluster — the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help run build release test js-test lint chart-lint monitoring-test crds deps clean image e2e e2e-local bench bench-compare

IMAGE ?= ghcr.io/pushcluster/pushcluster:0.1.0

help:
	@echo "make run    - build (release) and start a local cluster: web, message (embedded store), two comets"
	@echo "make test   - install what tests need (redis-server), lint, build, run every test"
	@echo "make lint   - cargo fmt --check, clippy -D warnings and the API docs without a broken link"
	@echo "make js-test - the JS client's tests (Node) and its demo page in headless Chromium"
	@echo "make chart-lint - helm lint of charts/pushcluster-operator (Helm's library)"
	@echo "make monitoring-test - promtool check and unit tests of the alerts (Debian's prometheus)"
	@echo "make crds   - regenerate crds/ and the chart's copy from the Rust types"
	@echo "make build  - debug build of every binary"
	@echo "make bench  - criterion benchmarks (ring, frames, store on both backends)"
	@echo "make bench-compare - the scenarios against pushcluster, push-floor, nginx+nchan, Node ws and pushpin; writes docs/benchmarks.md"
	@echo "make e2e    - end-to-end tests against the cluster of \$$KUBECONFIG (skips without one)"
	@echo "make e2e-local - the e2e suite on the local control plane of ../shared/k8s (needs its two binaries)"
	@echo "make image  - container image with every binary (needs Docker)"

deps:
	@scripts/ensure-deps.sh

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --bins -p push-message -p push-comet -p push-web -p pushctl

run: release
	BIN=target/release scripts/run-local.sh

# The docs check: an intra-doc link that rustdoc cannot resolve (or one from
# public docs to a private item) is a broken link in the generated docs.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps -q

# The operator's Helm chart, linted by Helm's own library.
chart-lint:
	python3 scripts/helm-lint.py charts/pushcluster-operator

# Regenerates crds/ (and the chart's copy) from the Rust types.
crds:
	$(CARGO) run -q -p push-operator --bin crdgen > crds/pushcluster.io_pushclusters.yaml
	cp crds/pushcluster.io_pushclusters.yaml charts/pushcluster-operator/crds/

# The alerts: promtool checks the rule file and runs its unit tests.
monitoring-test:
	promtool check rules charts/pushcluster-operator/files/prometheus-rules.yaml
	cd monitoring && promtool test rules rules-test.yaml

# System tests start the real binaries, so they are built first.
test: deps lint chart-lint monitoring-test build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --exclude pushcluster-e2e --no-fail-fast; \
	else \
		$(CARGO) test --workspace --exclude pushcluster-e2e --no-fail-fast; \
	fi
	$(MAKE) js-test

# The browser and Node client (clients/js) under Node's test runner, against
# the real binaries, and its demo page in headless Chromium (screenshot in
# target/test-output/chromium-demo.png).
js-test:
	cd clients/js && timeout --kill-after=30 900 npm test

# Benchmarks (not in CI): criterion for ring, frames, checks, tokens, and the
# store on both backends (Redis: a redis-server on a free port); then the
# load generator's scenarios S1-S5 on fresh release binaries, pushcluster only
# (bench/compare/run with SERVERS=pushcluster), printed as one report.
bench: deps
	$(CARGO) bench -p pushcluster-core --bench core
	$(CARGO) bench -p pushcluster-store --bench store
	$(CARGO) bench -p pushcluster-store --bench sweep
	SERVERS=pushcluster OUT=target/bench REPORT=target/bench/benchmarks.md bench/compare/run
	@cat target/bench/benchmarks.md

# The same scenarios against pushcluster and its peers (push-floor,
# nginx+nchan, Node ws) in one run; installs the peers (apt, npm) when missing
# and writes docs/benchmarks.md. Scale with the variables bench/compare/run lists.
bench-compare: deps
	bench/compare/run

# Container image with every binary (needs a Docker engine; none runs here).
image:
	docker build -t $(IMAGE) .

# Cluster end-to-end tests against $$KUBECONFIG; skips with a message when
# no cluster answers. Not part of make test.
e2e:
	$(CARGO) build --workspace --bins
	$(CARGO) test -p pushcluster-e2e -- --test-threads=1 --nocapture

# The e2e suite on the real control plane of ../shared/k8s (pods as local
# processes, the image mapped to target/release): brings it up, runs every
# scenario, always tears it down. Says what is missing when it cannot run.
e2e-local:
	scripts/e2e-local.sh

clean:
	$(CARGO) clean
	rm -rf .run

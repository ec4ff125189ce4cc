#!/usr/bin/env bash
# Starts a whole local pushcluster in the foreground: message (embedded store),
# two comets (shards 0 and 1) and web. Ctrl-C stops everything gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
mkdir -p .run/data
pids=()
stopping=0
stop() {
  [ "$stopping" = 1 ] && return
  stopping=1
  trap - INT TERM EXIT
  echo; echo "stopping pushcluster..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
  echo "stopped; stored messages are kept in .run/data"
}
trap stop INT TERM EXIT
start() { "$BIN/$1" --config "config/$2.yaml" & pids+=($!); }
start push-message message
for i in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/8070) 2>/dev/null && break; sleep 0.1; done
start push-comet comet-0
start push-comet comet-1
start push-web web
for i in $(seq 1 50); do curl -fs localhost:8092/readyz >/dev/null 2>&1 && break; sleep 0.1; done
cat <<MSG

pushcluster is running (web public :8090, admin :8091; comets :6968/:6969 and :16968/:16969).

Subscribe (another terminal):
  $BIN/pushctl sub alice
  # or any gopush-cluster client: ws://127.0.0.1:6968/sub?key=alice&heartbeat=30&ver=1
  #   (ask web first: curl 'localhost:8090/1/server/get?k=alice&p=1')
Push:
  curl -X POST 'localhost:8091/1/admin/push/private?key=alice&expire=60' -d '{"hi":1}'
  $BIN/pushctl push alice '{"hi":2}'
  $BIN/pushctl broadcast '{"news":"to everyone"}'
In a browser: http://127.0.0.1:8090/demo/?keys=alice,bob (the JS client, clients/js)
Offline messages:
  curl 'localhost:8090/1/msg/get?k=alice&m=0'
Metrics: curl localhost:8092/metrics (web), :6971 and :16971 (comets), :8071 (message)
API: curl localhost:8090/openapi.json

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
[ "$stopping" = 1 ] || { echo "a pushcluster process exited; stopping the rest"; stop; exit 1; }

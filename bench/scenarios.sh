#!/usr/bin/env bash
# Scenarios with the real release binaries on loopback, each on freshly
# started servers (a warm server reuses its heap and reports too little):
#   S1 idle density: CONNS WebSocket subscribers on one comet, RSS per connection.
#   S2 broadcast fan-out: FAN_CONNS subscribers on that comet (after S1), 100-byte
#      broadcasts from (a) 2 publishers x 2 in flight, (b) 16 x 1; deliveries
#      per server CPU-second.
#   S3 private push latency: KEYS subscribers on distinct keys, RATE pushes/s
#      for SECS seconds through web with the Redis store; latency from the
#      scheduled send time to delivery.
# Scale with CONNS, KEYS, RATE, SECS. Prints one line per scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
CONNS=${CONNS:-10000}
KEYS=${KEYS:-2000}
RATE=${RATE:-2000}
FAN_CONNS=${FAN_CONNS:-2000}
SECS=${SECS:-10}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1 100); do curl -fs "127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
sources=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"

# ---- S1: idle density on a fresh comet (message service alongside) ----
mp=$(port); mo=$(port)
"$BIN/push-message" --listen 127.0.0.1:$mp --ops-listen 127.0.0.1:$mo --data "$tmp/s1.redb" 2>"$tmp/s1-message.log" & pids+=($!)
wait_ready $mo
ws=$(port); tcp=$(port); rpc=$(port); ops=$(port)
"$BIN/push-comet" --shard 0 --shards 1 --ws-listen 127.0.0.1:$ws --tcp-listen 127.0.0.1:$tcp \
  --rpc-listen 127.0.0.1:$rpc --ops-listen 127.0.0.1:$ops --message-url http://127.0.0.1:$mp 2>"$tmp/s1-comet.log" & comet=$!; pids+=($comet)
wait_ready $ops
"$BIN/push-bench" idle --ws 127.0.0.1:$ws --conns "$CONNS" --sources $sources --server-pids $comet --hold 10

# ---- S2: broadcast fan-out through a web in front of that comet ----
pub=$(port); adm=$(port); wops=$(port)
printf 'public_listen: 127.0.0.1:%s\nadmin_listen: 127.0.0.1:%s\nops_listen: 127.0.0.1:%s\nmessage_url: http://127.0.0.1:%s\ncomets:\n  - { shard: 0, rpc: "http://127.0.0.1:%s", ws: "127.0.0.1:%s", tcp: "127.0.0.1:%s" }\n' \
  $pub $adm $wops $mp $rpc $ws $tcp > "$tmp/s2-web.yaml"
"$BIN/push-web" --config "$tmp/s2-web.yaml" 2>"$tmp/s2-web.log" & pids+=($!)
wait_ready $wops
"$BIN/push-bench" fanout --ws 127.0.0.1:$ws --admin http://127.0.0.1:$adm --conns "$FAN_CONNS" --publishers 2 --in-flight 2 \
  --seconds "$SECS" --sources $sources --server-pids $comet
"$BIN/push-bench" fanout --ws 127.0.0.1:$ws --admin http://127.0.0.1:$adm --conns "$FAN_CONNS" --publishers 16 --in-flight 1 \
  --seconds "$SECS" --sources $sources --server-pids $comet

# ---- S3: private push latency, Redis store, 2 comets, web ----
command -v redis-server >/dev/null || { echo "S3 needs redis-server (make test installs it)"; exit 1; }
rp=$(port)
redis-server --port $rp --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null & pids+=($!)
sleep 0.3
mp=$(port); mo=$(port)
"$BIN/push-message" --listen 127.0.0.1:$mp --ops-listen 127.0.0.1:$mo --redis-url redis://127.0.0.1:$rp/ 2>"$tmp/s3-message.log" & msg=$!; pids+=($msg)
wait_ready $mo
comets=""; comet_pids=""
for k in 0 1; do
  ws=$(port); tcp=$(port); rpc=$(port); ops=$(port)
  "$BIN/push-comet" --shard $k --shards 2 --ws-listen 127.0.0.1:$ws --tcp-listen 127.0.0.1:$tcp \
    --rpc-listen 127.0.0.1:$rpc --ops-listen 127.0.0.1:$ops --message-url http://127.0.0.1:$mp 2>"$tmp/s3-comet-$k.log" & p=$!; pids+=($p)
  wait_ready $ops
  comets="$comets  - { shard: $k, rpc: \"http://127.0.0.1:$rpc\", ws: \"127.0.0.1:$ws\", tcp: \"127.0.0.1:$tcp\" }"$'\n'
  comet_pids="$comet_pids${comet_pids:+,}$p"
done
pub=$(port); adm=$(port); wops=$(port)
printf 'public_listen: 127.0.0.1:%s\nadmin_listen: 127.0.0.1:%s\nops_listen: 127.0.0.1:%s\nmessage_url: http://127.0.0.1:%s\ncomets:\n%s' \
  $pub $adm $wops $mp "$comets" > "$tmp/web.yaml"
"$BIN/push-web" --config "$tmp/web.yaml" 2>"$tmp/s3-web.log" & web=$!; pids+=($web)
wait_ready $wops
"$BIN/push-bench" latency --web http://127.0.0.1:$pub --admin http://127.0.0.1:$adm --keys "$KEYS" --rate "$RATE" \
  --seconds "$SECS" --sources $sources --server-pids "$comet_pids,$msg,$web"

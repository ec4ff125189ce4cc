// The client against a local cluster of the real binaries (test/cluster.js):
// every acknowledged push reaches each subscription once and in mid order,
// across each comet killed (pushes go on) and restarted, and web restarted; an expired token is
// renewed through getToken.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { PushClient } from '../src/index.js';
import { BIN, LocalCluster, mintToken } from './cluster.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, ms, check) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

if (!existsSync(path.join(BIN, 'push-web'))) {
  throw new Error(`no push-web in ${BIN}: build the binaries first (cargo build --workspace --bins)`);
}

/** A subscription that records what it was handed. */
function follow(client, key, transport) {
  const got = { key, transport, mids: [], msgs: new Map(), resets: 0, errors: [] };
  got.sub = client.subscribe(key, {
    onMessage: (msg, { mid }) => {
      got.mids.push(mid);
      got.msgs.set(mid, msg);
    },
    onReset: () => got.resets++,
    onError: (e) => got.errors.push(e.message),
  });
  return got;
}

test('every message once and in mid order across comets killed and web restarted', { timeout: 120_000 }, async () => {
  const c = await LocalCluster.start();
  try {
    const ws = new PushClient({ url: c.webUrl, backoff: { initialMs: 50, maxMs: 1000 } });
    // No WebSocket on this platform: the client falls back to SSE.
    const sse = new PushClient({ url: c.webUrl, WebSocket: null, backoff: { initialMs: 50, maxMs: 1000 } });
    const follows = [
      follow(ws, 'js-alice', 'websocket'),
      follow(ws, 'js-bob', 'websocket'),
      follow(ws, 'js-carol', 'websocket'),
      follow(sse, 'js-dave', 'sse'),
      follow(sse, 'js-erin', 'sse'),
    ];
    await until('every subscription open', 10_000, () => follows.every((f) => f.sub.state === 'open'));
    for (const f of follows) assert.equal(f.sub.transport, f.transport);
    const acked = new Map(follows.map((f) => [f.key, []]));
    const total = 300;
    for (let n = 1; n <= total; n++) {
      const key = follows[n % follows.length].key;
      const mid = await c.push(key, { n });
      acked.get(key).push([mid, n]);
      // Each comet is killed, and pushes go on (web stores them) until
      // it is back: every subscription reconnects and reads them.
      if (n === 100) await c.stopProcess('comet-0', 'SIGKILL');
      if (n === 120) await c.startProcess('comet-0');
      if (n === 150) await c.stopProcess('comet-1', 'SIGKILL');
      if (n === 170) await c.startProcess('comet-1');
      if (n === 200) {
        await c.stopProcess('web', 'SIGTERM');
        await c.startProcess('web');
      }
      await sleep(5);
    }
    for (const f of follows) {
      const want = acked.get(f.key);
      await until(`${f.key} to have ${want.length} messages`, 30_000, () => f.mids.length >= want.length);
      assert.deepEqual(f.mids, want.map(([m]) => m), `${f.key} over ${f.transport}: mids once, in order`);
      for (const [mid, n] of want) assert.deepEqual(f.msgs.get(mid), { n }, `${f.key} mid ${mid}`);
      assert.equal(f.resets, 0);
    }
    for (const f of follows) {
      assert.ok(f.sub.stats.reconnects >= 1, `${f.key} never reconnected`);
      // A comet that is down is no reason to leave WebSocket.
      assert.equal(f.sub.transport, f.transport, `${f.key} changed transport`);
    }
    console.log(
      `pushed ${total}; per key ${follows.map((f) => `${f.key}/${f.transport}: ${f.mids.length} msgs, ${f.sub.stats.reconnects} reconnects, ${f.sub.stats.gapsFilled} read from storage`).join('; ')}`,
    );
    for (const f of follows) f.sub.close();
  } finally {
    await c.stop();
  }
});

test('a refused token is renewed through getToken, in a header, a subprotocol or the query', { timeout: 60_000 }, async () => {
  const secret = 'js-test-secret';
  const c = await LocalCluster.start({ subscriberSecret: secret });
  try {
    const asked = new Map();
    // The first token is already expired: the comet refuses it (-a, or
    // HTTP 401 on SSE), the client asks again and gets one that holds.
    const getToken = (key, { reason }) => {
      asked.set(key, [...(asked.get(key) || []), reason]);
      return mintToken(secret, key, reason === 'start' ? -10 : 3600);
    };
    const options = { url: c.webUrl, backoff: { initialMs: 50, maxMs: 500 }, getToken };
    const kinds = [
      // WebSocket subprotocol, and Authorization on /1/msg/get.
      ['js-token-ws', 'websocket', options],
      // Authorization on the SSE request.
      ['js-token-sse', 'sse', { ...options, WebSocket: null }],
      // token= everywhere, as gopush-cluster clients send it.
      ['js-token-query', 'websocket', { ...options, tokenIn: 'query' }],
    ];
    const follows = kinds.map(([key, transport, o]) => Object.assign(follow(new PushClient(o), key, transport), { options: o }));
    await until('the subscriptions open', 10_000, () => follows.every((f) => f.sub.state === 'open'));
    for (const f of follows) {
      assert.deepEqual(asked.get(f.key).slice(0, 2), ['start', 'expired'], f.key);
      assert.equal(f.sub.transport, f.transport, f.key);
    }
    for (const f of follows) {
      const first = await c.push(f.key, { hello: 1 });
      // The second is read from storage: the subscription's fetch carries
      // the token too.
      f.sub.close();
      const second = await c.push(f.key, { hello: 2 });
      const again = follow(new PushClient(f.options), f.key, f.transport);
      await until(`${f.key}: both messages`, 10_000, () => again.mids.length === 2);
      assert.deepEqual(again.mids, [first, second], f.key);
      again.sub.close();
    }
  } finally {
    await c.stop();
  }
});

test('pages of other origins may read web and the comets\' SSE (CORS)', { timeout: 30_000 }, async () => {
  const c = await LocalCluster.start();
  try {
    const origin = 'https://app.example.com';
    const comet = `http://127.0.0.1:${c.ports.comets[0].ws}`;
    for (const url of [`${c.webUrl}/1/msg/get?k=cors&m=0`, `${comet}/sub/sse?key=cors`]) {
      const pre = await fetch(url, {
        method: 'OPTIONS',
        headers: { origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization' },
      });
      assert.equal(pre.status, 204, url);
      assert.equal(pre.headers.get('access-control-allow-origin'), '*', url);
      assert.match(pre.headers.get('access-control-allow-headers'), /authorization/, url);
    }
    const get = await fetch(`${c.webUrl}/1/time/get`, { headers: { origin } });
    assert.equal(get.headers.get('access-control-allow-origin'), '*');
    assert.equal((await get.json()).ret, 0);
  } finally {
    await c.stop();
  }
});

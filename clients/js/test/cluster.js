// A local pushcluster of the real binaries for the tests: message (embedded
// store), two comets and web, as `make run` starts them, on free ports in a
// temporary directory. Processes can be killed and started again.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The repository root. */
export const ROOT = path.resolve(here, '../../..');
/** Where the binaries are: PUSHCLUSTER_BIN, else target/debug. */
export const BIN = process.env.PUSHCLUSTER_BIN || path.join(ROOT, 'target/debug');

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitListening(port, what, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      c.on('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A subscriber token for `key`, as the cluster's back ends mint them. */
export function mintToken(secret, key, seconds) {
  const expiry = Math.floor(Date.now() / 1000) + seconds;
  const tag = createHmac('sha256', secret).update(`${key}\n${expiry}`).digest('hex');
  return `${expiry}.${tag}`;
}

/** Every binary still running: killed when the test process exits, whatever failed. */
const live = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

export class LocalCluster {
  /** Starts it; `subscriberSecret` turns token checks on. */
  static async start({ subscriberSecret = null, adminToken = null, demo = false } = {}) {
    const c = new LocalCluster();
    c.dir = mkdtempSync(path.join(tmpdir(), 'pushcluster-js-'));
    c.secret = subscriberSecret;
    c.adminToken = adminToken;
    c.demo = demo;
    c.procs = {};
    const p = {};
    for (const name of ['msg', 'msgOps', 'pub', 'admin', 'webOps']) p[name] = await freePort();
    p.comets = [];
    for (let i = 0; i < 2; i++) {
      p.comets.push({ ws: await freePort(), tcp: await freePort(), rpc: await freePort(), ops: await freePort() });
    }
    c.ports = p;
    const y = (v) => (v === null ? 'null' : JSON.stringify(v));
    c.configs = {
      message: `listen: 127.0.0.1:${p.msg}\nops_listen: 127.0.0.1:${p.msgOps}\nstorage:\n  redis_url: null\n  path: ${c.dir}/messages.redb\n`,
      web:
        `public_listen: 127.0.0.1:${p.pub}\nadmin_listen: 127.0.0.1:${p.admin}\nops_listen: 127.0.0.1:${p.webOps}\n` +
        `message_url: http://127.0.0.1:${p.msg}\nadmin_token: ${y(adminToken)}\nsubscriber_secret: ${y(subscriberSecret)}\n` +
        (demo ? 'demo: true\n' : '') +
        `membership:\n  kind: static\ncomets:\n` +
        p.comets
          .map((k, i) => `  - { shard: ${i}, rpc: "http://127.0.0.1:${k.rpc}", ws: "127.0.0.1:${k.ws}", tcp: "127.0.0.1:${k.tcp}" }\n`)
          .join(''),
    };
    p.comets.forEach((k, i) => {
      c.configs[`comet-${i}`] =
        `shard: ${i}\nmembership:\n  kind: static\n  shards: 2\nws_listen: 127.0.0.1:${k.ws}\ntcp_listen: 127.0.0.1:${k.tcp}\n` +
        `rpc_listen: 127.0.0.1:${k.rpc}\nops_listen: 127.0.0.1:${k.ops}\nmessage_url: http://127.0.0.1:${p.msg}\n` +
        `subscriber_secret: ${y(subscriberSecret)}\n`;
    });
    for (const [name, text] of Object.entries(c.configs)) writeFileSync(path.join(c.dir, `${name}.yaml`), text);
    await c.startProcess('message');
    await c.startProcess('comet-0');
    await c.startProcess('comet-1');
    await c.startProcess('web');
    return c;
  }

  get webUrl() {
    return `http://127.0.0.1:${this.ports.pub}`;
  }

  get adminUrl() {
    return `http://127.0.0.1:${this.ports.admin}`;
  }

  listenPort(name) {
    if (name === 'message') return this.ports.msg;
    if (name === 'web') return this.ports.pub;
    return this.ports.comets[Number(name.split('-')[1])].ws;
  }

  /** Starts (or starts again) `name` and waits until it listens. */
  async startProcess(name) {
    const bin = name.startsWith('comet') ? 'push-comet' : name === 'web' ? 'push-web' : 'push-message';
    const child = spawn(path.join(BIN, bin), ['--config', path.join(this.dir, `${name}.yaml`)], {
      stdio: ['ignore', 'ignore', process.env.PUSHCLUSTER_LOGS ? 'inherit' : 'ignore'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' },
    });
    const exited = new Promise((resolve) => child.on('exit', resolve));
    this.procs[name] = { child, exited };
    live.add(child);
    child.on('exit', () => live.delete(child));
    await waitListening(this.listenPort(name), name);
  }

  /** Sends `signal` to `name` and waits for it to exit (SIGKILL after 10 s). */
  async stopProcess(name, signal = 'SIGKILL') {
    const p = this.procs[name];
    if (!p) return;
    p.child.kill(signal);
    const timer = setTimeout(() => p.child.kill('SIGKILL'), 10_000);
    await p.exited;
    clearTimeout(timer);
    delete this.procs[name];
  }

  /** Pushes `message` (JSON) to `key`; resolves to its mid. */
  async push(key, message, expire = 600) {
    const u = `${this.adminUrl}/1/admin/push/private?key=${encodeURIComponent(key)}&expire=${expire}`;
    const headers = { 'content-type': 'application/json' };
    if (this.adminToken) headers.authorization = `Bearer ${this.adminToken}`;
    for (let attempt = 0; ; attempt++) {
      try {
        const resp = await fetch(u, { method: 'POST', headers, body: JSON.stringify(message) });
        const body = await resp.json();
        if (body.ret === 0) return body.data.mid;
        throw new Error(`push refused: ${JSON.stringify(body)}`);
      } catch (e) {
        // web restarting: refused before anything was sent, so a retry
        // cannot store the message twice (the API takes no push id).
        if (attempt >= 100 || e.cause?.code !== 'ECONNREFUSED') throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  async stop() {
    for (const name of Object.keys(this.procs)) await this.stopProcess(name, 'SIGTERM');
    rmSync(this.dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
  }
}

// The demo page in real headless Chromium (Debian's `chromium`, driven over
// the DevTools protocol with no npm dependency) against a local cluster of
// the real binaries whose web serves the page (`demo: true`, as `make run`
// does): three keys, 500 pushes, during which a comet is killed (pushes go
// on; it comes back) and web restarted. The page must show every message
// exactly once, in mid order; a screenshot is saved.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { LocalCluster, ROOT } from './cluster.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
/** Where the screenshot goes. */
const OUT = path.join(ROOT, 'target/test-output');

/** A DevTools protocol connection (browser endpoint, flat sessions). */
class Cdp {
  static async connect(url) {
    const c = new Cdp();
    c.ws = new WebSocket(url);
    c.next = 1;
    c.pending = new Map();
    c.ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      const p = m.id && c.pending.get(m.id);
      if (!p) return;
      c.pending.delete(m.id);
      if (m.error) p.reject(new Error(`${p.method}: ${m.error.message}`));
      else p.resolve(m.result);
    };
    await new Promise((resolve, reject) => {
      c.ws.onopen = resolve;
      c.ws.onerror = () => reject(new Error(`DevTools connection to ${url} failed`));
    });
    return c;
  }

  send(method, params = {}, sessionId = undefined) {
    const id = this.next++;
    this.ws.send(JSON.stringify({ id, method, params, sessionId }));
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject, method }));
  }

  close() {
    this.ws.close();
  }
}

/** Starts headless Chromium; resolves to its process, profile and DevTools URL. */
async function launchChromium() {
  const profile = mkdtempSync(path.join(tmpdir(), 'pushcluster-chromium-'));
  // The flags that keep Chromium off the closed network here (no update,
  // sync or background fetches) and runnable as root in a container.
  const child = spawn(
    CHROMIUM,
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
      `--user-data-dir=${profile}`,
      '--remote-debugging-port=0',
      '--window-size=1280,900',
      'about:blank',
    ],
    // Its own process group: Chromium's helpers (renderer, crashpad) outlive
    // a kill of the browser process alone and keep writing the profile.
    { stdio: 'ignore', detached: true },
  );
  const portFile = path.join(profile, 'DevToolsActivePort');
  const deadline = Date.now() + 30_000;
  while (!existsSync(portFile) || readFileSync(portFile, 'utf8').split('\n').length < 2) {
    if (Date.now() > deadline) throw new Error('Chromium did not open its DevTools port in 30 s');
    await sleep(100);
  }
  const [port, wsPath] = readFileSync(portFile, 'utf8').trim().split('\n');
  return { child, profile, url: `ws://127.0.0.1:${port}${wsPath}` };
}

test('the demo page in Chromium shows every message once, in order, across a comet kill and a web restart', { timeout: 180_000 }, async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium (scripts/ensure-deps.sh does)`);
  const c = await LocalCluster.start({ demo: true });
  const browser = await launchChromium();
  let cdp;
  try {
    cdp = await Cdp.connect(browser.url);
    const keys = ['page-ann', 'page-ben', 'page-cat'];
    const page = `${c.webUrl}/demo/?keys=${keys.join(',')}`;
    const { targetId } = await cdp.send('Target.createTarget', { url: page });
    const { sessionId } = await cdp.send('Target.attachToTarget', { targetId, flatten: true });
    const read = async () => {
      const r = await cdp.send(
        'Runtime.evaluate',
        { expression: 'JSON.stringify(window.pushDemo || null)', returnByValue: true },
        sessionId,
      );
      return JSON.parse(r.result.value);
    };
    const deadline = Date.now() + 20_000;
    for (;;) {
      const d = await read();
      if (d && keys.every((k) => d.states[k] === 'open')) break;
      if (Date.now() > deadline) throw new Error(`the page did not subscribe: ${JSON.stringify(d)}`);
      await sleep(100);
    }

    const acked = new Map(keys.map((k) => [k, []]));
    const total = 500;
    for (let n = 1; n <= total; n++) {
      const key = keys[n % keys.length];
      const mid = await c.push(key, { n });
      acked.get(key).push([mid, n]);
      if (n === 150) await c.stopProcess('comet-0', 'SIGKILL');
      if (n === 180) await c.startProcess('comet-0');
      if (n === 300) await c.stopProcess('comet-1', 'SIGKILL');
      if (n === 330) await c.startProcess('comet-1');
      if (n === 400) {
        await c.stopProcess('web', 'SIGTERM');
        await c.startProcess('web');
      }
      await sleep(5);
    }

    let shown;
    const until = Date.now() + 60_000;
    for (;;) {
      shown = await read();
      if (keys.every((k) => shown.received[k].length >= acked.get(k).length)) break;
      if (Date.now() > until) break;
      await sleep(200);
    }
    mkdirSync(OUT, { recursive: true });
    const shot = await cdp.send('Page.captureScreenshot', { format: 'png' }, sessionId);
    const file = path.join(OUT, 'chromium-demo.png');
    writeFileSync(file, Buffer.from(shot.data, 'base64'));
    console.log(`screenshot: ${file}`);
    for (const k of keys) {
      const want = acked.get(k);
      assert.deepEqual(shown.received[k], want.map(([m]) => m), `${k}: mids shown once, in order`);
      for (const [mid, n] of want) assert.deepEqual(shown.payloads[k][mid], { n }, `${k} mid ${mid}`);
      assert.equal(shown.resets[k], 0, `${k} reset`);
    }
    console.log(
      `Chromium page: ${keys.map((k) => `${k} ${shown.received[k].length} messages`).join(', ')} of ${total} pushed; errors seen and retried: ${shown.errors.length}`,
    );
  } finally {
    try {
      cdp?.close();
      await stopChromium(browser);
    } finally {
      await c.stop();
    }
  }
});

/** Kills Chromium's whole process group and removes its profile (best effort: a leftover temp dir must not fail the test). */
async function stopChromium(browser) {
  const exited =
    browser.child.exitCode !== null || browser.child.signalCode !== null
      ? Promise.resolve()
      : new Promise((resolve) => browser.child.once('exit', resolve));
  try {
    process.kill(-browser.child.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  await Promise.race([exited, sleep(10_000)]);
  try {
    rmSync(browser.profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 });
  } catch (e) {
    console.log(`left Chromium's profile ${browser.profile}: ${e.message}`);
  }
}

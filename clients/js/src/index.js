// pushcluster client for browsers and Node: follows keys through web and the
// comets, and hands the application each message once, in mid order.
//
// The protocol (README of the repository, "Clients"): resolve the key's comet
// through web (`/1/server/get`), subscribe there (WebSocket `/sub`, or SSE
// `/sub/sse`), then read what was stored after the last mid (`/1/msg/get`).
// Subscribe first, read second: nothing falls in between. Mids of a key are
// contiguous, so a live message that skips ahead shows a gap, which is read
// from storage before the message is handed on. No runtime dependencies: it
// uses the platform's fetch and WebSocket.

/** Protocol numbers of `/1/server/get`. */
export const PROTO = Object.freeze({ websocket: 1, tcp: 2, sse: 3 });

/** web's and the comets' `ret` codes. */
export const RET = Object.freeze({
  ok: 0,
  noNode: 1001,
  channel: 1002,
  unauthorized: 65533,
  param: 65534,
  internal: 65535,
});

const HEARTBEAT_SECONDS = 30;
// A connection that says nothing for this long past its heartbeat is dead
// (a comet answers every `h`, and SSE sends a keep-alive every 15 s).
const SILENCE_GRACE_MS = 15_000;
// WebSocket attempts that fail to open while web answers before falling
// back to SSE (a proxy that refuses upgrades).
const WS_FAILURES_BEFORE_SSE = 3;

/** An error from web or a comet, with its `ret` code when it gave one. */
export class PushError extends Error {
  constructor(message, { ret = null, status = null, kind = 'error' } = {}) {
    super(message);
    this.name = 'PushError';
    this.ret = ret;
    this.status = status;
    /** 'auth' | 'channel' | 'param' | 'unreachable' | 'closed' | 'error' */
    this.kind = kind;
  }
}

/**
 * Jittered exponential backoff ("full jitter"): the n-th pause is uniform in
 * [0, min(max, initial * 2^n)], so clients cut off together do not come back
 * together.
 */
export class Backoff {
  constructor({ initialMs = 100, maxMs = 5000, random = Math.random } = {}) {
    this.initialMs = initialMs;
    this.maxMs = maxMs;
    this.random = random;
    this.attempt = 0;
  }

  /** The next pause, in ms. */
  next() {
    const ceiling = Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return Math.round(ceiling * this.random());
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * Where one key stands: the last mid handed to the application and the
 * epoch of its sequence. Pure bookkeeping, so the ordering rules are tested
 * without a network.
 */
export class Sequence {
  constructor({ lastMid = 0, epoch = 0 } = {}) {
    this.lastMid = lastMid;
    this.epoch = epoch;
  }

  /**
   * What to do with a private message of mid `mid`: 'drop' (seen), 'deliver'
   * (the next one), or 'gap' (it skips ahead: read storage first).
   */
  judge(mid) {
    if (mid <= this.lastMid) return 'drop';
    return mid === this.lastMid + 1 ? 'deliver' : 'gap';
  }

  /** Records `mid` as handed on; false when it was not new. */
  take(mid) {
    if (mid <= this.lastMid) return false;
    this.lastMid = mid;
    return true;
  }

  /** The key's sequence started again (storage lost it): mids restart. */
  reset() {
    this.lastMid = 0;
  }
}

/** Parses one comet frame (a WebSocket text frame, or an SSE data line). */
export function parseFrame(text) {
  if (text === '+h\r\n' || text === '+h') return { type: 'heartbeat' };
  if (text === '-r\r\n' || text === '-r') return { type: 'reconnect' };
  if (text.startsWith('-')) {
    const code = text.trim();
    const kind = { '-a': 'auth', '-c': 'channel', '-p': 'param' }[code] || 'error';
    return { type: 'refused', code, kind };
  }
  let v;
  try {
    v = JSON.parse(text);
  } catch {
    return { type: 'bad', text };
  }
  return messageOf(v) || { type: 'bad', text };
}

/** A `{msg, mid, gid}` object as a message frame (legacy string msgs decoded). */
function messageOf(v) {
  if (!v || typeof v !== 'object' || !Number.isSafeInteger(v.mid)) return null;
  let msg = v.msg;
  if (typeof msg === 'string') {
    try {
      msg = JSON.parse(msg);
    } catch {
      // A legacy message that is not JSON stays a string.
    }
  }
  return { type: 'message', mid: v.mid, gid: v.gid === 1 ? 1 : 0, msg };
}

/** Splits an SSE stream into events; feed it text, get events back. */
export class SseParser {
  constructor() {
    this.buffer = '';
  }

  /** Adds `chunk`; returns the events it completed: {event, data, id}. */
  push(chunk) {
    this.buffer += chunk.replace(/\r\n/g, '\n');
    const out = [];
    let end;
    while ((end = this.buffer.indexOf('\n\n')) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let event = 'message';
      let id = null;
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'event') event = value;
        else if (field === 'data') data.push(value);
        else if (field === 'id') id = value;
      }
      if (data.length || event !== 'message') out.push({ event, data: data.join('\n'), id });
    }
    return out;
  }
}

/** A queue of frames that a session reads one at a time, with a deadline. */
class Frames {
  constructor() {
    this.items = [];
    this.waiter = null;
    this.error = null;
  }

  push(frame) {
    if (this.error) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(frame);
    } else {
      this.items.push(frame);
    }
  }

  fail(error) {
    if (this.error) return;
    this.error = error;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(error);
    }
  }

  /** The next frame; rejects with `kind: 'silent'` after `ms` of nothing. */
  next(ms) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new PushError('nothing heard', { kind: 'silent' }));
      }, ms);
      this.waiter = {
        resolve: (f) => {
          clearTimeout(timer);
          resolve(f);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    });
  });

/**
 * A client of one pushcluster, reached at web's public URL
 * (`http://127.0.0.1:8090`, `https://push.example.com`).
 */
export class PushClient {
  /**
   * @param {object} options see index.d.ts (`ClientOptions`)
   */
  constructor(options) {
    if (!options || !options.url) throw new TypeError('PushClient needs { url }: web\'s public URL');
    this.url = String(options.url).replace(/\/+$/, '');
    this.getToken = options.getToken || null;
    this.fetch = options.fetch || globalThis.fetch?.bind(globalThis);
    this.WebSocket = options.WebSocket === undefined ? globalThis.WebSocket : options.WebSocket;
    this.transports = options.transports || ['websocket', 'sse'];
    this.heartbeatSeconds = options.heartbeatSeconds || HEARTBEAT_SECONDS;
    // Tokens in headers (Authorization; a WebSocket subprotocol) stay out of
    // URLs and so out of proxy logs; 'query' is the gopush-cluster way.
    this.tokenIn = options.tokenIn || 'header';
    this.backoff = options.backoff || {};
    if (!this.fetch) throw new TypeError('no fetch: pass options.fetch');
  }

  /**
   * Follows `key`: `handlers.onMessage(msg, {mid, gid, key})` gets each
   * message once, in mid order. Returns the subscription (`close()` ends it).
   */
  subscribe(key, handlers = {}, from = {}) {
    if (typeof key !== 'string' || key === '') throw new TypeError('subscribe needs a key');
    const sub = new Subscription(this, key, handlers, from);
    sub.start();
    return sub;
  }

  /** GETs web's `path` with `query` (and `token`); resolves to `data`. */
  async call(path, query, signal, token = null) {
    const u = new URL(this.url + path);
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null) u.searchParams.set(k, String(v));
    }
    const headers = { accept: 'application/json' };
    if (token && this.tokenIn === 'header') headers.authorization = `Bearer ${token}`;
    else if (token) u.searchParams.set('token', token);
    let resp;
    try {
      resp = await this.fetch(u, { signal, headers });
    } catch (e) {
      throw new PushError(`web unreachable: ${e.message}`, { kind: 'unreachable' });
    }
    let body = null;
    try {
      body = await resp.json();
    } catch {
      // Not JSON: judged by the status below.
    }
    const ret = body && typeof body.ret === 'number' ? body.ret : null;
    if (!resp.ok || ret !== RET.ok) {
      const r = ret ?? -1;
      const kind =
        r === RET.unauthorized || resp.status === 401 || resp.status === 403
          ? 'auth'
          : r === RET.param
            ? 'param'
            : 'error';
      throw new PushError(`${path}: ${body?.msg || resp.statusText} (ret ${r})`, {
        ret,
        status: resp.status,
        kind,
      });
    }
    return body.data;
  }
}

/** One followed key. */
export class Subscription {
  constructor(client, key, handlers, from) {
    this.client = client;
    this.key = key;
    this.handlers = handlers;
    this.seq = new Sequence({ lastMid: from.lastMid || 0, epoch: from.epoch || 0 });
    this.lastPublicMid = from.lastPublicMid ?? null;
    this.token = from.token || null;
    this.state = 'idle';
    this.transport = null;
    this.abort = new AbortController();
    this.socket = null;
    this.wsFailures = 0;
    this.backoff = new Backoff(client.backoff);
    /** Counters an application or a test may read. */
    this.stats = { connections: 0, reconnects: 0, resets: 0, gapsFilled: 0, unfillable: 0 };
  }

  /** The last mid handed to the application. */
  get lastMid() {
    return this.seq.lastMid;
  }

  /** The epoch of the key's sequence (0 until learnt). */
  get epoch() {
    return this.seq.epoch;
  }

  /** Stops following the key. */
  close() {
    if (this.state === 'closed') return;
    this.abort.abort();
    this.closeSocket();
    this.setState('closed');
  }

  start() {
    this.loop().catch((e) => this.report(e));
  }

  setState(state, detail) {
    if (this.state === state) return;
    this.state = state;
    this.handlers.onState?.(state, detail);
  }

  report(error) {
    this.handlers.onError?.(error);
  }

  closeSocket() {
    const s = this.socket;
    this.socket = null;
    if (!s) return;
    try {
      if (typeof s.close === 'function') s.close();
      else s.cancel?.();
    } catch {
      // Already closed.
    }
  }

  pickTransport() {
    const wanted = this.client.transports;
    const hasWs = typeof this.client.WebSocket === 'function';
    if (wanted.includes('websocket') && hasWs && this.wsFailures < WS_FAILURES_BEFORE_SSE) {
      return 'websocket';
    }
    if (wanted.includes('sse')) return 'sse';
    return 'websocket';
  }

  async ensureToken(reason) {
    if (!this.client.getToken) return;
    if (this.token && reason === 'start') return;
    this.token = await this.client.getToken(this.key, { reason });
  }

  async loop() {
    const signal = this.abort.signal;
    await this.ensureToken('start');
    // The address lost last, for web to wait past once per outage (it
    // answers when the key's shard has a new holder).
    let lost = null;
    let mayWait = true;
    while (!signal.aborted) {
      this.setState('connecting');
      const transport = this.pickTransport();
      let addr = null;
      let opened = false;
      try {
        const data = await this.client.call(
          '/1/server/get',
          { k: this.key, p: PROTO[transport], w: lost || undefined },
          signal,
        );
        lost = null;
        addr = data?.server;
        if (!addr) throw new PushError('web named no comet', { kind: 'error' });
        const frames = await this.open(transport, addr);
        opened = true;
        this.backoff.reset();
        if (transport === 'websocket') this.wsFailures = 0;
        this.stats.connections += 1;
        if (this.stats.connections > 1) this.stats.reconnects += 1;
        this.transport = transport;
        this.setState('open', { transport, server: addr });
        const ended = await this.session(transport, frames);
        this.closeSocket();
        if (ended === 'lost') {
          lost = addr;
          mayWait = false;
        } else {
          mayWait = true;
        }
      } catch (e) {
        this.closeSocket();
        if (signal.aborted) break;
        if (e.kind === 'auth' && this.client.getToken) {
          this.report(e);
          try {
            await this.ensureToken('expired');
          } catch (te) {
            this.report(te);
          }
          await sleep(this.backoff.next(), signal);
          continue;
        }
        // WebSocket counts as unavailable only when the comet answers
        // plain HTTP (a proxy refusing upgrades), not when it is down.
        if (transport === 'websocket' && addr && !opened && e.kind === 'unreachable') {
          if (await this.answersHttp(addr)) this.wsFailures += 1;
        }
        this.report(e);
        if (mayWait && addr && e.kind === 'unreachable') {
          mayWait = false;
          lost = addr;
          continue;
        }
        await sleep(this.backoff.next(), signal);
      }
    }
    this.setState('closed');
  }

  /** Whether anything answers HTTP at the comet's address (any status). */
  async answersHttp(addr) {
    try {
      await this.client.fetch(this.cometUrl(addr, 'http'), {
        mode: 'no-cors',
        signal: AbortSignal.timeout(2000),
      });
      return true;
    } catch {
      return false;
    }
  }

  /** Opens `transport` to the comet at `addr`; resolves once it is subscribed. */
  open(transport, addr) {
    return transport === 'websocket' ? this.openWebSocket(addr) : this.openSse(addr);
  }

  cometUrl(addr, scheme) {
    if (addr.includes('://')) return addr;
    const secure = this.client.url.startsWith('https:');
    return `${scheme}${secure ? 's' : ''}://${addr}`;
  }

  openWebSocket(addr) {
    const base = this.cometUrl(addr, 'ws');
    const u = new URL(base.replace(/\/+$/, '') + '/sub');
    u.searchParams.set('key', this.key);
    u.searchParams.set('heartbeat', String(this.client.heartbeatSeconds));
    u.searchParams.set('ver', '1');
    // The token as a subprotocol beside `pushcluster`, which the comet
    // echoes; or as the gopush-cluster parameter.
    const protocols = [];
    if (this.token && this.client.tokenIn === 'header') protocols.push('pushcluster', `token.${this.token}`);
    else if (this.token) u.searchParams.set('token', this.token);
    const frames = new Frames();
    return new Promise((resolve, reject) => {
      let opened = false;
      let ws;
      try {
        ws = protocols.length
          ? new this.client.WebSocket(u.toString(), protocols)
          : new this.client.WebSocket(u.toString());
      } catch (e) {
        reject(new PushError(`websocket: ${e.message}`, { kind: 'unreachable' }));
        return;
      }
      this.socket = ws;
      const fail = (err) => {
        if (!opened) reject(err);
        frames.fail(err);
      };
      ws.onmessage = (ev) => {
        const f = parseFrame(typeof ev.data === 'string' ? ev.data : String(ev.data));
        if (!opened) {
          if (f.type === 'heartbeat') {
            opened = true;
            resolve(frames);
          } else if (f.type === 'refused') {
            fail(new PushError(`comet refused: ${f.code}`, { kind: f.kind }));
            try {
              ws.close();
            } catch {
              // Closing anyway.
            }
          } else {
            fail(new PushError(`first frame ${JSON.stringify(ev.data)}`, { kind: 'error' }));
          }
          return;
        }
        frames.push(f);
      };
      ws.onerror = () => fail(new PushError('websocket failed', { kind: opened ? 'closed' : 'unreachable' }));
      ws.onclose = () => fail(new PushError('websocket closed', { kind: opened ? 'closed' : 'unreachable' }));
    });
  }

  async openSse(addr) {
    const base = this.cometUrl(addr, 'http');
    const u = new URL(base.replace(/\/+$/, '') + '/sub/sse');
    u.searchParams.set('key', this.key);
    const headers = { accept: 'text/event-stream' };
    if (this.token && this.client.tokenIn === 'header') headers.authorization = `Bearer ${this.token}`;
    else if (this.token) u.searchParams.set('token', this.token);
    if (this.seq.epoch) u.searchParams.set('epoch', String(this.seq.epoch));
    // The resume point as a parameter, not Last-Event-ID: a header would
    // cost a CORS preflight across origins. Always sent (0 at first), so
    // the comet starts with what was stored, as a WebSocket's read does.
    u.searchParams.set('last_id', String(this.seq.lastMid));
    const ctl = new AbortController();
    const onAbort = () => ctl.abort();
    this.abort.signal.addEventListener('abort', onAbort);
    let resp;
    try {
      resp = await this.client.fetch(u, { signal: ctl.signal, headers });
    } catch (e) {
      throw new PushError(`sse: ${e.message}`, { kind: 'unreachable' });
    }
    if (!resp.ok) {
      let body = null;
      try {
        body = await resp.json();
      } catch {
        // Judged by the status.
      }
      const ret = body?.ret ?? null;
      const kind =
        ret === RET.unauthorized || resp.status === 401
          ? 'auth'
          : ret === RET.channel
            ? 'channel'
            : ret === RET.param
              ? 'param'
              : 'error';
      throw new PushError(`sse refused: ${resp.status} ${body?.msg || ''}`, { ret, status: resp.status, kind });
    }
    const frames = new Frames();
    this.socket = { close: () => ctl.abort() };
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    (async () => {
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          // Any bytes (keep-alive comments too) show the stream is alive.
          frames.push({ type: 'alive' });
          for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
            frames.push(sseFrame(ev));
          }
        }
        frames.fail(new PushError('sse stream ended', { kind: 'closed' }));
      } catch (e) {
        frames.fail(new PushError(`sse: ${e.message}`, { kind: 'closed' }));
      } finally {
        this.abort.signal.removeEventListener('abort', onAbort);
      }
    })();
    return frames;
  }

  /** Reads frames until the connection ends: 'reconnect', 'lost' or 'closed'. */
  async session(transport, frames) {
    const signal = this.abort.signal;
    // SSE resumes from last_id on the comet, which also says when the
    // sequence restarted; the WebSocket reads storage through web.
    if (transport === 'websocket') await this.catchUp();
    const beatMs = (this.client.heartbeatSeconds * 1000) / 3;
    const silence =
      transport === 'websocket' ? this.client.heartbeatSeconds * 1000 + SILENCE_GRACE_MS : 45_000;
    let lastBeat = Date.now();
    let heard = Date.now();
    while (!signal.aborted) {
      if (transport === 'websocket' && Date.now() - lastBeat >= beatMs) {
        try {
          this.socket?.send('h');
        } catch {
          return 'lost';
        }
        lastBeat = Date.now();
      }
      let f;
      try {
        f = await frames.next(transport === 'websocket' ? Math.min(beatMs, silence) : silence);
      } catch (e) {
        if (signal.aborted) return 'closed';
        if (e.kind === 'silent' && Date.now() - heard < silence) continue;
        return 'lost';
      }
      heard = Date.now();
      switch (f.type) {
        case 'message':
          await this.onLive(f);
          break;
        case 'reconnect':
          return 'reconnect';
        case 'reset':
          this.onReset();
          break;
        case 'epoch':
          this.seq.epoch = f.epoch;
          break;
        case 'refused':
          if (f.kind === 'auth') throw new PushError('comet refused the token', { kind: 'auth' });
          return 'reconnect';
        default:
          break;
      }
    }
    return 'closed';
  }

  async onLive(f) {
    if (f.gid === 1) {
      if (this.lastPublicMid === null || f.mid > this.lastPublicMid) {
        this.lastPublicMid = f.mid;
        this.hand(f);
      }
      return;
    }
    const verdict = this.seq.judge(f.mid);
    if (verdict === 'drop') return;
    if (verdict === 'gap') {
      await this.catchUp(f.mid);
      if (f.mid > this.seq.lastMid + 1 && this.seq.lastMid !== 0) this.stats.unfillable += 1;
    }
    if (this.seq.take(f.mid)) this.hand(f);
  }

  onReset() {
    this.seq.reset();
    this.stats.resets += 1;
    this.handlers.onReset?.({ key: this.key });
  }

  hand(f) {
    try {
      this.handlers.onMessage?.(f.msg, { mid: f.mid, gid: f.gid, key: this.key });
    } catch (e) {
      this.report(e);
    }
  }

  /** Reads what storage has after the last mid (below `below`, if given). */
  async catchUp(below) {
    for (;;) {
      const data = await this.client.call(
        '/1/msg/get',
        {
          k: this.key,
          m: this.seq.lastMid,
          e: this.seq.epoch,
          p: this.lastPublicMid ?? undefined,
        },
        this.abort.signal,
        this.token,
      );
      if (!data) return;
      if (data.reset) this.onReset();
      if (Number.isSafeInteger(data.epoch)) this.seq.epoch = data.epoch;
      const before = this.seq.lastMid;
      for (const raw of data.msgs || []) {
        const m = messageOf(raw);
        if (!m || (below !== undefined && m.mid >= below)) continue;
        if (this.seq.take(m.mid)) {
          this.stats.gapsFilled += 1;
          this.hand(m);
        }
      }
      for (const raw of data.pmsgs || []) {
        const m = messageOf(raw);
        if (m && (this.lastPublicMid === null || m.mid > this.lastPublicMid)) {
          this.lastPublicMid = m.mid;
          this.hand({ ...m, gid: 1 });
        }
      }
      if (!(data.msgs || []).length || (this.seq.lastMid === before && !data.reset)) return;
    }
  }
}

function sseFrame(ev) {
  switch (ev.event) {
    case 'reconnect':
      return { type: 'reconnect' };
    case 'reset':
      return { type: 'reset' };
    case 'epoch': {
      try {
        const e = JSON.parse(ev.data).epoch;
        return Number.isSafeInteger(e) ? { type: 'epoch', epoch: e } : { type: 'bad' };
      } catch {
        return { type: 'bad' };
      }
    }
    default: {
      if (!ev.data) return { type: 'alive' };
      const f = parseFrame(ev.data);
      if (f.type === 'message' && ev.event === 'public') f.gid = 1;
      return f;
    }
  }
}

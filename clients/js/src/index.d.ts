// Types of @pushcluster/client (src/index.js).

/** Protocol numbers of web's `/1/server/get`. */
export declare const PROTO: Readonly<{ websocket: 1; tcp: 2; sse: 3 }>;

/** web's and the comets' `ret` codes. */
export declare const RET: Readonly<{
  ok: 0;
  noNode: 1001;
  channel: 1002;
  unauthorized: 65533;
  param: 65534;
  internal: 65535;
}>;

export type Transport = 'websocket' | 'sse';
export type State = 'idle' | 'connecting' | 'open' | 'closed';
export type ErrorKind = 'auth' | 'channel' | 'param' | 'unreachable' | 'closed' | 'silent' | 'error';

/** An error from web or a comet. */
export declare class PushError extends Error {
  readonly ret: number | null;
  readonly status: number | null;
  readonly kind: ErrorKind;
}

export interface ClientOptions {
  /** web's public URL, e.g. `https://push.example.com`. */
  url: string;
  /**
   * Returns the key's subscriber token (from your back end). Called before
   * the first connection and again whenever the cluster refuses the token
   * (`reason: 'expired'`). Leave it out when the cluster checks no tokens.
   */
  getToken?: (key: string, info: { reason: 'start' | 'expired' }) => Promise<string> | string;
  /**
   * Where the token travels: 'header' (default: `Authorization: Bearer` on
   * HTTP, a `token.<token>` WebSocket subprotocol; out of URLs and proxy
   * logs) or 'query' (`token=`, as gopush-cluster clients send it).
   */
  tokenIn?: 'header' | 'query';
  /** Transports in order of preference; default `['websocket', 'sse']`. */
  transports?: Transport[];
  /** The heartbeat promised to the comet, in seconds (default 30). */
  heartbeatSeconds?: number;
  /** Reconnect backoff: full jitter between 0 and min(maxMs, initialMs·2ⁿ). */
  backoff?: { initialMs?: number; maxMs?: number };
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
  /** A WebSocket class to use instead of the global one; `null` for none. */
  WebSocket?: typeof WebSocket | null;
}

export interface MessageMeta {
  /** The message id: contiguous per key from 1. */
  mid: number;
  /** 0 private (to this key), 1 public (broadcast). */
  gid: 0 | 1;
  key: string;
}

export interface Handlers<M = unknown> {
  /** Each message once, in mid order. */
  onMessage?: (message: M, meta: MessageMeta) => void;
  /** The key's sequence started again (storage lost it): mids restart at 1. */
  onReset?: (info: { key: string }) => void;
  onState?: (state: State, detail?: { transport: Transport; server: string }) => void;
  /** Errors along the way; the subscription retries by itself. */
  onError?: (error: Error) => void;
}

/** Where to resume: what an earlier session of this key handed on. */
export interface From {
  lastMid?: number;
  epoch?: number;
  /** Public mids are delivered after this one (and read back); null: live only. */
  lastPublicMid?: number | null;
  /** A token to start with. */
  token?: string;
}

export interface Stats {
  connections: number;
  reconnects: number;
  resets: number;
  gapsFilled: number;
  unfillable: number;
}

export declare class Subscription {
  readonly key: string;
  readonly state: State;
  readonly transport: Transport | null;
  readonly lastMid: number;
  readonly epoch: number;
  readonly lastPublicMid: number | null;
  readonly stats: Stats;
  close(): void;
}

export declare class PushClient {
  constructor(options: ClientOptions);
  subscribe<M = unknown>(key: string, handlers?: Handlers<M>, from?: From): Subscription;
}

/** Jittered exponential backoff. */
export declare class Backoff {
  constructor(options?: { initialMs?: number; maxMs?: number; random?: () => number });
  next(): number;
  reset(): void;
}

/** A key's position: the rules that keep mids once each and in order. */
export declare class Sequence {
  constructor(from?: { lastMid?: number; epoch?: number });
  lastMid: number;
  epoch: number;
  judge(mid: number): 'drop' | 'deliver' | 'gap';
  take(mid: number): boolean;
  reset(): void;
}

export type Frame =
  | { type: 'heartbeat' }
  | { type: 'reconnect' }
  | { type: 'refused'; code: string; kind: ErrorKind }
  | { type: 'message'; mid: number; gid: 0 | 1; msg: unknown }
  | { type: 'bad'; text: string };

/** Parses one comet frame. */
export declare function parseFrame(text: string): Frame;

/** Splits an SSE stream into events. */
export declare class SseParser {
  push(chunk: string): { event: string; data: string; id: string | null }[];
}

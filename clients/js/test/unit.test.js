// The client's pure parts: frames, SSE parsing, mid bookkeeping, backoff.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backoff, Sequence, SseParser, parseFrame } from '../src/index.js';

test('frames of the WebSocket transport', () => {
  assert.deepEqual(parseFrame('+h\r\n'), { type: 'heartbeat' });
  assert.deepEqual(parseFrame('-r\r\n'), { type: 'reconnect' });
  assert.deepEqual(parseFrame('-a\r\n'), { type: 'refused', code: '-a', kind: 'auth' });
  assert.deepEqual(parseFrame('-c\r\n'), { type: 'refused', code: '-c', kind: 'channel' });
  assert.deepEqual(parseFrame('{"msg":{"a":1},"mid":7,"gid":0}'), {
    type: 'message',
    mid: 7,
    gid: 0,
    msg: { a: 1 },
  });
  // The legacy format carries the message as a JSON string.
  assert.deepEqual(parseFrame('{"msg":"{\\"a\\":1}","mid":2,"gid":1}').msg, { a: 1 });
  assert.equal(parseFrame('{"msg":1}').type, 'bad', 'no mid');
  assert.equal(parseFrame('{"msg":1,"mid":1.5}').type, 'bad', 'a mid that is not an integer');
  assert.equal(parseFrame('not json').type, 'bad');
});

test('SSE events split across chunks, comments skipped', () => {
  const p = new SseParser();
  assert.deepEqual(p.push(': keep-alive\n\nid: 3\nda'), []);
  const events = p.push('ta: {"msg":1,"mid":3,"gid":0}\n\nevent: reset\ndata: {}\r\n\r\n');
  assert.deepEqual(events, [
    { event: 'message', data: '{"msg":1,"mid":3,"gid":0}', id: '3' },
    { event: 'reset', data: '{}', id: null },
  ]);
  assert.deepEqual(p.push('event: public\ndata: a\ndata: b\n\n'), [{ event: 'public', data: 'a\nb', id: null }]);
});

test('mids are handed on once and in order', () => {
  const s = new Sequence();
  assert.equal(s.judge(1), 'deliver');
  assert.ok(s.take(1));
  assert.equal(s.judge(1), 'drop');
  assert.equal(s.judge(3), 'gap', 'mid 2 is missing: read storage first');
  assert.ok(s.take(2) && s.take(3));
  assert.equal(s.take(2), false, 'never twice');
  assert.equal(new Sequence({ lastMid: 9 }).judge(4), 'drop', 'resumed past it');
  s.reset();
  assert.equal(s.judge(1), 'deliver', 'a restarted sequence begins at 1 again');
});

test('backoff grows to its ceiling, jittered, and starts over on reset', () => {
  const top = new Backoff({ initialMs: 100, maxMs: 1000, random: () => 1 });
  assert.deepEqual([0, 1, 2, 3, 4, 5].map(() => top.next()), [100, 200, 400, 800, 1000, 1000]);
  top.reset();
  assert.equal(top.next(), 100);
  const jittered = new Backoff({ initialMs: 100, maxMs: 1000 });
  for (let i = 0; i < 50; i++) {
    const d = jittered.next();
    assert.ok(d >= 0 && d <= 1000, `${d}`);
  }
});

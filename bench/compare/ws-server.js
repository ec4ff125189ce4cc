// The Node `ws` peer for bench/compare: the same API as push-floor.
//   GET  /sub?key=K     WebSocket subscriber of K
//   POST /pub?key=K     body to every subscriber of K
//   POST /broadcast     body to every subscriber
// The body is sent as a text frame, as is, with no storage: the usual
// broadcast server built on ws (what a team would write instead of a push
// service). Usage: node ws-server.js PORT
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 7800);
const byKey = new Map();
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

function deliver(sockets, body) {
  for (const ws of sockets) ws.send(body, { binary: false });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (req.method !== 'POST') {
    res.writeHead(404, { 'content-length': 0 });
    return res.end();
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (url.pathname === '/broadcast') {
      deliver(wss.clients, body);
    } else if (url.pathname === '/pub' && url.searchParams.get('key')) {
      deliver(byKey.get(url.searchParams.get('key')) || [], body);
    } else {
      res.writeHead(404, { 'content-length': 0 });
      return res.end();
    }
    res.writeHead(200, { 'content-length': 0 });
    res.end();
  });
});

server.on('upgrade', (req, socket, head) => {
  const key = new URL(req.url, 'http://localhost').searchParams.get('key') || '';
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (!byKey.has(key)) byKey.set(key, new Set());
    byKey.get(key).add(ws);
    ws.on('message', () => {});
    ws.on('close', () => {
      const set = byKey.get(key);
      set.delete(ws);
      if (set.size === 0) byKey.delete(key);
    });
  });
});

server.listen(port, '127.0.0.1');

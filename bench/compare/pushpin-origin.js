// The origin behind pushpin for bench/compare. Pushpin holds the clients'
// WebSockets and speaks to its origin in WebSocket-over-HTTP: one POST per
// batch of events. On OPEN this origin subscribes the connection (GRIP) to
// channel KEY from the subscribe URL `/sub?key=KEY`; everything else gets an
// empty answer. Pushes go to pushpin's publish API, never through here.
// Usage: node pushpin-origin.js PORT
'use strict';
const http = require('http');

const port = Number(process.argv[2] || 7810);

function textEvent(s) {
  return `TEXT ${Buffer.byteLength(s).toString(16)}\r\n${s}\r\n`;
}

http
  .createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString();
      const headers = { 'content-type': 'application/websocket-events' };
      let out = '';
      if (body.startsWith('OPEN\r\n')) {
        const key = new URL(req.url, 'http://localhost').searchParams.get('key') || '';
        headers['sec-websocket-extensions'] = 'grip';
        out = 'OPEN\r\n' + textEvent('c:' + JSON.stringify({ type: 'subscribe', channel: key }));
      } else if (body.startsWith('CLOSE')) {
        out = 'CLOSE\r\n';
      }
      headers['content-length'] = Buffer.byteLength(out);
      res.writeHead(200, headers);
      res.end(out);
    });
  })
  .listen(port, '127.0.0.1');

'use strict';
// The `ws` peer: the same protocol as bench/src/bin/floor.rs.
//   GET /echo  every frame is sent back on the same connection
//   GET /room  every connection is in one room; each frame is broadcast to every OTHER member
// Usage: node ws-server.js [PORT] [HOST]   (or PORT=..., HOST=...; port 0 picks a free one)

const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] ?? process.env.PORT ?? 9102);
const host = process.argv[3] ?? process.env.HOST ?? '127.0.0.1';

const server = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('use /echo or /room\n');
});

const options = { noServer: true, perMessageDeflate: false };
const echo = new WebSocketServer({ ...options, clientTracking: false });
const room = new WebSocketServer({ ...options, clientTracking: false });
const members = new Set();

echo.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});

room.on('connection', (ws) => {
  members.add(ws);
  ws.on('error', () => {});
  ws.on('close', () => members.delete(ws));
  ws.on('message', (data, isBinary) => {
    for (const m of members) {
      if (m !== ws && m.readyState === WebSocket.OPEN) m.send(data, { binary: isBinary });
    }
  });
});

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  const wss = path === '/echo' ? echo : path === '/room' ? room : null;
  if (!wss) {
    socket.end('HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\n');
    return;
  }
  socket.on('error', () => {});
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});

server.listen({ port, host, backlog: 4096 }, () => {
  console.log(`ws listening on ${host}:${server.address().port}`);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));

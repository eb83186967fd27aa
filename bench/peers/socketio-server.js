'use strict';
// The Socket.IO peer (Engine.IO v4, WebSocket transport only).
//   echo    (data)        -> emits `echo` with the same data back to the sender
//   join    (room, ack?)  -> joins the room, then calls the acknowledgement if one was asked for
//   publish (data, room?) -> io.to(room).except(socket.id).emit('message', data); the room is
//                            the one given, else the last one this socket joined
// Usage: node socketio-server.js [PORT] [HOST]   (or PORT=..., HOST=...; port 0 picks a free one)

const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] ?? process.env.PORT ?? 9103);
const host = process.argv[3] ?? process.env.HOST ?? '127.0.0.1';

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  cors: { origin: false },
});

io.on('connection', (socket) => {
  socket.on('echo', (data) => socket.emit('echo', data));
  socket.on('join', (room, ack) => {
    socket.join(room);
    socket.data.room = room;
    if (typeof ack === 'function') ack('ok');
  });
  socket.on('publish', (data, room) => {
    const target = typeof room === 'string' ? room : socket.data.room;
    if (target !== undefined) io.to(target).except(socket.id).emit('message', data);
  });
});

httpServer.listen({ port, host, backlog: 4096 }, () => {
  console.log(`socket.io listening on ${host}:${httpServer.address().port}`);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));

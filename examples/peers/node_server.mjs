// fanout_bench's Node peer: the `ws` package's WebSocketServer on Node's
// http server, broadcasting as the ws README does, by iterating
// `wss.clients` and calling `client.send` for each. Node runs JavaScript on
// a single thread (libuv's pool and V8's helpers aside).
// Run by fanout_bench (`--servers node`) as `node node_server.mjs`.

import http from "node:http";
import { WebSocket, WebSocketServer } from "ws";
import {
  WELCOME,
  announceAndWatchStdin,
  drive,
  parseRunQuery,
  statsBody,
} from "./bench_common.mjs";

/** The listen backlog asked for, as the Rust servers do (the kernel caps
 * it at net.core.somaxconn). */
const BACKLOG = 8192;
let open = 0;

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/bench/run" && req.method === "POST") {
    const query = parseRunQuery(url.searchParams);
    if (!query) {
      res.writeHead(400).end("count or rate out of range");
      return;
    }
    drive(broadcast, query);
    res.writeHead(202).end();
    return;
  }
  if (url.pathname === "/bench/stats" && req.method === "GET") {
    // With a length, not chunked: fanout_bench reads the body as it is.
    const body = statsBody(open, wss.clients.size);
    res
      .writeHead(200, {
        "Content-Type": "application/json",
        "Content-Length": Buffer.byteLength(body),
      })
      .end(body);
    return;
  }
  res.writeHead(404).end("not found");
});

// http.createServer sets TCP_NODELAY on accepted sockets by default (noDelay),
// like the Rust servers; ws does not compress unless asked.
const wss = new WebSocketServer({ server, path: "/ws" });

wss.on("connection", (ws) => {
  open += 1;
  ws.on("close", () => {
    open -= 1;
  });
  ws.on("error", () => {});
  ws.send(WELCOME);
});

function broadcast(payload) {
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) client.send(payload);
  }
}

server.listen(0, "127.0.0.1", BACKLOG, () => {
  announceAndWatchStdin(server.address().port);
});

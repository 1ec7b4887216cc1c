// fanout_bench's Bun peer: Bun.serve, whose WebSocket server is
// uWebSockets, written as Bun's documentation writes a broadcast server:
// every client subscribes to one topic on open and each broadcast is one
// `server.publish`. Bun runs JavaScript on a single thread, so this server
// has one event loop where happynet has two workers and a hub thread.
// Run by fanout_bench (`--servers bun`) as `bun bun_server.mjs`.

import {
  WELCOME,
  announceAndWatchStdin,
  drive,
  parseRunQuery,
  statsBody,
} from "./bench_common.mjs";

/** The one topic every client is on. */
const TOPIC = "all";
let open = 0;

const server = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/ws") {
      return server.upgrade(req)
        ? undefined
        : new Response("expected a WebSocket upgrade", { status: 400 });
    }
    if (url.pathname === "/bench/run" && req.method === "POST") {
      const query = parseRunQuery(url.searchParams);
      if (!query) return new Response("count or rate out of range", { status: 400 });
      drive((payload) => server.publish(TOPIC, payload), query);
      return new Response(null, { status: 202 });
    }
    if (url.pathname === "/bench/stats" && req.method === "GET") {
      return new Response(statsBody(open, server.subscriberCount(TOPIC)), {
        headers: { "Content-Type": "application/json" },
      });
    }
    return new Response("not found", { status: 404 });
  },
  websocket: {
    // The Rust servers do not compress either.
    perMessageDeflate: false,
    open(ws) {
      open += 1;
      ws.subscribe(TOPIC);
      ws.send(WELCOME);
    },
    message() {},
    close() {
      open -= 1;
    },
  },
});

announceAndWatchStdin(server.port);

// Browser test of the happynet demo page (examples/demo/index.html), run by
// .ci/run in headless Debian Chromium (it installs chromium and playwright-core).
//
// Starts examples/demo_server on 127.0.0.1:0 (or uses DEMO_URL if set),
// opens two pages in headless Debian chromium and checks, with a bounded
// timeout for every step, that:
//   1. both pages connect (status "Connected · session #N");
//   2. the live client count shows 2 on both;
//   3. plain text sent from page A shows up in page B (and as "mine" in A);
//   4. A joins another room: it appears in A's room list and presence counts;
//   5. B joins it too, A publishes to that room only, B sees it tagged #room;
//   6. text starting with "{" comes back as a politely shown error frame;
//   7. B leaves the room and it disappears from B's list;
//   8. a page opened at /#kitchen starts in room "kitchen";
//   9. the operations panel (polling GET /status) shows at least the open
//      tabs as connections, its deliveries counter and rate move after
//      messages are sent, the upstream row (the demo's openai client) shows
//      a closed breaker and counts a gateway call, and the alerts list is
//      there;
//  10. no page threw a JS error; a screenshot of the page with the panel is
//      saved (SCREENSHOT, default target/browser-artifacts/demo_page.png;
//      its path is printed);
//  11. (spawned server only) SIGTERM: pages show close 1001 "server shutting
//      down", then "retrying"; the server exits 0;
//  12. (spawned server only) a server restarted on the same port: both pages
//      reconnect by themselves and A is back in lobby and games, B in lobby,
//      and each says the lobby's history was lost (the restart's new epoch);
//  13. (spawned server only) --tls-cert naming a missing file: exit status 2
//      and a message naming the file;
//  14. (spawned server only) a cluster restart: two demo nodes on one
//      redis-server child (a config file naming it), a page on node A gets
//      lobby messages broadcast through node B; node A is killed (SIGKILL)
//      and started again on the same port while node B broadcasts N more;
//      the page reconnects and says "Recovered N messages in #lobby" (node
//      A read its history back from the stream), and shows them.
// A second screenshot, *-closed.png, shows a page after the shutdown, and
// *-narrow.png the layout at phone width.
//
// Usage: node check.js [path/to/demo_server]
//   default binary: target/debug/examples/demo_server (built by cargo test)
//   env DEMO_URL=http://127.0.0.1:8080/ to test an already running server
//   env CHROMIUM=/usr/bin/chromium, SCREENSHOT=target/browser-artifacts/demo_page.png
// Exit status 0 when every check passed; prints "N passed, N failed".

"use strict";
const { chromium } = require("playwright-core");
const { spawn } = require("child_process");
const net = require("net");
const fs = require("fs");
const os = require("os");
const path = require("path");

const STEP_TIMEOUT_MS = 10000;
const SERVER_START_TIMEOUT_MS = 30000;
const SERVER_EXIT_TIMEOUT_MS = 20000;
const REPO = path.resolve(__dirname, "..", "..");
const SCREENSHOT = process.env.SCREENSHOT || path.join(REPO, "target", "browser-artifacts", "demo_page.png");
fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const BIN = process.argv[2] || path.join(REPO, "target", "debug", "examples", "demo_server");

let passed = 0;
let failed = 0;
function ok(name) { passed++; console.log(`ok   - ${name}`); }
function fail(name, e) { failed++; console.log(`FAIL - ${name}: ${e && e.message ? e.message.split("\n")[0] : e}`); }
async function check(name, fn) {
  try { await fn(); ok(name); } catch (e) { fail(name, e); }
}

function startServer(bind = "127.0.0.1:0", config = null) {
  return new Promise((resolve, reject) => {
    const args = config ? ["--bind", bind, "--config", config] : ["--bind", bind];
    const child = spawn(BIN, args, {
      env: { ...process.env, RUST_LOG: "info", HAPPYNET_CONFIG: "" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let log = "";
    const timer = setTimeout(() => reject(new Error(`server did not log its URL in time:\n${log}`)), SERVER_START_TIMEOUT_MS);
    const onData = (d) => {
      log += d.toString();
      const m = log.match(/open (http:\/\/127\.0\.0\.1:\d+\/)/);
      if (m) { clearTimeout(timer); resolve({ child, url: m[1], log: () => log }); }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("error", (e) => { clearTimeout(timer); reject(e); });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`server exited early (${code}):\n${log}`)); });
  });
}

// A port nothing listens on now.
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

// A redis-server child on a free port, without persistence; resolves once
// it answers PING.
async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", os.tmpdir()], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  const deadline = Date.now() + SERVER_START_TIMEOUT_MS;
  for (;;) {
    const pong = await new Promise((resolve) => {
      const sock = net.connect(port, "127.0.0.1");
      sock.on("connect", () => sock.write("PING\r\n"));
      sock.on("data", (d) => { sock.destroy(); resolve(d.toString().startsWith("+PONG")); });
      sock.on("error", () => resolve(false));
    });
    if (pong) return { child, port };
    if (child.exitCode !== null || Date.now() > deadline) throw new Error("redis-server did not start (apt-get install redis-server)");
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Polls `fn` (an async predicate) until it holds, within `ms`.
async function until(what, ms, fn) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await fn().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function waitExit(child, ms) {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve(child.exitCode);
    const t = setTimeout(() => resolve("timeout"), ms);
    child.on("exit", (code, sig) => { clearTimeout(t); resolve(code === null ? sig : code); });
  });
}

(async () => {
  let server = null;
  let redis = null;
  let nodeA = null;
  let nodeB = null;
  let clusterConfig = null;
  let url = process.env.DEMO_URL;
  if (!url) {
    server = await startServer();
    url = server.url;
    server.child.removeAllListeners("exit");
  }
  console.log(`# demo at ${url}`);

  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "pw-profile-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1200, height: 760 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  context.setDefaultTimeout(STEP_TIMEOUT_MS);
  const pageErrors = [];
  const open = async (suffix = "") => {
    const p = await context.newPage();
    p.on("pageerror", (e) => pageErrors.push(e.message));
    p.on("console", (m) => { if (m.type() === "error") pageErrors.push(`console: ${m.text()}`); });
    const resp = await p.goto(url + suffix);
    if (!resp || resp.status() !== 200) throw new Error(`GET ${url} gave ${resp && resp.status()}`);
    return p;
  };
  const text = (p, sel) => p.locator(sel).first().textContent();
  const waitText = (p, sel, re) => p.waitForFunction(
    ([s, src]) => { const e = document.querySelector(s); return e && new RegExp(src).test(e.textContent); },
    [sel, re.source],
  );

  try {
    const a = await open();
    const b = await open();
    const stamp = Date.now().toString(36);

    await check("page is served as text/html with no-cache", async () => {
      const r = await a.request.get(url);
      const ct = r.headers()["content-type"];
      const cc = r.headers()["cache-control"];
      if (ct !== "text/html; charset=utf-8") throw new Error(`content-type ${ct}`);
      if (cc !== "no-cache") throw new Error(`cache-control ${cc}`);
    });

    await check("both pages connect", async () => {
      await waitText(a, "#status-text", /Connected · session #\d+/);
      await waitText(b, "#status-text", /Connected · session #\d+/);
    });

    await check("client count shows 2 on both pages", async () => {
      await waitText(a, "#clients", /^2$/);
      await waitText(b, "#clients", /^2$/);
      await waitText(a, "#presence-rooms", /#lobby\s*2/);
    });

    const hello = `hello from A ${stamp}`;
    await check("plain text from A shows up in B (and as mine in A)", async () => {
      await a.fill("#msg-input", hello);
      await a.press("#msg-input", "Enter");
      await b.locator("#log .msg .body", { hasText: hello }).waitFor();
      await a.locator("#log .msg.mine .body", { hasText: hello }).waitFor();
      if (await b.locator("#log .msg.mine", { hasText: hello }).count() !== 0) throw new Error("B marked A's message as its own");
    });

    await check("A joins room games", async () => {
      await a.fill("#room-input", "games");
      await a.click("#join-btn");
      await a.locator('#my-rooms li[data-room="games"]').waitFor();
      await a.locator("#log .note", { hasText: "You joined #games" }).waitFor();
      await waitText(a, "#presence-rooms", /#games\s*1/);
    });

    const gamesOnly = `games only ${stamp}`;
    await check("B joins games; A publishes to games only; B sees it tagged #games", async () => {
      await b.fill("#room-input", "games");
      await b.press("#room-input", "Enter");
      await b.locator('#my-rooms li[data-room="games"]').waitFor();
      await a.click('#my-rooms li[data-room="games"] .name');
      if (await a.inputValue("#target") !== "games") throw new Error("clicking the room did not select it as target");
      await a.fill("#msg-input", gamesOnly);
      await a.click("#send-btn");
      const m = b.locator('#log .msg[data-room="games"]', { hasText: gamesOnly });
      await m.waitFor();
      const tag = await m.locator(".tag").textContent();
      if (tag !== "#games") throw new Error(`tag ${tag}`);
      await waitText(a, "#presence-rooms", /#games\s*2/);
    });

    await check("a malformed control frame is shown as a polite error", async () => {
      await a.selectOption("#target", "");
      await a.fill("#msg-input", "{oops");
      await a.press("#msg-input", "Enter");
      await a.locator("#log .note.error", { hasText: "malformed" }).waitFor();
    });

    await check("B leaves games", async () => {
      await b.click('#my-rooms li[data-room="games"] button.leave');
      await b.locator('#my-rooms li[data-room="games"]').waitFor({ state: "detached" });
      await waitText(a, "#presence-rooms", /#games\s*1/);
    });

    await check("a page opened at #kitchen starts in room kitchen; count shows 3", async () => {
      const c = await open("#kitchen");
      await c.locator('#my-rooms li[data-room="kitchen"]').waitFor();
      if (await c.locator('#my-rooms li[data-room="lobby"]').count() !== 0) throw new Error("also in lobby");
      await waitText(a, "#clients", /^3$/);
      await c.close();
      await waitText(a, "#clients", /^2$/);
    });

    // The operations panel reads numbers, not text: each value element
    // carries its raw number in data-value.
    const opsValue = (p, sel) => p.locator(sel).first().getAttribute("data-value").then((v) => (v === "" || v == null ? null : Number(v)));
    // waitOps(page, selector, op, x): waits until the element's number `op` x.
    const waitOps = (p, sel, op, x) => p.waitForFunction(
      ([s, o, n]) => {
        const e = document.querySelector(s);
        if (!e || e.dataset.value === "" || e.dataset.value == null) return false;
        const v = Number(e.dataset.value);
        return o === ">=" ? v >= n : o === ">" ? v > n : v === n;
      },
      [sel, op, x],
    );

    await check("operations panel: live, connections >= the 2 open tabs, of max 1000", async () => {
      await a.locator('#ops[data-state="ok"]').waitFor();
      await waitOps(a, "#ops-connections", ">=", 2);
      await waitOps(a, "#ops-max-connections", "===", 1000);
      await waitOps(a, "#ops-rooms", ">=", 1);
      await waitText(a, "#ops-updated", /^live · /);
    });

    await check("operations panel: /status is JSON and agrees on the connections", async () => {
      const r = await a.request.get(url + "status");
      if (r.status() !== 200) throw new Error(`GET /status gave ${r.status()}`);
      if (!/^application\/json/.test(r.headers()["content-type"])) throw new Error(`content-type ${r.headers()["content-type"]}`);
      const s = await r.json();
      if (s.connections < 2) throw new Error(`connections ${s.connections}`);
      if (!("cluster" in s) || !Array.isArray(s.alerts)) throw new Error(`shape: ${JSON.stringify(s).slice(0, 200)}`);
    });

    await check("operations panel: deliveries total and rate move after messages are sent", async () => {
      await waitOps(a, "#ops-deliveries-total", ">=", 0);
      const before = await opsValue(a, "#ops-deliveries-total");
      await a.selectOption("#target", "");
      for (let i = 0; i < 5; i++) {
        await a.fill("#msg-input", `burst ${i} ${stamp}`);
        await a.press("#msg-input", "Enter");
      }
      await b.locator("#log .msg .body", { hasText: `burst 4 ${stamp}` }).waitFor();
      // 5 messages to lobby, where A and B are: at least 10 deliveries.
      await waitOps(a, "#ops-deliveries-total", ">=", before + 10);
      await waitOps(a, "#ops-deliveries-rate", ">", 0);
      await waitOps(a, "#ops-broadcasts-rate", ">", 0);
    });

    await check("operations panel: the openai upstream row shows a closed breaker and counts a gateway call", async () => {
      const row = a.locator('#ops-upstreams tr[data-upstream="openai"]');
      await row.waitFor();
      await row.locator('td.breaker[data-state="closed"] .pill').waitFor();
      const r = await a.request.post(url + "v1/chat/completions", {
        data: { model: "gpt-4o-mini", messages: [{ role: "user", content: "Hello from the browser test" }] },
      });
      if (r.status() !== 200) throw new Error(`gateway call gave ${r.status()}: ${await r.text()}`);
      await waitOps(a, '#ops-upstreams tr[data-upstream="openai"] td[data-field="calls"]', ">=", 1);
      await waitOps(a, '#ops-upstreams tr[data-upstream="openai"] td[data-field="denied"]', "===", 0);
    });

    await check("operations panel: the alerts list is shown (items or the all-quiet note)", async () => {
      const items = await a.locator("#ops-alerts li").count();
      const quiet = await a.locator("#ops-no-alerts").isVisible();
      if (items === 0 && !quiet) throw new Error("neither alerts nor the all-quiet note");
      for (const li of await a.locator("#ops-alerts li").all()) {
        const st = await li.getAttribute("data-state");
        if (st !== "firing" && st !== "resolved") throw new Error(`alert state ${st}`);
      }
    });

    await check(`screenshot saved to ${SCREENSHOT}`, async () => {
      // Let the panel take one more poll so the rate and sparkline show.
      await waitOps(a, '#ops-upstreams tr[data-upstream="openai"] td[data-field="calls"]', ">=", 1);
      await a.waitForTimeout(300);
      await a.screenshot({ path: SCREENSHOT });
      console.log(`# screenshot: ${SCREENSHOT}`);
    });

    await check("no JS errors on the pages", async () => {
      if (pageErrors.length) throw new Error(pageErrors.join(" | "));
    });

    if (server) {
      await check("SIGTERM: pages see close 1001 (server shutting down); server exits 0", async () => {
        server.child.kill("SIGTERM");
        // The log keeps the close; the status line shows it only until the
        // first retry (250-500 ms later), too briefly to wait on.
        await waitText(a, "#log", /Disconnected \(1001 going away: server shutting down\)/);
        await waitText(b, "#log", /Disconnected \(1001 going away: server shutting down\)/);
        await waitText(a, "#status-text", /retrying in \d+s/);
        const code = await waitExit(server.child, SERVER_EXIT_TIMEOUT_MS);
        if (code !== 0) throw new Error(`server exit ${code}\n${server.log()}`);
        await b.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-closed.png") });
      });

      await check("restarted server: pages reconnect and restore their rooms", async () => {
        server = await startServer(new URL(url).host);
        server.child.removeAllListeners("exit");
        const timeout = 20000;
        await a.waitForFunction(() => /Connected · session/.test(document.querySelector("#status-text").textContent), null, { timeout });
        await b.waitForFunction(() => /Connected · session/.test(document.querySelector("#status-text").textContent), null, { timeout });
        await a.locator('#my-rooms li[data-room="games"]').waitFor();
        await a.locator('#my-rooms li[data-room="lobby"]').waitFor();
        await waitText(a, "#presence-rooms", /#games\s*1/);
        if (await b.locator('#my-rooms li[data-room="games"]').count() !== 0) throw new Error("B rejoined games");
        await waitText(b, "#clients", /^2$/);
      });

      await check("restarted server: recovery says the history was lost (a new epoch)", async () => {
        // Both saw lobby messages before the restart, so both asked to
        // recover lobby; the restarted server's history is new.
        await waitText(a, "#log", /History lost in #lobby, reloaded/);
        await waitText(b, "#log", /History lost in #lobby, reloaded/);
      });

      await check("narrow layout screenshot", async () => {
        await b.setViewportSize({ width: 400, height: 900 });
        await b.waitForTimeout(200);
        await b.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-narrow.png"), fullPage: true });
      });

      await check("second SIGTERM: server exits 0", async () => {
        server.child.kill("SIGTERM");
        const code = await waitExit(server.child, SERVER_EXIT_TIMEOUT_MS);
        if (code !== 0) throw new Error(`server exit ${code}\n${server.log()}`);
      });

      await check("--tls-cert naming a missing file: exit 2, the file named", async () => {
        const missing = path.join(os.tmpdir(), `happynet-no-such-cert-${process.pid}.pem`);
        const child = spawn(BIN, ["--bind", "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing], {
          env: { ...process.env, HAPPYNET_CONFIG: "" },
          stdio: ["ignore", "pipe", "pipe"],
        });
        let err = "";
        child.stderr.on("data", (d) => { err += d.toString(); });
        const code = await waitExit(child, SERVER_EXIT_TIMEOUT_MS);
        if (code === "timeout") child.kill("SIGKILL");
        if (code !== 2) throw new Error(`exit ${code}: ${err}`);
        if (!err.includes(missing)) throw new Error(`message does not name the file: ${err}`);
      });
    }

    if (server) {
      await check("cluster restart: the page recovers on the restarted node what node B broadcast meanwhile", async () => {
        redis = await startRedis();
        clusterConfig = path.join(os.tmpdir(), `happynet-demo-cluster-${process.pid}.json`);
        fs.writeFileSync(clusterConfig, JSON.stringify({
          network: { cluster: { redis_url: `redis://127.0.0.1:${redis.port}`, presence_interval_ms: 200 } },
        }));
        nodeA = await startServer("127.0.0.1:0", clusterConfig);
        nodeB = await startServer("127.0.0.1:0", clusterConfig);
        for (const n of [nodeA, nodeB]) n.child.removeAllListeners("exit");
        const ready = (n) => until(`${n.url} ready (linked to Redis)`, SERVER_START_TIMEOUT_MS, async () => (await fetch(n.url + "ready")).status === 200);
        await ready(nodeA);
        await ready(nodeB);
        const positionedOnB = async (n) => {
          const s = await (await fetch(nodeB.url + "status")).json();
          return s.cluster && s.cluster.positioned_own >= n;
        };
        const post = async (text) => {
          const r = await fetch(nodeB.url + "broadcast?room=lobby", { method: "POST", headers: { "content-type": "text/plain" }, body: text });
          if (r.status !== 202) throw new Error(`POST /broadcast on node B gave ${r.status}`);
        };
        const p = await context.newPage();
        p.on("pageerror", (e) => pageErrors.push(e.message));
        await p.goto(nodeA.url);
        await waitText(p, "#status-text", /Connected · session #\d+/);
        for (let i = 0; i < 3; i++) await post(`before ${i} ${stamp}`);
        await p.locator("#log .msg .body", { hasText: `before 2 ${stamp}` }).waitFor();

        nodeA.child.kill("SIGKILL");
        await waitExit(nodeA.child, SERVER_EXIT_TIMEOUT_MS);
        await waitText(p, "#status-text", /retrying in \d+s/);
        const MISSED = 4;
        for (let i = 0; i < MISSED; i++) await post(`meanwhile ${i} ${stamp}`);
        // In the stream (node B reads its own back) before node A starts.
        await until("node B's broadcasts positioned", STEP_TIMEOUT_MS, () => positionedOnB(3 + MISSED));
        nodeA = await startServer(new URL(nodeA.url).host, clusterConfig);
        nodeA.child.removeAllListeners("exit");
        await p.waitForFunction(() => /Connected · session/.test(document.querySelector("#status-text").textContent), null, { timeout: 20000 });
        await waitText(p, "#log", new RegExp(`Recovered ${MISSED} messages in #lobby`));
        for (let i = 0; i < MISSED; i++) await p.locator("#log .msg .body", { hasText: `meanwhile ${i} ${stamp}` }).waitFor();
        if (await p.locator("#log .note", { hasText: "History lost in #lobby" }).count() !== 0) throw new Error("the page was told the history was lost");
        await p.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-cluster.png") });
        await p.close();
      });
    }
  } catch (e) {
    fail("unexpected", e);
  } finally {
    for (const n of [nodeA, nodeB]) if (n && n.child.exitCode === null) n.child.kill("SIGKILL");
    if (redis) redis.child.kill("SIGKILL");
    if (clusterConfig) fs.rmSync(clusterConfig, { force: true });
    await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
    if (server && server.child.exitCode === null) {
      server.child.kill("SIGKILL");
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.log(`FAIL - setup: ${e.message}`); console.log("0 passed, 1 failed"); process.exit(1); });

// What both JavaScript peers of fanout_bench share: the payload, the clock
// it is stamped with, the broadcast driver's pacing, the control routes'
// query and the child-process contract (print the port, exit when stdin
// closes). Each server file is only its WebSocket library's idiom.

/** Every broadcast is exactly this long (testkit/src/bench/payload.rs). */
export const PAYLOAD_BYTES = 64;
/** Run numbers take four digits in the payload. */
const RUN_MODULUS = 10000;
/** The first frame every client waits for. */
export const WELCOME = JSON.stringify({ type: "welcome" });
/** The most broadcasts one /bench/run may ask for (as in fanout_bench.rs). */
const MAX_RUN_COUNT = 10000000;
/** At full speed the driver yields to the event loop after this many
 * broadcasts, so that sockets are written and clients serviced; the Rust
 * servers' driver waits for a hub round trip at the same interval. */
const YIELD_EVERY = 16;

// Wall-clock nanoseconds, comparable with the Rust client's SystemTime:
// Date.now() has millisecond resolution, so the monotonic clock is anchored
// to it at the instant Date.now() ticks over (a wait of at most 1 ms at
// start), which puts the anchor within microseconds of the real time.
const anchorNs = (() => {
  const first = Date.now();
  let ms = first;
  while (ms === first) ms = Date.now();
  return BigInt(ms) * 1000000n - process.hrtime.bigint();
})();

/** Nanoseconds since the Unix epoch. */
export function unixNanos() {
  return anchorNs + process.hrtime.bigint();
}

/** `B<run:4>:<seq:9>:<sent ns:20>:` padded with dots to 64 bytes. */
export function benchPayload(run, seq, sentNs) {
  const head =
    "B" +
    String(run % RUN_MODULUS).padStart(4, "0") +
    ":" +
    String(seq).padStart(9, "0") +
    ":" +
    String(sentNs).padStart(20, "0") +
    ":";
  return head.padEnd(PAYLOAD_BYTES, ".");
}

/** The query of `POST /bench/run?run=R&count=M&rate=F`, or null if any part
 * is missing or out of range (the route then answers 400). */
export function parseRunQuery(searchParams) {
  const num = (name) => {
    const text = searchParams.get(name);
    return text === null || text === "" ? NaN : Number(text);
  };
  const run = num("run");
  const count = num("count");
  const rate = num("rate");
  const ok =
    Number.isInteger(run) &&
    run >= 0 &&
    Number.isInteger(count) &&
    count >= 0 &&
    count <= MAX_RUN_COUNT &&
    Number.isFinite(rate) &&
    rate >= 0;
  return ok ? { run, count, rate } : null;
}

/** Sends `count` broadcasts of run `run` through `broadcast(payload)`,
 * `rate` per second, or as fast as the event loop allows when `rate` is 0.
 * Returns at once: the driver starts on the next turn of the event loop
 * (so the route's 202 goes out first, as the Rust servers' does) and never
 * sends more than YIELD_EVERY broadcasts without letting the loop poll its
 * sockets. That matters when a server falls behind the rate: a timer that
 * is always already due would keep Node in its timers phase and starve
 * every socket, the control connection included. */
export function drive(broadcast, { run, count, rate }) {
  let seq = 0;
  const start = performance.now();
  const due = (s) => (rate > 0 ? start + (s * 1000) / rate : start);
  const step = () => {
    const end = Math.min(count, seq + YIELD_EVERY);
    // Every broadcast that is due goes now; a late timer skips none.
    while (seq < end && performance.now() >= due(seq)) {
      broadcast(benchPayload(run, seq, unixNanos()));
      seq += 1;
    }
    if (seq >= count) return;
    const wait = due(seq) - performance.now();
    if (wait > 0) setTimeout(step, wait);
    else setImmediate(step);
  };
  setImmediate(step);
}

/** The `/bench/stats` body; these peers evict no one. */
export function statsBody(open, sessions) {
  return JSON.stringify({
    open,
    sessions,
    evicted_slow_consumer: 0,
    evicted_heartbeat: 0,
  });
}

/** Tells the parent the port (one line on stdout) and exits when the
 * parent closes our stdin (it exited or dropped its guard). */
export function announceAndWatchStdin(port) {
  process.stdout.write(`${port}\n`);
  process.stdin.on("data", () => {});
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("close", () => process.exit(0));
  process.stdin.resume();
}

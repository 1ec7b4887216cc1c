//! Run with: cargo run --example fake_upstream -- --bind 127.0.0.1:9000
//!
//! A fake upstream HTTP server with fault injection, as a program: point a
//! demo or a benchmark at it to see how the client copes with a slow, flaky
//! or dead upstream. Besides a JSON echo on every path it serves an
//! OpenAI-compatible API (`POST /v1/chat/completions`, plain or streamed,
//! and `GET /v1/models`), so an LLM demo runs offline, and versioned
//! cacheable resources (`GET /cache/{id}` with `ETag`/`Last-Modified`). The
//! server itself is `testkit::fake_upstream` (`testkit/src/fake_upstream.rs`),
//! which tests and benchmark programs also start in-process; see that file
//! for the routes, the per-request `x-fault-*` headers and the order in which
//! faults are chosen.
//!
//! ```text
//! fake_upstream [--bind ADDR] [--name NAME] [--api-key KEY]
//!               [--latency-ms N] [--error-rate R] [--status S]
//!               [--retry-after V] [--fail-next N] [--reset-rate R]
//!               [--hang-rate R] [--chunk-delay-ms N] [--insufficient-quota]
//! ```
//!
//! A bad flag is reported on stderr and the process exits with status 2.
//! Ctrl-C or SIGTERM stops it and prints the counters. While it runs, the
//! faults can be changed without a restart:
//!
//! ```text
//! curl -X POST localhost:9000/__fault -d '{"error_rate":0.2,"retry_after":"1"}'
//! curl localhost:9000/__stats
//! curl localhost:9000/v1/chat/completions -H 'Authorization: Bearer sk-test' \
//!      -d '{"model":"fake-gpt","stream":true,"messages":[{"role":"user","content":"hi there"}]}'
//! curl -i localhost:9000/cache/a -H 'If-None-Match: "v1"'
//! curl -X POST localhost:9000/cache/a/bump
//! ```

use happynet::server::Signals;
use std::net::SocketAddr;
use std::process::ExitCode;
use testkit::fake_upstream::{FakeUpstream, Faults, StartOptions};

/// Where it listens when `--bind` is not given.
const DEFAULT_BIND: &str = "127.0.0.1:9000";

/// The name sent in `x-upstream` when `--name` is not given.
const DEFAULT_NAME: &str = "fake";

/// Exit status for bad flags: the caller's mistake.
const EXIT_USAGE: u8 = 2;

/// Exit status when the server cannot start or fails while running.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
usage: fake_upstream [options]

  --bind ADDR            address to listen on (default 127.0.0.1:9000)
  --name NAME            sent in the x-upstream response header (default fake)
  --api-key KEY          require KEY on /v1/* as `Authorization: Bearer KEY`,
                         `x-api-key: KEY` or `?api_key=KEY` (default: none)
  --latency-ms N         delay every answer by N ms (default 0, at most 120000)
  --error-rate R         fraction 0..=1 of requests answered with --status
  --status S             status of injected errors, 400..=599 (default 503)
  --retry-after V        Retry-After sent with injected errors (e.g. 2)
  --fail-next N          fail the first N requests with --status
  --reset-rate R         fraction 0..=1 of connections aborted without a response
  --hang-rate R          fraction 0..=1 of requests never answered (120 s cap)
  --chunk-delay-ms N     pause N ms between streamed completion chunks
                         (default 0, at most 10000)
  --insufficient-quota   answer every request 429 insufficient_quota, without
                         Retry-After (a client must not retry it)
  -h, --help             print this help

The three rates split one roll of the dice, so they must sum to at most 1.

Routes: POST /v1/chat/completions (\"stream\": true for server-sent events),
GET /v1/models, GET /cache/{id}[?cc=CACHE-CONTROL] (ETag, If-None-Match,
If-Modified-Since), POST /cache/{id}/bump, GET|POST /__fault, GET /__stats;
any other path is a JSON echo. Per-request fault headers: x-fault-latency-ms,
x-fault-status, x-fault-retry-after, x-fault-reset, x-fault-hang,
x-fault-quota, x-fault-chunk-delay-ms.";

/// What the command line asked for.
#[derive(Debug)]
struct Options {
    bind: SocketAddr,
    name: String,
    api_key: Option<String>,
    faults: Faults,
}

/// Why the command line was refused.
#[derive(Debug)]
enum ArgsError {
    /// `--help`: not an error, but the same early exit.
    Help,
    /// Anything else, with a message for the user.
    Bad(String),
}

/// The flags that take a value, in the order of the usage text.
const FLAGS: [&str; 11] = [
    "--bind",
    "--name",
    "--api-key",
    "--latency-ms",
    "--error-rate",
    "--status",
    "--retry-after",
    "--fail-next",
    "--reset-rate",
    "--hang-rate",
    "--chunk-delay-ms",
];

/// The flag that takes no value: present means on.
const QUOTA_SWITCH: &str = "--insufficient-quota";

/// Parses the flags by hand: a handful of options do not justify a parser
/// crate. Both `--flag VALUE` and `--flag=VALUE` are accepted; a flag may be
/// given once.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, ArgsError> {
    let mut values: [Option<String>; FLAGS.len()] = Default::default();
    let mut insufficient_quota = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(ArgsError::Help);
        }
        if flag == QUOTA_SWITCH {
            if inline.is_some() {
                return Err(ArgsError::Bad(format!("{flag} takes no value")));
            }
            if std::mem::replace(&mut insufficient_quota, true) {
                return Err(ArgsError::Bad(format!("{flag} given more than once")));
            }
            continue;
        }
        let Some(index) = FLAGS.iter().position(|known| *known == flag) else {
            return Err(ArgsError::Bad(format!("unknown argument `{arg}`")));
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(ArgsError::Bad(format!("{flag} needs a value"))),
        };
        if values[index].replace(value).is_some() {
            return Err(ArgsError::Bad(format!("{flag} given more than once")));
        }
    }
    let [bind, name, api_key, latency_ms, error_rate, status, retry_after, fail_next, reset_rate, hang_rate, chunk_delay_ms] =
        values;

    let bind_text = bind.as_deref().unwrap_or(DEFAULT_BIND);
    let bind = bind_text.parse().map_err(|_| {
        ArgsError::Bad(format!(
            "--bind `{bind_text}` is not an IP:PORT address (e.g. 127.0.0.1:9000)"
        ))
    })?;
    let faults = Faults {
        latency_ms: parse_value("--latency-ms", latency_ms, "a whole number of ms")?,
        error_rate: parse_value("--error-rate", error_rate, "a fraction such as 0.1")?,
        error_status: parse_value("--status", status, "an HTTP status such as 503")?,
        retry_after,
        fail_next: parse_value("--fail-next", fail_next, "a whole number")?,
        reset_rate: parse_value("--reset-rate", reset_rate, "a fraction such as 0.05")?,
        hang_rate: parse_value("--hang-rate", hang_rate, "a fraction such as 0.01")?,
        insufficient_quota,
        stream_chunk_delay_ms: parse_value(
            "--chunk-delay-ms",
            chunk_delay_ms,
            "a whole number of ms",
        )?,
        // Set through `POST /__fault` (tests of slow readers need it, a
        // person running the program rarely does).
        ..Faults::default()
    };
    // The same checks as `POST /__fault`, so the message names the field.
    faults
        .validate()
        .map_err(|why| ArgsError::Bad(format!("bad fault flags: {why}")))?;
    Ok(Options {
        bind,
        name: name.unwrap_or_else(|| DEFAULT_NAME.to_owned()),
        api_key,
        faults,
    })
}

/// Parses one flag's value, or gives the type's default when it is absent.
fn parse_value<T: std::str::FromStr + Default>(
    flag: &str,
    value: Option<String>,
    expected: &str,
) -> Result<T, ArgsError> {
    match value {
        None => Ok(T::default()),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| ArgsError::Bad(format!("{flag} `{text}` is not {expected}"))),
    }
}

/// Serves until Ctrl-C or SIGTERM, then prints the counters and stops.
async fn serve(options: Options) -> ExitCode {
    // Listened for before binding so that a SIGTERM sent right after
    // start-up is not lost.
    let signals = match Signals::listen() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake_upstream: cannot listen for SIGTERM: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let start = StartOptions {
        bind: options.bind,
        api_key: options.api_key,
        ..StartOptions::default()
    };
    let upstream = match FakeUpstream::start_with(&options.name, options.faults, start).await {
        Ok(u) => u,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            eprintln!("fake_upstream: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("fake_upstream: cannot listen on {}: {e}", options.bind);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    log::info!(
        "fake upstream {:?} listening on {} ({}) with {:?}",
        upstream.name(),
        upstream.url("/"),
        if upstream.api_key().is_some() {
            "API key required on /v1/*"
        } else {
            "no API key required"
        },
        upstream.state.faults()
    );

    signals.recv().await;
    log::info!("stopping; counters {:?}", upstream.stats());
    upstream.stop().await;
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let options = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Bad(why)) => {
            eprintln!("fake_upstream: {why}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    actix_web::rt::System::new().block_on(serve(options))
}

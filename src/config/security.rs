//! `network.security`: the flood and abuse guards' settings, and the
//! parsers the guards share with the configuration — [`IpRange`] (an
//! `exempt_ips` entry), [`check_token`] and [`normalize_origin`] — which live
//! here so that the configuration checks a value exactly as the guard will
//! read it, without importing the guards.

use super::checks::{at_least_one, validate_quota, ConfigError, Seconds};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// `network.security`: flood and abuse guards (the `security` module). Every
/// guard is on by default; a per-IP limit or timeout set to 0 turns that one
/// guard off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Open WebSockets per client IP; beyond it the upgrade gets 429 before
    /// it happens. 0: no per-IP cap. Default 64.
    pub max_connections_per_ip: usize,
    /// Open TCP connections per client IP, any route, enforced by
    /// `Network::on_connect` (the connection is shut at once). 0: no cap.
    /// Not applied with `trust_forwarded_for` (the peer is then a proxy).
    /// Default 256.
    pub max_tcp_connections_per_ip: usize,
    /// New WebSocket upgrades per second per client IP (refused attempts
    /// count too); beyond it (and the burst) 429 + `Retry-After`. 0: no
    /// limit. Default 20.
    pub connections_per_second: f64,
    /// Upgrades one IP may make at once before the rate applies. Default 40.
    pub connection_burst: u32,
    /// Requests per second per client IP on the API routes (`POST
    /// /broadcast`, `/proxy/…`, `/v1/…`); beyond it 429 + `Retry-After`. 0: no
    /// limit. Default 50.
    pub requests_per_second: f64,
    /// Requests one IP may make at once before the rate applies. Default 100.
    pub request_burst: u32,
    /// Client IPs each per-IP rate limiter tracks at once (idle ones are
    /// evicted); a new IP beyond it gets 429 until room is made. Default
    /// 65536.
    pub max_tracked_ips: usize,
    /// Tokens `/ws` requires, one of them per upgrade (`?token=`,
    /// `Sec-WebSocket-Protocol: happynet, token.<token>` or `Authorization:
    /// Bearer`). Empty: no token is required. Default empty.
    pub ws_tokens: Vec<String>,
    /// Tokens `POST /broadcast` requires (`Authorization: Bearer <token>`;
    /// 401 without one). Empty: no token is required. Default empty.
    pub broadcast_tokens: Vec<String>,
    /// Tokens `GET /status` requires (`Authorization: Bearer <token>`).
    /// Empty: none. Default empty.
    pub status_tokens: Vec<String>,
    /// Tokens `GET /metrics` requires (`Authorization: Bearer <token>`, as
    /// Prometheus' `authorization` scrape setting sends it). Empty: none.
    /// Default empty.
    pub metrics_tokens: Vec<String>,
    /// The shortest time between two snapshots of the node behind
    /// `/status` (and, separately, `/metrics`), seconds: requests that
    /// arrive meanwhile wait for the next one and share it, so a flood costs
    /// the hub one question per interval. Each answer is taken after its
    /// request arrived. 0: no spacing (one snapshot at a time, shared by
    /// the requests waiting for it). At most 10. Default 0.25.
    pub snapshot_interval: Seconds,
    /// Origins (`scheme://host[:port]`) a browser may come from, besides the
    /// server's own: a `/ws` upgrade from another origin gets 403 when the
    /// list is not empty, and a state-changing request (`POST /broadcast`,
    /// a non-GET `/proxy/…` or `/v1/…`, any route behind `api_guard`) from
    /// neither the server's own origin nor one of these always does.
    /// Requests without `Origin` (non-browser clients) are allowed. Default
    /// empty.
    pub allowed_origins: Vec<String>,
    /// How long a client has to send a connection's first request head,
    /// seconds; then 408 and the connection is closed. The app applies it:
    /// `HttpServer::client_request_timeout(net.security()
    /// .request_header_timeout())`. 0: no timeout. Default 5.
    pub request_header_timeout: Seconds,
    /// How long a client has to send a request body on the API routes,
    /// seconds, from the end of its head; then 408 and the connection is
    /// closed. 0: no timeout. Default 30.
    pub request_body_timeout: Seconds,
    /// Addresses and CIDR ranges the per-IP limits do not apply to (token,
    /// origin and timeouts still do). Unset: `["127.0.0.0/8", "::1"]`
    /// ([`DEFAULT_EXEMPT_IPS`]), a local tool is not one client — but behind
    /// a reverse proxy on the same host every client is 127.0.0.1, so the
    /// guards then limit nobody, and a warning says so at start unless
    /// `trust_forwarded_for` is set or this key is written out (even as the
    /// same list, or `[]`): see [`SecurityConfig::exempt_ips`].
    pub exempt_ips: Option<Vec<String>>,
    /// Take the client IP from the last `X-Forwarded-For` entry rather than
    /// the peer address. Only for servers reachable solely through a proxy
    /// that appends it. Default false.
    pub trust_forwarded_for: bool,
    /// Keep the per-IP connection and request rates in Redis, so that they
    /// hold across every node of the cluster rather than per node. Requires
    /// `network.cluster`. Default false.
    pub shared_rate_limits: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            max_connections_per_ip: 64,
            max_tcp_connections_per_ip: 256,
            connections_per_second: 20.0,
            connection_burst: 40,
            requests_per_second: 50.0,
            request_burst: 100,
            max_tracked_ips: 65_536,
            ws_tokens: Vec::new(),
            broadcast_tokens: Vec::new(),
            status_tokens: Vec::new(),
            metrics_tokens: Vec::new(),
            snapshot_interval: Seconds(DEFAULT_SNAPSHOT_INTERVAL),
            allowed_origins: Vec::new(),
            request_header_timeout: Seconds::secs(5),
            request_body_timeout: Seconds::secs(30),
            exempt_ips: None,
            trust_forwarded_for: false,
            shared_rate_limits: false,
        }
    }
}

/// What `network.security.exempt_ips` is when the file does not set it.
pub const DEFAULT_EXEMPT_IPS: [&str; 2] = ["127.0.0.0/8", "::1"];

/// `network.security.snapshot_interval`'s default: a dashboard polling
/// every second never waits, a flood costs four snapshots a second.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(250);

/// The longest `network.security.snapshot_interval`: a request may wait
/// this long for its snapshot, which must stay well inside any client's
/// timeout.
pub const MAX_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

impl SecurityConfig {
    /// The ranges the per-IP limits skip: `exempt_ips`, or
    /// [`DEFAULT_EXEMPT_IPS`] when it is unset.
    pub fn effective_exempt_ips(&self) -> Vec<String> {
        self.exempt_ips
            .clone()
            .unwrap_or_else(|| DEFAULT_EXEMPT_IPS.iter().map(|r| (*r).to_owned()).collect())
    }

    /// Checks `network.security`; the error names the key's path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.security.{key}");
        if self.max_tcp_connections_per_ip > 0
            && self.max_tcp_connections_per_ip < self.max_connections_per_ip
        {
            return Err(ConfigError::invalid(
                &path("max_tcp_connections_per_ip"),
                "must be >= network.security.max_connections_per_ip (or 0)",
            ));
        }
        for (rate, rate_key, burst, burst_key) in [
            (
                self.connections_per_second,
                "connections_per_second",
                self.connection_burst,
                "connection_burst",
            ),
            (
                self.requests_per_second,
                "requests_per_second",
                self.request_burst,
                "request_burst",
            ),
        ] {
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(ConfigError::invalid(
                    &path(rate_key),
                    "must be >= 0 (0: no limit)",
                ));
            }
            // 0 turns the limit off; any other rate is the limiter's to judge.
            if rate > 0.0 {
                validate_quota(
                    &path(rate_key),
                    &path(burst_key),
                    rate,
                    Duration::from_secs(1),
                    burst,
                )?;
            }
        }
        at_least_one(&path("max_tracked_ips"), self.max_tracked_ips)?;
        for (key, tokens) in [
            ("ws_tokens", &self.ws_tokens),
            ("broadcast_tokens", &self.broadcast_tokens),
            ("status_tokens", &self.status_tokens),
            ("metrics_tokens", &self.metrics_tokens),
        ] {
            for (i, token) in tokens.iter().enumerate() {
                check_token(token).map_err(|e| {
                    ConfigError::invalid(&format!("network.security.{key}[{i}]"), e)
                })?;
            }
        }
        if self.snapshot_interval.0 > MAX_SNAPSHOT_INTERVAL {
            return Err(ConfigError::invalid(
                &path("snapshot_interval"),
                format!("must be at most {} s", MAX_SNAPSHOT_INTERVAL.as_secs()),
            ));
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            normalize_origin(origin).map_err(|e| {
                ConfigError::invalid(&format!("network.security.allowed_origins[{i}]"), e)
            })?;
        }
        for (i, range) in self.exempt_ips.iter().flatten().enumerate() {
            IpRange::parse(range).map_err(|e| {
                ConfigError::invalid(&format!("network.security.exempt_ips[{i}]"), e)
            })?;
        }
        Ok(())
    }
}

/// An address or CIDR range, as written in `exempt_ips`: `10.0.0.0/8`,
/// `::1`, `fd00::/8`.
///
/// Ours rather than `ipnet`'s `IpNet`: `IpNet` parses only `addr/prefix`
/// (a bare address is another type), says nothing more than "invalid IP
/// address syntax" for a prefix out of range, and does not fold an
/// IPv4-mapped IPv6 peer into its IPv4 address. Each of those would be
/// wrapping code around it, longer than the 40 lines it would replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// The first address of the range (host bits cleared).
    addr: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Parses `addr` or `addr/prefix`. Host bits past the prefix are ignored.
    pub fn parse(s: &str) -> Result<IpRange, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("is not an IP address or CIDR range: {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("has a prefix length outside 0..={max}: {s:?}")),
            },
        };
        Ok(IpRange {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The range of `prefix` bits (at most the address's length) that holds
    /// `ip`: what the per-IP limits key an IPv6 client by (its /64).
    pub fn containing(ip: IpAddr, prefix: u8) -> IpRange {
        let prefix = prefix.min(if ip.is_ipv4() { 32 } else { 128 });
        IpRange {
            addr: mask(ip, prefix),
            prefix,
        }
    }

    /// The range's first address (host bits cleared).
    pub fn first(&self) -> IpAddr {
        self.addr
    }

    /// Whether `ip` is in the range. IPv4-mapped IPv6 addresses count as
    /// IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// `ip` with every bit past `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Whether `c` may appear in an HTTP token (RFC 9110 `tchar`), and so in a
/// `Sec-WebSocket-Protocol` value.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Checks a configured WebSocket token: it must be usable in every way a
/// client may present it, so it is limited to HTTP token characters (hex or
/// unpadded base64url are fine; `/`, `=` and spaces are not).
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if !token.bytes().all(is_tchar) {
        return Err(
            "must consist of letters, digits and !#$%&'*+-.^_`|~ (it must fit in \
             Sec-WebSocket-Protocol; use hex or unpadded base64url)"
                .to_owned(),
        );
    }
    Ok(())
}

/// An origin in the form browsers send it: lower-case `scheme://host`, with
/// `:port` only when it is not the scheme's default. Errors say what is
/// wrong (for the config path they are reported under).
pub fn normalize_origin(origin: &str) -> Result<String, String> {
    let uri: actix_web::http::Uri = origin
        .trim()
        .parse()
        .map_err(|e| format!("is not an origin (scheme://host[:port]): {e}"))?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err("is not an origin: it needs a scheme and a host (scheme://host[:port])".into());
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("is not an origin: it must not have a path or query".into());
    }
    let scheme = scheme.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn ranges_match_their_addresses() {
        let lo = IpRange::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.0.0.1")));
        assert!(lo.contains(ip("127.255.0.9")));
        assert!(lo.contains(ip("::ffff:127.0.0.2")), "IPv4-mapped");
        assert!(!lo.contains(ip("128.0.0.1")));
        assert!(!lo.contains(ip("::1")));
        let one = IpRange::parse("::1").unwrap();
        assert!(one.contains(ip("::1")));
        assert!(!one.contains(ip("::2")));
        assert!(IpRange::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(IpRange::parse("10.0.0.0/33").is_err());
        assert!(IpRange::parse("example.com").is_err());
        assert_eq!(
            IpRange::parse("10.1.2.3/8").unwrap(),
            IpRange::parse("10.0.0.0/8").unwrap()
        );
    }

    #[test]
    fn origins_are_normalised_as_browsers_send_them() {
        assert_eq!(
            normalize_origin("HTTPS://Example.com:443/").unwrap(),
            "https://example.com"
        );
        assert_eq!(
            normalize_origin("http://localhost:8080").unwrap(),
            "http://localhost:8080"
        );
        assert!(normalize_origin("https://example.com/path").is_err());
        assert!(normalize_origin("example.com").is_err());
        assert!(normalize_origin("null").is_err());
    }

    #[test]
    fn tokens_must_fit_in_a_subprotocol() {
        assert!(check_token("abc-DEF_123.x~").is_ok());
        assert!(check_token("").is_err());
        assert!(check_token("has space").is_err());
        assert!(check_token("base64/with=").is_err());
        assert!(check_token("a,b").is_err());
    }
}

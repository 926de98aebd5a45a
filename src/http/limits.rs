//! Per-client limits of the API: who a client is (its token's name, else its address,
//! IPv6 by /64), the publish rate each one may use (`limits.publish_rate_per_sec`), and
//! the answers to connections turned away or too slow.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use warp::reply::Response;

use super::error::{ApiError, ErrorKind};
use crate::config::LimitsSettings;

/// Why the server turned a connection away when it accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// All `server.max_connections` slots are taken.
    ServerFull,
    /// The client's address has `limits.max_connections_per_client` connections open.
    ClientFull,
}

/// The answer to a connection turned away: an event stream gets the SSE `retry:` hint
/// (EventSource gives up for good after an error status); other requests 503
/// `unavailable` (server full) or 429 `rate_limited` (client over its count), with
/// `Retry-After: 1`.
pub(crate) fn refusal(why: Refusal, event_stream: bool) -> Response {
    if event_stream {
        return super::sse::retry_later();
    }
    let error = match why {
        Refusal::ServerFull => ApiError::new(
            ErrorKind::Unavailable,
            "the server is at its connection limit (server.max_connections); try again later",
        ),
        Refusal::ClientFull => ApiError::new(
            ErrorKind::RateLimited,
            "this client has limits.max_connections_per_client connections open",
        ),
    };
    error.retry_after(1).into_response()
}

/// The 408 `request_timeout` for a request head that did not come whole in time, made
/// once and sent as it is ([`head_timed_out_sent`] counts each time).
pub(crate) fn head_timed_out() -> Response {
    head_timeout().response()
}

/// Counts and logs a [`head_timed_out`] answer sent.
pub(crate) fn head_timed_out_sent() {
    head_timeout().record();
}

fn head_timeout() -> ApiError {
    ApiError::new(
        ErrorKind::RequestTimeout,
        "the request head did not come within server.request_timeout_secs",
    )
}

/// The address a connection comes from, put into each request's extensions by the
/// server so that routes can tell clients apart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub IpAddr);

/// The address that stands for a client: IPv4 as it is (an IPv4-mapped IPv6 address
/// as its IPv4), IPv6 cut to its /64, the block one host or subscriber usually gets.
pub(crate) fn client_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Whom a per-client limit counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// A request with a valid token: the token's name (or the JWT's subject).
    Token(Arc<str>),
    /// A request without one: its [`client_address`].
    Address(IpAddr),
}

impl ClientKey {
    /// The key of a caller known as `name` (if it presented a token) from `peer`.
    pub(crate) fn of(name: Option<&Arc<str>>, peer: Option<Peer>) -> Self {
        match (name, peer) {
            (Some(name), _) => ClientKey::Token(name.clone()),
            (None, Some(Peer(ip))) => ClientKey::Address(client_address(ip)),
            // Requests that did not come through the server's listener (tests of the
            // routes alone) share one key.
            (None, None) => ClientKey::Address(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        }
    }
}

/// The publish rate of each client, a token bucket per [`ClientKey`]; `None`: no limit.
pub(crate) struct PublishRate(Option<DefaultKeyedRateLimiter<ClientKey>>);

impl PublishRate {
    pub(crate) fn new(limits: &LimitsSettings) -> Self {
        PublishRate(NonZeroU32::new(limits.publish_rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(limits.publish_burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        }))
    }

    /// Takes one publish from the bucket of the client `key` names (asked only when
    /// there is a limit), or 429 `rate_limited` with the whole seconds until the next
    /// one is allowed as `Retry-After`.
    pub(crate) fn take(&self, key: impl FnOnce() -> ClientKey) -> Result<(), ApiError> {
        let Some(limiter) = &self.0 else {
            return Ok(());
        };
        limiter.check_key(&key()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::new(
                ErrorKind::RateLimited,
                "this client is over its publish rate (limits.publish_rate_per_sec)",
            )
            .retry_after(secs.max(1))
        })
    }

    /// Forgets the buckets of clients that are full again, so that the table holds only
    /// the clients publishing now.
    pub(crate) fn forget_idle(&self) {
        if let Some(limiter) = &self.0 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_their_64_block_and_mapped_ipv4_its_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_address(a), client_address(b));
        assert_ne!(client_address(a), client_address(other));
        assert_eq!(
            client_address("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_address(v4), v4);
    }

    fn limits(rate: u32, burst: u32) -> LimitsSettings {
        LimitsSettings {
            publish_rate_per_sec: rate,
            publish_burst: burst,
            ..crate::config::Settings::load(None).unwrap().limits
        }
    }

    #[test]
    fn a_client_past_its_burst_is_told_when_to_come_back_and_others_are_not() {
        let rate = PublishRate::new(&limits(1, 3));
        let alice = ClientKey::Token("alice".into());
        let bob = ClientKey::Token("bob".into());
        for _ in 0..3 {
            rate.take(|| alice.clone()).expect("within the burst");
        }
        let refused = rate.take(|| alice.clone()).expect_err("past the burst");
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        assert_eq!(refused.retry_after, Some(1));
        rate.take(|| bob)
            .expect("another client has its own bucket");
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let rate = PublishRate::new(&limits(0, 0));
        let key = ClientKey::Address("127.0.0.1".parse().unwrap());
        for _ in 0..10_000 {
            rate.take(|| key.clone()).expect("no limit");
        }
    }
}

//! The HTTP side of access control: the token a request presents (`Authorization:
//! Bearer`, or `?access_token=` for EventSource), and the browser rules checked before
//! any route runs: the `Host` must be allowed (DNS rebinding) and an `Origin` must be the
//! server's own or a CORS origin (cross-site requests).

use std::convert::Infallible;

use warp::{Filter, Rejection};

use super::Api;
use super::error::{ApiError, ErrorKind};
use crate::auth::{Access, Need};

/// Host names allowed when `server.allowed_hosts` is empty and the server listens on loopback.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The token a request presents, unchecked.
#[derive(Debug, Clone, Default)]
pub(crate) struct Credentials {
    authorization: Option<String>,
    query: Option<String>,
}

impl Credentials {
    /// The presented token: the `Bearer` of `Authorization`, else `?access_token=`. A
    /// header that is not a Bearer token is a malformed token.
    pub(crate) fn token(&self) -> Result<Option<&str>, ApiError> {
        match &self.authorization {
            Some(header) => match header.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                    Ok(Some(token.trim()))
                }
                _ => Err(ApiError::new(
                    ErrorKind::Unauthorized,
                    "Authorization must be \"Bearer <token>\"",
                )),
            },
            None => Ok(self.query.as_deref()),
        }
    }
}

/// The request's [`Credentials`]; never rejects.
pub(crate) fn credentials() -> impl Filter<Extract = (Credentials,), Error = Infallible> + Clone {
    warp::header::optional::<String>("authorization")
        .or(warp::any().map(|| None))
        .unify()
        .and(
            warp::query::raw()
                .map(|raw: String| {
                    form_urlencoded::parse(raw.as_bytes())
                        .find(|(k, _)| k == "access_token")
                        .map(|(_, v)| v.into_owned())
                })
                .or(warp::any().map(|| None))
                .unify(),
        )
        .map(|authorization, query| Credentials {
            authorization,
            query,
        })
}

impl Api {
    /// The caller's access when it may do everything in `needs`: 401 for a bad token or
    /// none where one is needed, 403 for a token without the permission.
    pub(crate) fn authorize(
        &self,
        credentials: &Credentials,
        needs: &[Need],
    ) -> Result<Access, ApiError> {
        self.authorize_token(credentials.token()?, needs)
    }

    /// [`Api::authorize`] for a token given as it is (a WebSocket `auth` frame).
    pub(crate) fn authorize_token(
        &self,
        token: Option<&str>,
        needs: &[Need],
    ) -> Result<Access, ApiError> {
        let access = self.policy().identify(token)?;
        access.require(needs)?;
        Ok(access)
    }
}

/// Which `Host` and `Origin` headers a server accepts.
#[derive(Debug, Clone)]
pub(crate) struct Sites {
    /// Allowed host names, lowercase, without brackets; `None`: any.
    hosts: Option<Vec<String>>,
    /// `server.cors_origins`; `"*"` allows any origin.
    origins: Vec<String>,
}

impl Sites {
    /// The rules of `allowed_hosts` and `cors_origins` for a server on loopback or not.
    pub(crate) fn new(allowed_hosts: &[String], cors_origins: &[String], loopback: bool) -> Self {
        let hosts = if !allowed_hosts.is_empty() {
            Some(allowed_hosts.iter().map(|h| bare_host(h)).collect())
        } else if loopback {
            Some(LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect())
        } else {
            None
        };
        Sites {
            hosts,
            origins: cors_origins.to_vec(),
        }
    }

    /// Whether a request with this `Host` and `Origin` (either may be absent) comes
    /// from another origin (one of `cors_origins`), or 403 saying which is not allowed.
    pub(crate) fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<bool, ApiError> {
        let forbidden = |why: &str| Err(ApiError::new(ErrorKind::Forbidden, why));
        if let (Some(host), Some(allowed)) = (host, &self.hosts)
            && !allowed.contains(&bare_host(strip_port(host)))
        {
            return forbidden("this Host is not allowed (server.allowed_hosts)");
        }
        let Some(origin) = origin else {
            return Ok(false);
        };
        let own = host.is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
        });
        if own {
            Ok(false)
        } else if self.origins.iter().any(|o| o == "*" || o == origin) {
            Ok(true)
        } else {
            forbidden("this Origin is not allowed (server.cors_origins)")
        }
    }
}

/// A host without its port: `[::1]:8080` → `[::1]`, `example.com:80` → `example.com`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// A host name as compared: lowercase, IPv6 without brackets.
fn bare_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Refuses, before any route runs, a request whose `Host` or `Origin` is not allowed;
/// extracts whether it comes from another origin (and needs CORS).
pub(crate) fn browser_rules(api: Api) -> impl Filter<Extract = (bool,), Error = Rejection> + Clone {
    warp::header::optional::<String>("host")
        .and(warp::header::optional::<String>("origin"))
        .and_then(move |host: Option<String>, origin: Option<String>| {
            let checked = api.sites.check(host.as_deref(), origin.as_deref());
            async move { checked.map_err(Rejection::from) }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn loopback_servers_take_only_loopback_host_names_by_default() {
        let sites = Sites::new(&[], &[], true);
        for host in [
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "LOCALHOST",
            "127.0.0.1",
        ] {
            assert!(sites.check(Some(host), None).is_ok(), "{host}");
        }
        for host in ["evil.example:8080", "127.0.0.2", "localhost.evil.example"] {
            assert!(sites.check(Some(host), None).is_err(), "{host}");
        }
        assert!(sites.check(None, None).is_ok());
        assert!(
            Sites::new(&[], &[], false)
                .check(Some("any.example"), None)
                .is_ok()
        );
        let listed = Sites::new(&strings(&["herald.example", "[::1]"]), &[], false);
        assert!(listed.check(Some("herald.example:443"), None).is_ok());
        assert!(listed.check(Some("[::1]:8080"), None).is_ok());
        assert!(listed.check(Some("localhost"), None).is_err());
    }

    #[test]
    fn origins_must_be_the_servers_own_or_listed() {
        let sites = Sites::new(&[], &strings(&["https://app.example"]), true);
        let host = Some("127.0.0.1:8080");
        assert!(!sites.check(host, Some("http://127.0.0.1:8080")).unwrap());
        assert!(sites.check(host, Some("https://app.example")).unwrap());
        assert!(!sites.check(host, None).unwrap());
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:8081",
            "https://127.0.0.1:8080",
        ] {
            assert!(sites.check(host, Some(origin)).is_err(), "{origin}");
        }
        assert!(sites.check(None, Some("http://127.0.0.1:8080")).is_err());
        let any = Sites::new(&[], &strings(&["*"]), true);
        assert!(any.check(host, Some("http://evil.example")).is_ok());
    }

    #[test]
    fn bearer_header_wins_over_the_query_and_other_schemes_are_malformed() {
        let both = Credentials {
            authorization: Some("Bearer abc".into()),
            query: Some("def".into()),
        };
        assert_eq!(both.token().unwrap(), Some("abc"));
        let query = Credentials {
            authorization: None,
            query: Some("def".into()),
        };
        assert_eq!(query.token().unwrap(), Some("def"));
        let basic = Credentials {
            authorization: Some("Basic dXNlcjpwdw==".into()),
            query: None,
        };
        assert!(basic.token().is_err());
        assert_eq!(Credentials::default().token().unwrap(), None);
    }
}

//! Access control, free of HTTP: who a presented token (opaque or JWT) is, what the
//! access of requests without a token is (`auth.default_access`), and whether a caller
//! may do what an operation needs. The front end asks [`Policy::identify`] once per
//! request and then [`Access::require`] with the operation's [`Need`]s.

mod jwt;
mod patterns;
pub mod token;

use std::sync::Arc;
use std::time::SystemTime;

pub use jwt::{MintError, mint_hs256};
pub(crate) use patterns::Target;

use crate::config::{AuthSettings, ConfigError, DefaultAccess, invalid};
use jwt::Verifier;
use patterns::Patterns;
use token::Tokens;

/// What an operation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Need {
    /// Publish on a channel or group (send, group_send).
    Publish(Target),
    /// Subscribe to a channel or group (receive, streams, group_add).
    Subscribe(Target),
    /// Flush, back up, list, read the stats.
    Admin,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, target) = match self {
            Need::Admin => return f.write_str("admin"),
            Need::Publish(target) => ("publish on", target),
            Need::Subscribe(target) => ("subscribe on", target),
        };
        match target {
            Target::Channel(name) => write!(f, "{kind} channel:{name}"),
            Target::Group(name) => write!(f, "{kind} group:{name}"),
            Target::ChannelsUnder(prefix) => write!(f, "{kind} channel:{prefix}.*"),
        }
    }
}

/// Why a caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// 401: no token where one is needed, or a token that is unknown, malformed,
    /// expired or badly signed.
    Unauthorized(&'static str),
    /// 403: a valid token without the permission.
    Forbidden(String),
}

/// What a grant allows: patterns per kind and the admin flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct Grant {
    publish: Patterns,
    subscribe: Patterns,
    admin: bool,
}

impl Grant {
    fn allows(&self, need: &Need) -> bool {
        match need {
            Need::Publish(target) => self.publish.covers(target),
            Need::Subscribe(target) => self.subscribe.covers(target),
            Need::Admin => self.admin,
        }
    }
}

/// Who a valid token stands for.
#[derive(Debug)]
pub(crate) struct Principal {
    /// The token's name, or the JWT's subject: for the log and the per-client limits.
    name: Arc<str>,
    grant: Grant,
    /// When the token stops being valid.
    expires: Option<SystemTime>,
}

impl Principal {
    fn is_valid(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|expires| now < expires)
    }

    #[cfg(test)]
    fn test(name: &str) -> Self {
        Principal {
            name: name.into(),
            grant: Grant::default(),
            expires: None,
        }
    }
}

/// The compiled `[auth]` settings: the default grant, the tokens and the JWT keys.
pub(crate) struct Policy {
    default: Grant,
    tokens: Tokens,
    jwt: Option<Verifier>,
    listing: Listing,
}

/// What the access control allows whom, for an administrator: the tokens' names and
/// permissions (never their hashes), the default access in force, and whether JWTs
/// are accepted.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Listing {
    tokens: Vec<TokenListing>,
    default_access: DefaultAccess,
    jwt: bool,
}

/// One configured token, without its hash.
#[derive(Debug, Clone, serde::Serialize)]
struct TokenListing {
    name: String,
    publish: Vec<String>,
    subscribe: Vec<String>,
    admin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
}

impl Policy {
    /// Compiles `settings` for a server whose listen address is loopback or not; fails
    /// on a malformed hash, pattern or date, a duplicate name or an unreadable key.
    pub(crate) fn new(settings: &AuthSettings, loopback: bool) -> Result<Self, ConfigError> {
        let mut tokens = Tokens::default();
        let mut names = std::collections::HashSet::new();
        for (i, t) in settings.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(invalid(
                    &format!("{key}.name"),
                    &format!("{:?} is empty or not unique", t.name),
                ));
            }
            let digest = token::parse_hash(&t.hash).ok_or_else(|| {
                invalid(
                    &format!("{key}.hash"),
                    "must be \"sha256:\" and 64 hex digits",
                )
            })?;
            if tokens.contains(&digest) {
                return Err(invalid(
                    &format!("{key}.hash"),
                    "is the hash of another token",
                ));
            }
            let expires = t
                .expires
                .as_deref()
                .map(|text| {
                    humantime::parse_rfc3339_weak(text).map_err(|e| {
                        invalid(
                            &format!("{key}.expires"),
                            &format!("{text:?} is not an RFC 3339 date-time: {e}"),
                        )
                    })
                })
                .transpose()?;
            let grant = Grant {
                publish: Patterns::parse(&format!("{key}.publish"), &t.publish)?,
                subscribe: Patterns::parse(&format!("{key}.subscribe"), &t.subscribe)?,
                admin: t.admin,
            };
            let principal = Principal {
                name: t.name.as_str().into(),
                grant,
                expires,
            };
            tokens.insert(digest, Arc::new(principal));
        }
        let jwt = Verifier::new(settings)?;
        let default_access = effective_default(settings, loopback);
        let listing = Listing {
            tokens: settings
                .tokens
                .iter()
                .map(|t| TokenListing {
                    name: t.name.clone(),
                    publish: t.publish.clone(),
                    subscribe: t.subscribe.clone(),
                    admin: t.admin,
                    expires: t.expires.clone(),
                })
                .collect(),
            default_access,
            jwt: jwt.is_some(),
        };
        let default = match default_access {
            DefaultAccess::All => Grant {
                publish: Patterns::every(),
                subscribe: Patterns::every(),
                admin: loopback,
            },
            DefaultAccess::Publish => Grant {
                publish: Patterns::every(),
                ..Grant::default()
            },
            DefaultAccess::Subscribe => Grant {
                subscribe: Patterns::every(),
                ..Grant::default()
            },
            DefaultAccess::None | DefaultAccess::Unset => Grant::default(),
        };
        Ok(Policy {
            default,
            tokens,
            jwt,
            listing,
        })
    }

    /// The caller presenting `token` (or none): its access, or 401 when the token is
    /// not a valid one now.
    pub(crate) fn identify(self: &Arc<Self>, token: Option<&str>) -> Result<Access, Denied> {
        let Some(token) = token else {
            return Ok(Access {
                policy: self.clone(),
                principal: None,
            });
        };
        // A JWT (its header is base64 JSON, `ey…`, then a dot) is checked as one first,
        // so that its cached verification is not preceded by hashing it; any other
        // secret is looked up among the opaque tokens first.
        let jwt = || self.jwt.as_ref().and_then(|jwt| jwt.verify(token));
        let opaque = || self.tokens.find(token).cloned();
        let principal = if token.starts_with("ey") && token.contains('.') {
            jwt().or_else(opaque)
        } else {
            opaque().or_else(jwt)
        };
        match principal {
            Some(principal) if principal.is_valid(SystemTime::now()) => Ok(Access {
                policy: self.clone(),
                principal: Some(principal),
            }),
            Some(_) => Err(Denied::Unauthorized("the token has expired")),
            None => Err(Denied::Unauthorized(
                "the token is unknown, malformed, expired or badly signed",
            )),
        }
    }

    /// Whether the caller of `held` may still do what it was allowed (after a reload,
    /// or once its token expired).
    pub(crate) fn still_allows(self: &Arc<Self>, held: &Held) -> bool {
        self.identify(held.token.as_deref())
            .and_then(|access| access.require(&held.needs))
            .is_ok()
    }

    /// How many opaque tokens are configured (for the log).
    pub(crate) fn token_count(&self) -> usize {
        self.listing.tokens.len()
    }

    /// The tokens' names and permissions and the default access, for `/v1/admin/tokens`.
    pub(crate) fn listing(&self) -> &Listing {
        &self.listing
    }
}

/// What `default_access` means for these settings: unset is "all" for a loopback-only
/// server without tokens or JWT keys (a developer's machine), "none" otherwise.
fn effective_default(settings: &AuthSettings, loopback: bool) -> DefaultAccess {
    match settings.default_access {
        DefaultAccess::Unset if loopback && !has_credentials(settings) => DefaultAccess::All,
        DefaultAccess::Unset => DefaultAccess::None,
        explicit => explicit,
    }
}

fn has_credentials(settings: &AuthSettings) -> bool {
    !settings.tokens.is_empty() || has_jwt_key(settings)
}

/// Whether a JWT secret or public key is configured.
fn has_jwt_key(settings: &AuthSettings) -> bool {
    !settings.jwt_secret.expose().is_empty() || !settings.jwt_public_key_file.as_os_str().is_empty()
}

/// Checks `settings` as [`Policy::new`] compiles them (for `herald token new` and the
/// configuration's validation).
pub fn validate(settings: &AuthSettings) -> Result<(), ConfigError> {
    Policy::new(settings, true).map(drop)
}

/// Why a server must not start with `settings` on a non-loopback address: nothing
/// configures access control, so it would be open to everyone who reaches the port.
pub fn wide_open(settings: &AuthSettings, loopback: bool) -> Option<String> {
    (!loopback && settings.default_access == DefaultAccess::Unset && !has_credentials(settings))
        .then(|| {
            "refusing to serve a non-loopback address without access control. Add a token: \
             `herald token new --name NAME --publish '*' --subscribe '*'` prints an \
             [[auth.tokens]] table for the configuration file; or configure auth.jwt_secret; \
             or set auth.default_access explicitly (\"none\", \"publish\", \"subscribe\", or \
             \"all\" to stay open)"
                .to_string()
        })
}

/// The access control of `settings` in a few words, for the start-up log: the default
/// access in force, how many tokens, whether JWTs are accepted.
pub fn mode(settings: &AuthSettings, loopback: bool) -> String {
    let default = match effective_default(settings, loopback) {
        DefaultAccess::All => "all",
        DefaultAccess::Publish => "publish",
        DefaultAccess::Subscribe => "subscribe",
        DefaultAccess::None | DefaultAccess::Unset => "none",
    };
    let jwt = if has_jwt_key(settings) {
        "JWT"
    } else {
        "no JWT"
    };
    format!(
        "default_access {default}, {} tokens, {jwt}",
        settings.tokens.len()
    )
}

/// Whether `settings` explicitly open everything on a non-loopback address (worth a
/// warning in the log).
pub fn open_to_all(settings: &AuthSettings, loopback: bool) -> bool {
    !loopback && settings.default_access == DefaultAccess::All
}

/// What one caller may do: the default grant, plus its token's.
pub(crate) struct Access {
    policy: Arc<Policy>,
    principal: Option<Arc<Principal>>,
}

impl Access {
    /// Ok when every need is allowed by the default access or the token; otherwise 401
    /// without a token, 403 with one.
    pub(crate) fn require(&self, needs: &[Need]) -> Result<(), Denied> {
        for need in needs {
            let by_token = self
                .principal
                .as_ref()
                .is_some_and(|p| p.grant.allows(need));
            if !(by_token || self.policy.default.allows(need)) {
                return Err(match &self.principal {
                    None => Denied::Unauthorized("this needs a token"),
                    Some(p) => Denied::Forbidden(format!("token {} may not {need}", p.name)),
                });
            }
        }
        Ok(())
    }

    /// The token's name (`None`: no token), whom per-client limits count against.
    pub(crate) fn name(&self) -> Option<&Arc<str>> {
        self.principal.as_ref().map(|p| &p.name)
    }

    /// When the token expires (`None`: no token, or one without expiry).
    pub(crate) fn expires(&self) -> Option<SystemTime> {
        self.principal.as_ref().and_then(|p| p.expires)
    }
}

/// An allowed long-lived operation (a stream, a WebSocket subscription), kept to check
/// again when the settings are reloaded or its token expires.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    token: Option<String>,
    needs: Vec<Need>,
    /// When to check again by itself: the token's expiry.
    pub(crate) expires: Option<SystemTime>,
}

impl Held {
    /// `needs`, allowed for the caller presenting `token` with `access`.
    pub(crate) fn new(token: Option<&str>, access: &Access, needs: Vec<Need>) -> Self {
        Held {
            token: token.map(str::to_string),
            needs,
            expires: access.expires(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenSettings};

    fn token_settings(
        name: &str,
        secret: &str,
        publish: &[&str],
        subscribe: &[&str],
    ) -> TokenSettings {
        TokenSettings {
            name: name.into(),
            hash: token::hash(secret),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            admin: false,
            expires: None,
        }
    }

    fn channel(name: &str) -> Target {
        Target::Channel(name.into())
    }

    #[test]
    fn unset_default_is_all_only_on_an_unconfigured_loopback_server() {
        let open = Arc::new(Policy::new(&AuthSettings::default(), true).unwrap());
        let anyone = open.identify(None).unwrap();
        assert_eq!(
            anyone.require(&[Need::Admin, Need::Publish(channel("c"))]),
            Ok(())
        );

        let remote = Arc::new(Policy::new(&AuthSettings::default(), false).unwrap());
        assert!(matches!(
            remote
                .identify(None)
                .unwrap()
                .require(&[Need::Subscribe(channel("c"))]),
            Err(Denied::Unauthorized(_))
        ));

        let all = AuthSettings {
            default_access: DefaultAccess::All,
            ..AuthSettings::default()
        };
        let remote_all = Arc::new(Policy::new(&all, false).unwrap());
        let anyone = remote_all.identify(None).unwrap();
        assert_eq!(anyone.require(&[Need::Publish(channel("c"))]), Ok(()));
        assert!(
            anyone.require(&[Need::Admin]).is_err(),
            "admin only on loopback"
        );

        let with_token = AuthSettings {
            tokens: vec![token_settings("a", "s", &[], &[])],
            ..AuthSettings::default()
        };
        let closed = Arc::new(Policy::new(&with_token, true).unwrap());
        assert!(
            closed
                .identify(None)
                .unwrap()
                .require(&[Need::Admin])
                .is_err()
        );
    }

    #[test]
    fn tokens_add_to_the_default_and_bad_ones_are_refused() {
        let settings = AuthSettings {
            default_access: DefaultAccess::Subscribe,
            tokens: vec![token_settings("pub", "secret-1", &["channel:chat.*"], &[])],
            ..AuthSettings::default()
        };
        let policy = Arc::new(Policy::new(&settings, true).unwrap());
        let caller = policy.identify(Some("secret-1")).unwrap();
        assert_eq!(
            caller.require(&[
                Need::Publish(channel("chat.1")),
                Need::Subscribe(channel("x"))
            ]),
            Ok(())
        );
        assert!(matches!(
            caller.require(&[Need::Publish(channel("other"))]),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            policy.identify(Some("secret-2")),
            Err(Denied::Unauthorized(_))
        ));
        assert!(matches!(
            policy.identify(Some("")),
            Err(Denied::Unauthorized(_))
        ));
    }

    #[test]
    fn expired_tokens_are_refused_and_held_operations_rechecked() {
        let mut expired = token_settings("old", "s-old", &["*"], &["*"]);
        expired.expires = Some("2001-01-01T00:00:00Z".into());
        let live = token_settings("live", "s-live", &[], &["channel:c"]);
        let settings = AuthSettings {
            tokens: vec![expired, live.clone()],
            ..AuthSettings::default()
        };
        let policy = Arc::new(Policy::new(&settings, true).unwrap());
        assert_eq!(
            policy.identify(Some("s-old")).err(),
            Some(Denied::Unauthorized("the token has expired"))
        );
        let access = policy.identify(Some("s-live")).unwrap();
        let held = Held::new(Some("s-live"), &access, vec![Need::Subscribe(channel("c"))]);
        assert!(policy.still_allows(&held));
        let revoked = Arc::new(
            Policy::new(
                &AuthSettings {
                    tokens: vec![token_settings("live", "s-live", &[], &["channel:d"])],
                    ..AuthSettings::default()
                },
                true,
            )
            .unwrap(),
        );
        assert!(!revoked.still_allows(&held));
    }

    #[test]
    fn bad_settings_name_the_key_and_wide_open_servers_are_refused() {
        let mut dup = AuthSettings {
            tokens: vec![
                token_settings("a", "x", &[], &[]),
                token_settings("a", "y", &[], &[]),
            ],
            ..AuthSettings::default()
        };
        let err = Policy::new(&dup, true).err().unwrap().to_string();
        assert!(err.contains("auth.tokens[1].name"), "{err}");
        dup.tokens[1].name = "b".into();
        dup.tokens[1].hash = "sha256:00".into();
        let err = Policy::new(&dup, true).err().unwrap().to_string();
        assert!(err.contains("auth.tokens[1].hash"), "{err}");
        dup.tokens[1] = token_settings("b", "y", &["user.1"], &[]);
        let err = Policy::new(&dup, true).err().unwrap().to_string();
        assert!(err.contains("auth.tokens[1].publish"), "{err}");

        let nothing = AuthSettings::default();
        assert!(wide_open(&nothing, false).is_some());
        assert!(wide_open(&nothing, true).is_none());
        let jwt = AuthSettings {
            jwt_secret: Secret("k".into()),
            ..AuthSettings::default()
        };
        assert!(wide_open(&jwt, false).is_none());
    }
}

//! JWTs: verified with `jsonwebtoken` against `auth.jwt_secret` (HS256/384/512) or the
//! key of `auth.jwt_public_key_file` (RS256, ES256, EdDSA), `exp` required, `iss` and
//! `aud` checked when configured, no leeway. Verified tokens are kept in a bounded LRU
//! cache until they expire, so that a reconnect storm of one JWT costs one signature
//! check.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::DefaultHashBuilder;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::patterns::Patterns;
use super::{Grant, Principal};
use crate::config::{AuthSettings, ConfigError, invalid};

/// Most verified JWTs kept.
const CACHE_ENTRIES: usize = 10_000;

/// The claims Herald reads.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Expiry, seconds since the epoch (required).
    exp: u64,
    /// Who the token is for (shown in the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    /// What it may do.
    #[serde(default)]
    herald: HeraldClaims,
}

/// The `"herald"` claim: permission patterns and the admin flag.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HeraldClaims {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// A key and the rules a token must meet to be accepted with it.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Checks JWTs with the configured keys.
pub(crate) struct Verifier {
    secret: Option<Key>,
    public: Option<Key>,
    cache: Mutex<LruCache<String, Arc<Principal>, DefaultHashBuilder>>,
}

impl Verifier {
    /// The verifier of `settings`, or `None` when no JWT key is configured.
    pub(crate) fn new(settings: &AuthSettings) -> Result<Option<Self>, ConfigError> {
        let validation = |algorithms: &[Algorithm]| {
            let mut v = Validation::new(algorithms[0]);
            v.algorithms = algorithms.to_vec();
            v.leeway = 0;
            v.validate_nbf = true;
            // A claim that is checked must be there: a token without it is refused.
            let mut required = vec!["exp"];
            if !settings.jwt_issuer.is_empty() {
                v.set_issuer(&[&settings.jwt_issuer]);
                required.push("iss");
            }
            if settings.jwt_audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&[&settings.jwt_audience]);
                required.push("aud");
            }
            v.set_required_spec_claims(&required);
            v
        };
        let secret = settings.jwt_secret.expose();
        let secret = (!secret.is_empty()).then(|| Key {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: validation(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
        });
        let file = &settings.jwt_public_key_file;
        let public = if file.as_os_str().is_empty() {
            None
        } else {
            let (key, algorithm) = public_key(file)?;
            Some(Key {
                key,
                validation: validation(&[algorithm]),
            })
        };
        if secret.is_none() && public.is_none() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            secret,
            public,
            cache: Mutex::new(LruCache::with_hasher(
                NonZeroUsize::new(CACHE_ENTRIES).expect("not zero"),
                DefaultHashBuilder::default(),
            )),
        }))
    }

    /// Who `token` is, if it is a valid JWT now.
    pub(crate) fn verify(&self, token: &str) -> Option<Arc<Principal>> {
        if let Some(cached) = self.cache.lock().get(token)
            && cached.is_valid(SystemTime::now())
        {
            return Some(cached.clone());
        }
        let principal = Arc::new(self.check_signature(token)?);
        self.cache.lock().put(token.to_string(), principal.clone());
        Some(principal)
    }

    fn check_signature(&self, token: &str) -> Option<Principal> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let key = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.secret.as_ref()?,
            _ => self.public.as_ref()?,
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .ok()?
            .claims;
        tracing::debug!(sub = ?claims.sub, "verified a JWT signature");
        let grant = Grant {
            publish: Patterns::parse("herald.publish", &claims.herald.publish).ok()?,
            subscribe: Patterns::parse("herald.subscribe", &claims.herald.subscribe).ok()?,
            admin: claims.herald.admin,
        };
        Some(Principal {
            name: format!("jwt sub={}", claims.sub.as_deref().unwrap_or("-")).into(),
            grant,
            expires: Some(UNIX_EPOCH + Duration::from_secs(claims.exp)),
        })
    }
}

/// The public key in the PEM file at `path` and the algorithm it verifies.
fn public_key(path: &Path) -> Result<(DecodingKey, Algorithm), ConfigError> {
    let key = "auth.jwt_public_key_file";
    let pem = std::fs::read(path)
        .map_err(|e| invalid(key, &format!("cannot read {}: {e}", path.display())))?;
    DecodingKey::from_rsa_pem(&pem)
        .map(|k| (k, Algorithm::RS256))
        .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (k, Algorithm::ES256)))
        .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|k| (k, Algorithm::EdDSA)))
        .map_err(|_| {
            invalid(
                key,
                &format!(
                    "{} is not an RSA, EC (P-256) or Ed25519 public key in PEM",
                    path.display()
                ),
            )
        })
}

/// Why a JWT could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// A `--publish` or `--subscribe` pattern is not valid.
    #[error(transparent)]
    Pattern(#[from] ConfigError),
    #[error("cannot sign the JWT: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// An HS256 JWT signed with `secret`, valid for `ttl` from now.
pub fn mint_hs256(
    secret: &[u8],
    sub: Option<String>,
    publish: Vec<String>,
    subscribe: Vec<String>,
    ttl: Duration,
) -> Result<String, MintError> {
    for (key, list) in [("--publish", &publish), ("--subscribe", &subscribe)] {
        Patterns::parse(key, list)?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        exp: (now + ttl).as_secs(),
        sub,
        herald: HeraldClaims {
            publish,
            subscribe,
            admin: false,
        },
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(MintError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::patterns::Target;
    use crate::config::Secret;

    fn settings(secret: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: Secret(secret.into()),
            ..AuthSettings::default()
        }
    }

    #[test]
    fn a_minted_token_verifies_once_and_is_then_served_from_the_cache() {
        let verifier = Verifier::new(&settings("s3cret")).unwrap().unwrap();
        let token = mint_hs256(
            b"s3cret",
            Some("u42".into()),
            vec![],
            vec!["channel:user.42".into()],
            Duration::from_secs(60),
        )
        .unwrap();
        let principal = verifier.verify(&token).expect("valid");
        assert!(
            principal
                .grant
                .subscribe
                .covers(&Target::Channel("user.42".into()))
        );
        assert_eq!(&*principal.name, "jwt sub=u42");
        assert_eq!(verifier.cache.lock().len(), 1);
        assert!(Arc::ptr_eq(&principal, &verifier.verify(&token).unwrap()));

        let other = Verifier::new(&settings("other")).unwrap().unwrap();
        assert!(other.verify(&token).is_none(), "a bad signature");
        assert!(verifier.verify("not.a.jwt").is_none());
        assert!(verifier.verify(&token[..token.len() - 2]).is_none());
    }

    /// Test key pairs (made with openssl for this test only).
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPMfrjfrd5ClrMjRs6AaOFGTTO32D1g2HmU02AvdhmBS\n-----END PRIVATE KEY-----\n";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAuxnaYGxq43OHzO2RqG511VgVNGAgF7WRCC+otGTx8fM=\n-----END PUBLIC KEY-----\n";
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgm4r855jn/rak6qmL\nlIHWtNDvbFIwQmyxfwM5oPMf52OhRANCAAQmnbaJuF7CsVRfn0ZaL4K1EWA8ZVfo\nE/zuOkhnYApsBm/oA+STBdYK5gypPQO7GE6OE0mbF38ElycY569IVsdJ\n-----END PRIVATE KEY-----\n";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJp22ibhewrFUX59GWi+CtRFgPGVX\n6BP87jpIZ2AKbAZv6APkkwXWCuYMqT0DuxhOjhNJmxd/BJcnGOevSFbHSQ==\n-----END PUBLIC KEY-----\n";

    #[test]
    fn public_keys_verify_eddsa_and_es256_and_refuse_hs256_forgeries() {
        let dir = tempfile::tempdir().unwrap();
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let claims = serde_json::json!({"exp": exp});
        for (public, private, algorithm) in [
            (
                ED_PUBLIC,
                EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
                Algorithm::EdDSA,
            ),
            (
                EC_PUBLIC,
                EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
                Algorithm::ES256,
            ),
        ] {
            let file = dir.path().join("key.pem");
            std::fs::write(&file, public).unwrap();
            let verifier = Verifier::new(&AuthSettings {
                jwt_public_key_file: file,
                ..AuthSettings::default()
            })
            .unwrap()
            .unwrap();
            let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &private).unwrap();
            assert!(verifier.verify(&token).is_some(), "{algorithm:?}");
            // No secret is configured: an HS256 token signed with the public key is refused.
            let forged = jsonwebtoken::encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(public.as_bytes()),
            )
            .unwrap();
            assert!(verifier.verify(&forged).is_none(), "{algorithm:?}");
        }
    }

    #[test]
    fn expired_tokens_and_wrong_issuers_are_refused() {
        let verifier = Verifier::new(&settings("k")).unwrap().unwrap();
        let claims = serde_json::json!({"exp": 1_000_000_000u64});
        let key = EncodingKey::from_secret(b"k");
        let expired = jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap();
        assert!(verifier.verify(&expired).is_none());
        let no_exp =
            jsonwebtoken::encode(&Header::default(), &serde_json::json!({"sub": "x"}), &key)
                .unwrap();
        assert!(verifier.verify(&no_exp).is_none());

        let mut strict = settings("k");
        strict.jwt_issuer = "herald-backend".into();
        let strict = Verifier::new(&strict).unwrap().unwrap();
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
        };
        assert!(
            strict
                .verify(&sign(serde_json::json!({"exp": exp})))
                .is_none()
        );
        assert!(
            strict
                .verify(&sign(serde_json::json!({"exp": exp, "iss": "other"})))
                .is_none()
        );
        assert!(
            strict
                .verify(&sign(
                    serde_json::json!({"exp": exp, "iss": "herald-backend"})
                ))
                .is_some()
        );
    }
}

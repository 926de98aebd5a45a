//! Opaque tokens: `hrld_` and 32 random bytes (base64url), configured by the SHA-256 of
//! the secret. A presented token is hashed once and looked up by the first bytes of its
//! hash; the whole hash is then compared in constant time.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hashbrown::HashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Principal;

/// What every generated token starts with, so that it is recognisable in a leak scan.
const PREFIX: &str = "hrld_";

/// A new secret token: `hrld_` and 32 random bytes, base64url without padding.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The `sha256:<64 hex>` form of `token` that the configuration stores.
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The digest of a configured `sha256:<64 hex>` hash, or `None` when malformed.
pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

/// A configured token: the SHA-256 digest of its secret, and who it stands for.
type Entry = ([u8; 32], Arc<Principal>);

/// The configured tokens, by the first 8 bytes of their digest.
#[derive(Default)]
pub(crate) struct Tokens {
    by_prefix: HashMap<[u8; 8], Vec<Entry>>,
}

impl Tokens {
    /// Adds a token by its digest.
    pub(crate) fn insert(&mut self, digest: [u8; 32], principal: Arc<Principal>) {
        let prefix = digest[..8].try_into().expect("8 bytes");
        self.by_prefix
            .entry(prefix)
            .or_default()
            .push((digest, principal));
    }

    /// Whether a token with this digest is configured.
    pub(crate) fn contains(&self, digest: &[u8; 32]) -> bool {
        self.find_digest(digest).is_some()
    }

    /// The configured token `token` is, if any.
    pub(crate) fn find(&self, token: &str) -> Option<&Arc<Principal>> {
        self.find_digest(&Sha256::digest(token.as_bytes()).into())
    }

    fn find_digest(&self, digest: &[u8; 32]) -> Option<&Arc<Principal>> {
        let prefix: [u8; 8] = digest[..8].try_into().expect("8 bytes");
        self.by_prefix
            .get(&prefix)?
            .iter()
            .find(|(known, _)| bool::from(known.ct_eq(digest)))
            .map(|(_, principal)| principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_random_and_hash_to_the_config_form() {
        let token = generate();
        assert!(token.starts_with("hrld_"));
        assert_eq!(token.len(), 5 + 43);
        assert_ne!(token, generate());
        let hash = hash(&token);
        assert_eq!(hash.len(), 7 + 64);
        let digest = parse_hash(&hash).expect("a valid hash");
        let mut tokens = Tokens::default();
        tokens.insert(digest, Arc::new(Principal::test("t")));
        assert_eq!(tokens.find(&token).map(|p| &*p.name), Some("t"));
        assert!(tokens.find("hrld_other").is_none());
    }

    #[test]
    fn malformed_hashes_are_refused() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(parse_hash(&good).is_some());
        assert!(parse_hash(&good.to_uppercase().replace("SHA256", "sha256")).is_some());
        for bad in [
            "ab".repeat(32),
            format!("sha1:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}zz", "ab".repeat(31)),
        ] {
            assert!(parse_hash(&bad).is_none(), "{bad}");
        }
    }
}

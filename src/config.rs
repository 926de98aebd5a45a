//! Settings: the compiled-in `config/default.toml`, overridden by an optional file and
//! by `HERALD_<SECTION>__<KEY>` environment variables, validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// The configuration shipped inside the binary.
pub(crate) const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration that could not be read or has a value out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The defaults, the `--config` file or the environment could not be read or parsed
    /// (missing file, bad TOML, a value of the wrong type, an unknown key).
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is out of range: `key` names the setting (e.g. `layer.capacity`),
    /// `reason` says what is wrong with it.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// Every setting of the server, by section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[server]`: listening address, waits, keepalives, connection limits, CORS.
    pub server: ServerSettings,
    /// `[storage]`: where the database lives and when writes reach the disk.
    pub storage: StorageSettings,
    /// `[layer]`: message expiry, channel capacity, size limits and replay.
    pub layer: LayerSettings,
    /// `[limits]`: what one client may take, and how much the layer may hold.
    pub limits: LimitsSettings,
    /// `[auth]`: who may do what (tokens, JWT keys, the access of requests without a token).
    #[serde(default)]
    pub auth: AuthSettings,
}

/// `[server]`: the HTTP front end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port to listen on; HTTP, SSE and WebSocket share it.
    pub listen: SocketAddr,
    /// Longest wait, in seconds, of a long-poll receive (`?wait=S`, WebSocket `receive`);
    /// larger requested waits are cut to this.
    pub max_wait_secs: u64,
    /// Seconds between `: keepalive` comments on idle SSE streams.
    pub keepalive_secs: u64,
    /// Seconds a stream may read nothing while messages wait before it is closed;
    /// its messages stay queued for the next connection.
    pub slow_consumer_secs: u64,
    /// Most concurrent connections; past it requests get 503 `unavailable` and SSE
    /// requests a `retry:` hint and an immediate close.
    pub max_connections: usize,
    /// Most seconds the server takes to exit after SIGINT/SIGTERM.
    pub shutdown_timeout_secs: u64,
    /// Seconds a connection may stay open between requests before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a request's head and body have to arrive; past it: 408 and close.
    pub request_timeout_secs: u64,
    /// Origins allowed by CORS (`https://...` origins or `"*"`); empty disables CORS.
    pub cors_origins: Vec<String>,
    /// `"type"` given to a published map that has none; empty refuses such messages
    /// (`invalid_message`), as the channel layer's message rules require.
    pub default_message_type: String,
    /// Host names a request's `Host` may carry (port ignored), against DNS rebinding;
    /// empty: only loopback names when listening on loopback, otherwise any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// A second address serving only `/metrics`, `/healthz` and `/readyz`, without
    /// access control (for a Prometheus on a private network); empty: none.
    #[serde(default, with = "optional_address")]
    pub metrics_listen: Option<SocketAddr>,
    /// How the server writes its log: `text` for people, `json` for one object a line.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// `server.log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people, as `tracing` writes them.
    #[default]
    Text,
    /// One JSON object a line, the start-up banner included.
    Json,
}

/// An address that may be left empty (`""`) in the configuration.
mod optional_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        addr: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => serializer.collect_str(addr),
            None => serializer.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an address: {e}")))
    }
}

/// `[auth]`: access control. Compiled and checked by [`crate::auth::Policy::new`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// What a request without a token may do; unset means "all" on a loopback-only server
    /// without tokens or JWT keys, otherwise "none".
    #[serde(default)]
    pub default_access: DefaultAccess,
    /// The opaque tokens (`[[auth.tokens]]`), each stored as the SHA-256 of its secret.
    #[serde(default)]
    pub tokens: Vec<TokenSettings>,
    /// Shared secret of HS256/384/512 JWTs; empty: none accepted.
    #[serde(default)]
    pub jwt_secret: Secret,
    /// PEM public key of RS256, ES256 or EdDSA JWTs; empty: none accepted.
    #[serde(default)]
    pub jwt_public_key_file: PathBuf,
    /// Required `iss` of JWTs when not empty.
    #[serde(default)]
    pub jwt_issuer: String,
    /// Required `aud` of JWTs when not empty.
    #[serde(default)]
    pub jwt_audience: String,
}

/// `auth.default_access`: the kind of access every request has, token or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAccess {
    /// Not set: "all" on a loopback-only server without tokens or JWT keys, else "none".
    #[default]
    #[serde(rename = "")]
    Unset,
    /// Publish and subscribe everywhere, and admin while listening on loopback only.
    All,
    /// Publish on every channel and group.
    Publish,
    /// Subscribe to every channel and group.
    Subscribe,
    /// Nothing: every operation but `/healthz` needs a token.
    None,
}

/// One `[[auth.tokens]]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// A unique name, for the log and for people.
    pub name: String,
    /// `sha256:<64 hex>` of the secret token (`herald token new` prints it).
    pub hash: String,
    /// Permission patterns (`channel:GLOB`, `group:GLOB`, `*`) it may publish on.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Permission patterns it may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Whether it may flush, back up, list and read the stats.
    #[serde(default)]
    pub admin: bool,
    /// An RFC 3339 date-time after which the token is refused.
    #[serde(default)]
    pub expires: Option<String>,
}

/// A secret setting: never shown by `Debug` or `herald config`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself, for the code that uses it (and nothing that prints).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<hidden>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "<hidden>" })
    }
}

/// When an acknowledged write is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after fsync, with group commit.
    Sync,
    /// Acknowledge at once, fsync every `flush_interval_ms`.
    Interval,
}

/// `[storage]`: the sled database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the sled database; created if missing, one server per directory.
    pub data_dir: PathBuf,
    /// Whether a write is acknowledged after fsync (`sync`) or flushed periodically (`interval`).
    pub durability: Durability,
    /// Flush period in milliseconds when `durability` is `interval`; a crash may lose
    /// the acknowledged writes of the last period.
    pub flush_interval_ms: u64,
    /// How often, in milliseconds, expired messages and lapsed memberships are swept
    /// from memory and disk.
    pub sweep_interval_ms: u64,
    /// Start on a data directory whose log lost acknowledged writes (`herald serve
    /// --accept-data-loss`); never read from a file or the environment.
    #[serde(skip)]
    pub accept_data_loss: bool,
    /// Most bytes the data directory may take; a send or group_send that would pass it
    /// is refused with 507 `storage_full`. 0: no limit.
    pub max_disk_bytes: u64,
}

/// `[layer]`: channel-layer semantics (expiry, capacity, limits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSettings {
    /// Seconds a message lives after its send; an expired message is never delivered.
    pub expiry_secs: u64,
    /// Seconds a group membership lasts after its last `group_add`.
    pub group_expiry_secs: u64,
    /// Most unexpired, unreceived messages a channel holds; a send to a full channel fails
    /// with `channel_full`, a `group_send` skips it and counts it as `full`.
    pub capacity: usize,
    /// Largest message, in bytes of its msgpack encoding; larger ones are refused with
    /// `message_too_large` (Django's channel layer spec asks for at least 1 MiB).
    pub max_message_bytes: usize,
    /// Seconds a delivered message stays in its channel's replay log for streams resuming
    /// with Last-Event-ID; 0 means the channel's expiry.
    pub replay_secs: u64,
    /// Most delivered messages kept per channel for replay; a resuming stream that needs
    /// older ones gets a `herald.gap` event.
    pub replay_capacity: usize,
    /// Capacity per channel by shell-style glob on the full channel name; the first
    /// matching pattern, in config order, wins over `capacity`.
    #[serde(default)]
    pub channel_capacity: IndexMap<String, usize>,
    /// Expiry in seconds per channel by glob, first match wins over `expiry_secs`.
    #[serde(default)]
    pub channel_expiry: IndexMap<String, u64>,
}

/// `[limits]`: bounds on what one client may take and on what the layer holds. Past
/// each, requests are refused with 429 and nothing changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Most open connections of one client (a token's name, or an address: IPv6 by /64).
    pub max_connections_per_client: usize,
    /// Publishes per second one client may make on average; 0: no limit.
    pub publish_rate_per_sec: u32,
    /// Publishes one client may make at once above the rate; 0: as many as the rate.
    pub publish_burst: u32,
    /// Most bytes queued for a WebSocket client that does not read, before it is closed.
    pub max_write_buffer_bytes: usize,
    /// Most channels held at once; a send to a new channel past it is refused.
    pub max_channels: usize,
    /// Most group memberships, in all groups together.
    pub max_memberships: usize,
    /// Most subscriptions one WebSocket connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Most groups one `GET /v1/events` stream may follow.
    pub max_groups_per_stream: usize,
}

/// The environment variables that name a setting, `HERALD_<SECTION>__<KEY>`. Others
/// with the prefix (`HERALD_BIN`, `HERALD_ARGS` of scripts) are not settings and must not
/// stop the server from starting.
fn setting_variables() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(name, _)| {
            name.strip_prefix("HERALD_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect()
}

impl Settings {
    /// Loads the defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("HERALD")
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(setting_variables()))
                    .list_separator(",")
                    .with_list_parse_key("server.cors_origins")
                    .with_list_parse_key("server.allowed_hosts")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value once, so that a bad one stops the start with a clear message.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("server.keepalive_secs", self.server.keepalive_secs),
            ("server.slow_consumer_secs", self.server.slow_consumer_secs),
            ("server.max_connections", self.server.max_connections as u64),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            (
                "server.request_timeout_secs",
                self.server.request_timeout_secs,
            ),
            (
                "limits.max_connections_per_client",
                self.limits.max_connections_per_client as u64,
            ),
            (
                "limits.max_write_buffer_bytes",
                self.limits.max_write_buffer_bytes as u64,
            ),
            ("limits.max_channels", self.limits.max_channels as u64),
            ("limits.max_memberships", self.limits.max_memberships as u64),
            (
                "limits.max_subscriptions_per_connection",
                self.limits.max_subscriptions_per_connection as u64,
            ),
            (
                "limits.max_groups_per_stream",
                self.limits.max_groups_per_stream as u64,
            ),
            ("storage.flush_interval_ms", self.storage.flush_interval_ms),
            ("storage.sweep_interval_ms", self.storage.sweep_interval_ms),
            ("layer.expiry_secs", self.layer.expiry_secs),
            ("layer.group_expiry_secs", self.layer.group_expiry_secs),
            ("layer.capacity", self.layer.capacity as u64),
            (
                "layer.max_message_bytes",
                self.layer.max_message_bytes as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        const TEN_YEARS_SECS: u64 = 10 * 365 * 86_400;
        let at_most = [
            (
                "layer.max_message_bytes",
                self.layer.max_message_bytes as u64,
                64 << 20,
                "64 MiB",
            ),
            (
                "server.max_connections",
                self.server.max_connections as u64,
                1 << 20,
                "1048576",
            ),
            (
                "limits.max_write_buffer_bytes",
                self.limits.max_write_buffer_bytes as u64,
                1 << 30,
                "1 GiB",
            ),
            (
                "server.max_wait_secs",
                self.server.max_wait_secs,
                86_400,
                "86400 (a day)",
            ),
            (
                "server.idle_timeout_secs",
                self.server.idle_timeout_secs,
                86_400,
                "86400 (a day)",
            ),
            (
                "server.keepalive_secs",
                self.server.keepalive_secs,
                86_400,
                "86400 (a day)",
            ),
            (
                "server.slow_consumer_secs",
                self.server.slow_consumer_secs,
                86_400,
                "86400 (a day)",
            ),
            (
                "server.shutdown_timeout_secs",
                self.server.shutdown_timeout_secs,
                86_400,
                "86400 (a day)",
            ),
            (
                "storage.flush_interval_ms",
                self.storage.flush_interval_ms,
                86_400_000,
                "86400000 (a day)",
            ),
            (
                "storage.sweep_interval_ms",
                self.storage.sweep_interval_ms,
                86_400_000,
                "86400000 (a day)",
            ),
            (
                "layer.replay_secs",
                self.layer.replay_secs,
                TEN_YEARS_SECS,
                "315360000 (ten years)",
            ),
            (
                "server.request_timeout_secs",
                self.server.request_timeout_secs,
                3_600,
                "3600 (an hour)",
            ),
            (
                "layer.expiry_secs",
                self.layer.expiry_secs,
                TEN_YEARS_SECS,
                "315360000 (ten years)",
            ),
            (
                "layer.group_expiry_secs",
                self.layer.group_expiry_secs,
                TEN_YEARS_SECS,
                "315360000 (ten years)",
            ),
        ];
        for (key, value, limit, said) in at_most {
            if value > limit {
                return Err(invalid(key, &format!("must be at most {said}")));
            }
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        for origin in &self.server.cors_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(invalid(
                    "server.cors_origins",
                    &format!("{origin:?} is not \"*\" or an http(s) origin"),
                ));
            }
        }
        for host in &self.server.allowed_hosts {
            if host.is_empty() || host.contains(['/', ' ']) {
                return Err(invalid(
                    "server.allowed_hosts",
                    &format!("{host:?} is not a host name"),
                ));
            }
        }
        self.layer.rules()?;
        crate::auth::validate(&self.auth)?;
        Ok(())
    }
}

/// Compiles a shell-style glob on full names, as every pattern of the settings uses
/// (`[layer.channel_capacity]`, permission patterns); `key` names the setting on error.
pub(crate) fn glob(key: &str, pattern: &str) -> Result<GlobMatcher, ConfigError> {
    Glob::new(pattern)
        .map(|glob| glob.compile_matcher())
        .map_err(|e| invalid(key, &format!("bad glob pattern: {e}")))
}

pub(crate) fn invalid(key: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// Per-channel capacity and expiry, resolved from the glob patterns in config order.
#[derive(Debug, Clone)]
pub struct ChannelRules {
    capacity: usize,
    expiry: Duration,
    replay: Option<Duration>,
    capacity_patterns: Vec<(GlobMatcher, usize)>,
    expiry_patterns: Vec<(GlobMatcher, Duration)>,
}

impl ChannelRules {
    /// The capacity of `channel`: the first matching pattern's, else the default.
    pub fn capacity(&self, channel: &str) -> usize {
        first_match(&self.capacity_patterns, channel).unwrap_or(self.capacity)
    }

    /// The expiry of messages sent to `channel`.
    pub fn expiry(&self, channel: &str) -> Duration {
        first_match(&self.expiry_patterns, channel).unwrap_or(self.expiry)
    }

    /// How long a delivered message stays in `channel`'s replay log.
    pub fn replay(&self, channel: &str) -> Duration {
        self.replay.unwrap_or_else(|| self.expiry(channel))
    }

    /// The longest any message may be needed on disk: every expiry and the replay time.
    pub(crate) fn max_retention(&self) -> Duration {
        self.expiry_patterns
            .iter()
            .map(|(_, d)| *d)
            .chain([self.expiry, self.replay.unwrap_or_default()])
            .max()
            .unwrap_or(self.expiry)
    }
}

fn first_match<T: Copy>(patterns: &[(GlobMatcher, T)], channel: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(glob, _)| glob.is_match(channel))
        .map(|(_, value)| *value)
}

impl LayerSettings {
    /// Compiles the per-channel patterns; fails on a bad glob or a zero value.
    pub fn rules(&self) -> Result<ChannelRules, ConfigError> {
        fn compile<T: Copy, U>(
            section: &str,
            map: &IndexMap<String, T>,
            convert: impl Fn(T) -> U,
            is_zero: impl Fn(T) -> bool,
        ) -> Result<Vec<(GlobMatcher, U)>, ConfigError> {
            map.iter()
                .map(|(pattern, value)| {
                    let key = format!("{section}.{pattern:?}");
                    if is_zero(*value) {
                        return Err(invalid(&key, "must be greater than 0"));
                    }
                    Ok((glob(&key, pattern)?, convert(*value)))
                })
                .collect()
        }
        Ok(ChannelRules {
            capacity: self.capacity,
            expiry: Duration::from_secs(self.expiry_secs),
            replay: (self.replay_secs > 0).then(|| Duration::from_secs(self.replay_secs)),
            capacity_patterns: compile(
                "layer.channel_capacity",
                &self.channel_capacity,
                |v| v,
                |v| v == 0,
            )?,
            expiry_patterns: compile(
                "layer.channel_expiry",
                &self.channel_expiry,
                Duration::from_secs,
                |v| v == 0,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let settings = Settings::load(None).unwrap();
        assert_eq!(settings.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.layer.capacity, 100);
        assert_eq!(settings.layer.expiry_secs, 60);
        assert_eq!(settings.layer.group_expiry_secs, 86400);
        assert_eq!(settings.layer.max_message_bytes, 1048576);
        assert_eq!(settings.storage.durability, Durability::Sync);
    }

    #[test]
    fn patterns_apply_in_config_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(
            &file,
            "[layer.channel_capacity]\n\"websocket.send*\" = 20\n\"websocket.*\" = 30\n\"*\" = 7\n\
             [layer.channel_expiry]\n\"http.*\" = 5\n",
        )
        .unwrap();
        let rules = Settings::load(Some(&file)).unwrap().layer.rules().unwrap();
        assert_eq!(rules.capacity("websocket.send!abc"), 20);
        assert_eq!(rules.capacity("websocket.receive"), 30);
        assert_eq!(rules.capacity("other"), 7);
        assert_eq!(rules.expiry("http.response"), Duration::from_secs(5));
        assert_eq!(rules.expiry("other"), Duration::from_secs(60));
        assert_eq!(rules.max_retention(), Duration::from_secs(60));
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[layer]\ncapacity = 0\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("layer.capacity"), "{err}");

        std::fs::write(&file, "[storage]\ndurability = \"sometimes\"\n").unwrap();
        assert!(Settings::load(Some(&file)).is_err());

        std::fs::write(&file, "[layer.channel_capacity]\n\"a[\" = 3\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("bad glob"), "{err}");
    }

    #[test]
    fn values_past_their_range_are_refused_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.toml");
        for (section, key, largest) in [
            ("server", "max_connections", 1_048_576u64),
            ("server", "max_wait_secs", 86_400),
            ("layer", "expiry_secs", 315_360_000),
            ("layer", "group_expiry_secs", 315_360_000),
            ("layer", "max_message_bytes", 64 << 20),
        ] {
            std::fs::write(&file, format!("[{section}]\n{key} = {largest}\n")).unwrap();
            Settings::load(Some(&file)).unwrap_or_else(|e| panic!("{key} = {largest}: {e}"));
            for past in [largest + 1, i64::MAX as u64] {
                std::fs::write(&file, format!("[{section}]\n{key} = {past}\n")).unwrap();
                let err = Settings::load(Some(&file)).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("{section}.{key}")),
                    "{key} = {past}: {err}"
                );
            }
        }
    }

    /// Every numeric key, by section.
    const NUMERIC_KEYS: &[(&str, &str)] = &[
        ("server", "max_wait_secs"),
        ("server", "keepalive_secs"),
        ("server", "slow_consumer_secs"),
        ("server", "max_connections"),
        ("server", "shutdown_timeout_secs"),
        ("server", "idle_timeout_secs"),
        ("server", "request_timeout_secs"),
        ("storage", "flush_interval_ms"),
        ("storage", "sweep_interval_ms"),
        ("storage", "max_disk_bytes"),
        ("layer", "expiry_secs"),
        ("layer", "group_expiry_secs"),
        ("layer", "capacity"),
        ("layer", "max_message_bytes"),
        ("layer", "replay_secs"),
        ("layer", "replay_capacity"),
        ("limits", "max_connections_per_client"),
        ("limits", "publish_rate_per_sec"),
        ("limits", "publish_burst"),
        ("limits", "max_write_buffer_bytes"),
        ("limits", "max_channels"),
        ("limits", "max_memberships"),
        ("limits", "max_subscriptions_per_connection"),
        ("limits", "max_groups_per_stream"),
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever number a key gets, loading takes it or refuses it naming the key.
        #[test]
        fn any_number_for_any_key_is_taken_or_refused_naming_the_key(
            key in 0..NUMERIC_KEYS.len(),
            value in proptest::prop_oneof![
                proptest::strategy::Just(0i64),
                proptest::strategy::Just(i64::MAX),
                proptest::strategy::Just(i64::MIN),
                0i64..1_000,
                proptest::num::i64::ANY,
            ],
        ) {
            let (section, name) = NUMERIC_KEYS[key];
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("random.toml");
            std::fs::write(&file, format!("[{section}]\n{name} = {value}\n")).unwrap();
            if let Err(e) = Settings::load(Some(&file)) {
                let text = e.to_string();
                proptest::prop_assert!(text.contains(&format!("{section}.{name}")), "{name} = {value}: {text}");
            }
        }
    }
}

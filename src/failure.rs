//! Why a command failed: the one line `herald` prints to stderr, and its exit status
//! (2 for a refusal to start as configured, 1 for everything else).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use herald::auth::MintError;
use herald::config::ConfigError;
use herald::layer;
use herald::store::{ImportError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration would open the server to anyone: refused, exit 2.
    #[error("{0}")]
    WideOpen(String),
    /// `herald bench` without `herald-bench` beside it: exit 2.
    #[error(
        "herald bench needs the herald-bench binary beside herald ({0}): build it with cargo build --release -p herald-bench"
    )]
    NoBench(String),
    #[error(transparent)]
    Layer(#[from] layer::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("cannot write the token table: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error("data directory {} does not exist", .0.display())]
    NoDataDir(PathBuf),
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} holds no secret", .0.display())]
    NoSecret(PathBuf),
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot make an HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("cannot reach {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("reading the backup from {endpoint}: {source}")]
    BackupRead {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("{code}: {message}")]
    Api { code: String, message: String },
    #[error("{endpoint} answered {status}: {body}")]
    Refused {
        endpoint: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

impl Failure {
    /// The exit status: 2 when the server refuses to start as asked, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::WideOpen(_) | Failure::NoBench(_) => 2,
            _ => 1,
        }
    }
}

//! The `herald` command: parses flags, sets up logging and settings, and runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use herald::auth;
use herald::config::{AuthSettings, LogFormat, Settings, TokenSettings};
use herald::server;

use crate::failure::Failure;

mod client;
mod dump;
mod failure;

/// mimalloc instead of the system allocator: requests allocate many small, short-lived
/// buffers, and glibc's malloc took about a quarter of the instructions of a publish.
/// Built without transparent huge pages (`no_thp`), which cost 40 MiB of idle RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald: a durable channel layer (channels, groups, expiry, capacity) over HTTP,
/// SSE and WebSocket.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server.
    Serve {
        /// Configuration file overriding the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, overriding `storage.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `"type"` for published maps that have none, overriding
        /// `server.default_message_type` (by default they are refused).
        #[arg(long, value_name = "TYPE")]
        default_message_type: Option<String>,
        /// Start even if the data directory's log lost acknowledged writes (damage
        /// found at open); what was lost is logged and shown in `/v1/stats`.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Print the effective configuration as TOML.
    Config {
        /// Configuration file overriding the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a portable dump of a data directory that no server is using.
    Export {
        /// The data directory to read.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the dump (standard output when absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load a dump into a new, empty data directory.
    Import {
        /// The data directory to create and fill.
        #[arg(long)]
        data_dir: PathBuf,
        /// The dump to read (standard input when absent).
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        /// The dump to read, as a positional argument.
        #[arg(conflicts_with = "input")]
        file: Option<PathBuf>,
    },
    /// Save a consistent dump of a running server (GET URL/v1/admin/backup).
    Backup {
        /// The server's base URL, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
        /// Where to write the dump.
        #[arg(long)]
        out: PathBuf,
        /// A file holding an admin token (a trailing newline is not part of it), for a
        /// server with access control.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Run load scenarios against a fresh server (or --url) and report throughput,
    /// delivery, latency, errors and server memory: runs `herald-bench` (a separate
    /// program, beside this one) with these arguments; see `herald bench --help`.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// Make access tokens: an opaque token for `[[auth.tokens]]`, or a JWT.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Publish a message to a channel or a group; prints its id (for a group, how
    /// many members got it and how many were full).
    Publish(client::Publish),
    /// Print the messages of a channel or a group as they arrive (or run a command for
    /// each), reconnecting and resuming until Ctrl-C.
    Subscribe(client::Subscribe),
    /// Print the server's stats as a table.
    Stats(client::ServerArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new secret token (shown only now) and the `[[auth.tokens]]` table with
    /// its hash, to paste into the configuration file.
    New {
        /// The token's unique name.
        #[arg(long)]
        name: String,
        /// A pattern it may publish on (`channel:GLOB`, `group:GLOB`, `*`); repeatable.
        #[arg(long, value_name = "PATTERN")]
        publish: Vec<String>,
        /// A pattern it may subscribe to; repeatable.
        #[arg(long, value_name = "PATTERN")]
        subscribe: Vec<String>,
        /// It may flush, back up, list and read the stats.
        #[arg(long)]
        admin: bool,
        /// When it stops being valid (RFC 3339, e.g. 2027-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339")]
        expires: Option<String>,
    },
    /// Print an HS256 JWT signed with the secret in FILE (auth.jwt_secret).
    Jwt {
        /// A file holding the secret; a trailing newline is not part of it.
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
        /// The `sub` claim.
        #[arg(long, value_name = "S")]
        sub: Option<String>,
        /// A pattern it may publish on; repeatable.
        #[arg(long, value_name = "P")]
        publish: Vec<String>,
        /// A pattern it may subscribe to; repeatable.
        #[arg(long, value_name = "P")]
        subscribe: Vec<String>,
        /// How long it is valid (e.g. 90s, 15m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// `herald bench ARGS`: replaces this process with `herald-bench ARGS`, found beside
/// this executable, which starts its servers with this executable. Returns only on
/// failure.
fn bench(args: Vec<std::ffi::OsString>) -> Failure {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Failure::NoBench(e.to_string()),
    };
    let bench = exe.with_file_name("herald-bench");
    if !bench.is_file() {
        return Failure::NoBench(format!("{} is missing", bench.display()));
    }
    let error = std::process::Command::new(&bench)
        .args(args)
        .env("HERALD_BIN", &exe)
        .exec();
    Failure::NoBench(format!("running {}: {error}", bench.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs as `server.log_format` says, once its settings are read.
    let mut log_format = LogFormat::Text;
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logging(log_format);
    }
    // The file `herald serve` reads again on SIGHUP.
    let config_file = match &cli.command {
        Command::Serve { config, .. } => config.clone(),
        _ => None,
    };
    let result: Result<(), Failure> = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            default_message_type,
            accept_data_loss,
        } => load(config, listen, data_dir).and_then(|mut settings| {
            settings.storage.accept_data_loss = accept_data_loss;
            if let Some(default_type) = default_message_type {
                settings.server.default_message_type = default_type;
            }
            log_format = settings.server.log_format;
            init_logging(log_format);
            serve(settings, config_file)
        }),
        Command::Config { config } => load(config, None, None).and_then(|settings| {
            let text = toml::to_string(&settings)?;
            print!("{text}");
            Ok(())
        }),
        Command::Export { data_dir, out } => dump::export(&data_dir, out.as_deref()),
        Command::Import {
            data_dir,
            input,
            file,
        } => dump::import(&data_dir, input.or(file).as_deref()),
        Command::Backup {
            url,
            out,
            token_file,
        } => token_file
            .map(|file| read_secret(&file))
            .transpose()
            .and_then(|token| dump::backup(&url, &out, token.as_deref())),
        Command::Bench { args } => Err(bench(args)),
        Command::Token(command) => token(command),
        Command::Publish(args) => client::publish(args),
        Command::Subscribe(args) => client::subscribe(args),
        Command::Stats(args) => client::stats(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            say(
                log_format,
                Stream::Stderr,
                "ERROR",
                &format!("herald: {failure}"),
            );
            ExitCode::from(failure.exit_code())
        }
    }
}

/// `herald token new` and `herald token jwt`.
fn token(command: TokenCommand) -> Result<(), Failure> {
    match command {
        TokenCommand::New {
            name,
            publish,
            subscribe,
            admin,
            expires,
        } => {
            let secret = auth::token::generate();
            let table = TokenSettings {
                name,
                hash: auth::token::hash(&secret),
                publish,
                subscribe,
                admin,
                expires,
            };
            let settings = AuthSettings {
                tokens: vec![table],
                ..AuthSettings::default()
            };
            auth::validate(&settings)?;
            #[derive(serde::Serialize)]
            struct Tables<'a> {
                tokens: &'a [TokenSettings],
            }
            #[derive(serde::Serialize)]
            struct Auth<'a> {
                auth: Tables<'a>,
            }
            let text = toml::to_string(&Auth {
                auth: Tables {
                    tokens: &settings.tokens,
                },
            })?;
            eprintln!(
                "The token (shown only now; give it to its client and keep it secret), then \
                 the table to add to the configuration file:"
            );
            println!("{secret}\n\n{text}");
            Ok(())
        }
        TokenCommand::Jwt {
            secret_file,
            sub,
            publish,
            subscribe,
            ttl,
        } => {
            let secret = read_secret(&secret_file)?;
            let jwt = auth::mint_hs256(secret.as_bytes(), sub, publish, subscribe, ttl)?;
            println!("{jwt}");
            Ok(())
        }
    }
}

/// The secret in `file`, without the trailing newline an editor adds.
fn read_secret(file: &std::path::Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(file).map_err(|source| Failure::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err(Failure::NoSecret(file.to_path_buf()));
    }
    Ok(secret.to_string())
}

fn load(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> Result<Settings, Failure> {
    let mut settings = Settings::load(config.as_deref())?;
    if let Some(listen) = listen {
        settings.server.listen = listen;
    }
    if let Some(data_dir) = data_dir {
        settings.storage.data_dir = data_dir;
    }
    settings.validate()?;
    Ok(settings)
}

fn serve(settings: Settings, config: Option<PathBuf>) -> Result<(), Failure> {
    let loopback = settings.server.listen.ip().is_loopback();
    if let Some(why) = auth::wide_open(&settings.auth, loopback) {
        return Err(Failure::WideOpen(why));
    }
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::Runtime)?;
    let format = settings.server.log_format;
    runtime.block_on(async {
        let bind = |addr: SocketAddr| async move {
            let failed = |source| Failure::Listen { addr, source };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
            let local = listener.local_addr().map_err(failed)?;
            Ok::<_, Failure>((listener, local))
        };
        let (api, addr) = bind(settings.server.listen).await?;
        let metrics = match settings.server.metrics_listen {
            Some(metrics_addr) => Some(bind(metrics_addr).await?),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|(_, addr)| addr.to_string());
        let listeners = server::Listeners {
            api,
            metrics: metrics.map(|(listener, _)| listener),
        };
        // Before announcing the address: a SIGTERM right after it shuts down cleanly.
        let shutdown = server::signal().map_err(Failure::Signals)?;
        let reload = server::Reload::install(move || {
            Settings::load(config.as_deref()).map(|settings| settings.auth)
        })
        .map_err(Failure::Signals)?;
        if auth::open_to_all(&settings.auth, loopback) {
            tracing::warn!(
                %addr,
                "auth.default_access = \"all\" on a non-loopback address: anyone who reaches \
                 the port may publish and subscribe everywhere"
            );
        }
        let data_dir = settings.storage.data_dir.display().to_string();
        let durability = format!("{:?}", settings.storage.durability).to_lowercase();
        let auth_mode = auth::mode(&settings.auth, loopback);
        tracing::info!(%addr, data_dir, durability, auth = auth_mode, metrics = metrics_addr, "herald is starting: opening the data");
        let opening = async {
            // sled asserts on some damaged files: while opening, a panic is one line
            // of stderr (the error that follows says what to do), not a backtrace.
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let place = info
                    .location()
                    .map(|l| format!(" ({}:{})", l.file(), l.line()))
                    .unwrap_or_default();
                say(
                    format,
                    Stream::Stderr,
                    "ERROR",
                    &format!(
                        "herald: internal error while opening the data directory: {}{place}",
                        server::panic_message(info.payload())
                    ),
                );
            }));
            let layer = server::open_layer(&settings).await;
            std::panic::set_hook(default_hook);
            layer
        };
        let ready = || {
            tracing::info!(%addr, data_dir, durability, auth = auth_mode, "herald is serving");
            say(
                format,
                Stream::Stdout,
                "INFO",
                &format!("herald listening on http://{addr}"),
            );
        };
        server::run(settings.clone(), listeners, opening, shutdown, reload, ready).await?;
        tracing::info!(%addr, data_dir, durability, auth = auth_mode, "herald stopped");
        Ok(())
    })
}

/// Where [`say`] writes.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Writes one line outside the log (the start-up banner, a fatal error): as it is, or
/// as a JSON object shaped as the log's lines when the log is JSON.
fn say(format: LogFormat, stream: Stream, level: &str, message: &str) {
    let line = match format {
        LogFormat::Text => message.to_string(),
        LogFormat::Json => serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": level,
            "message": message,
            "target": "herald",
        })
        .to_string(),
    };
    match stream {
        Stream::Stdout => println!("{line}"),
        Stream::Stderr => eprintln!("{line}"),
    }
}

/// Logs to stderr as `format` says, at the level of `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => log.init(),
        LogFormat::Json => log.json().flatten_event(true).init(),
    }
}

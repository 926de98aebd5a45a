//! The `herald` command: parses flags, sets up logging and settings, and runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::config::Settings;
use herald::server;

mod dump;

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
    },
    /// Run load scenarios against a fresh server (or --url) and report throughput,
    /// delivery, latency, errors and server memory.
    Bench(herald::bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
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
            serve(settings)
        }),
        Command::Config { config } => load(config, None, None).and_then(|settings| {
            let text = toml::to_string(&settings).map_err(|e| e.to_string())?;
            print!("{text}");
            Ok(())
        }),
        Command::Export { data_dir, out } => dump::export(&data_dir, out.as_deref()),
        Command::Import {
            data_dir,
            input,
            file,
        } => dump::import(&data_dir, input.or(file).as_deref()),
        Command::Backup { url, out } => dump::backup(&url, &out),
        Command::Bench(options) => herald::bench::run(options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("herald: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
) -> Result<Settings, String> {
    let mut settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(listen) = listen {
        settings.server.listen = listen;
    }
    if let Some(data_dir) = data_dir {
        settings.storage.data_dir = data_dir;
    }
    settings.validate().map_err(|e| e.to_string())?;
    Ok(settings)
}

fn serve(settings: Settings) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        // sled asserts on some damaged files: while opening, a panic is one line of
        // stderr (the error that follows says what to do), not a backtrace.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            let place = info
                .location()
                .map(|l| format!(" ({}:{})", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!(
                "herald: internal error while opening the data directory: {}{place}",
                server::panic_message(info.payload())
            );
        }));
        let layer = server::open_layer(&settings).await;
        std::panic::set_hook(default_hook);
        let layer = layer.map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(settings.server.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.server.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        // Before announcing the address: a SIGTERM right after it shuts down cleanly.
        let shutdown =
            server::signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        tracing::info!(
            %addr,
            data_dir = %settings.storage.data_dir.display(),
            durability = ?settings.storage.durability,
            "herald is serving"
        );
        println!("herald listening on http://{addr}");
        server::run(settings, layer, listener, shutdown).await;
        Ok(())
    })
}

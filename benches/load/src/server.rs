//! The server under test: one the bench starts (a child `herald serve` on port 0 with a
//! fresh data directory) or one it targets with `--url` (loopback only), and its RSS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// How long a started server may take to print its address.
/// The setting of `limits.max_connections_per_client` for the servers the bench starts.
const PER_CLIENT_ENV: &str = "HERALD_LIMITS__MAX_CONNECTIONS_PER_CLIENT";
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The address of a `--url`, which must be plain HTTP on a loopback host.
pub fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid --url {url:?}: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!("--url {url:?}: only http:// is supported"));
    }
    let ip = match parsed.host_str() {
        Some("127.0.0.1") | Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some("[::1]") => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => {
            return Err(format!(
                "--url {url:?}: the bench only loads loopback servers (127.0.0.1, localhost, [::1]), not {}",
                other.unwrap_or("an empty host")
            ));
        }
    };
    Ok(SocketAddr::new(
        ip,
        parsed.port_or_known_default().unwrap_or(80),
    ))
}

/// A server under test.
pub struct Server {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Started>,
}

/// What the bench owns of a server it started.
struct Started {
    child: Child,
    /// Kept open so that the server never writes to a closed stdout.
    _stdout: BufReader<ChildStdout>,
    dir: tempfile::TempDir,
}

impl Server {
    /// A running server that the bench does not own.
    pub fn external(addr: SocketAddr, pid: Option<u32>) -> Server {
        Server {
            addr,
            pid,
            child: None,
        }
    }

    /// Starts `herald serve` (the binary `exe`) on 127.0.0.1:0 with a fresh data
    /// directory, under `taskset -c CPU` when `cpu` is given, and waits for its address.
    pub async fn start(
        exe: &Path,
        config: Option<&Path>,
        cpu: Option<usize>,
    ) -> Result<Server, String> {
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a data directory: {e}"))?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(cpu.to_string()).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        let log = std::fs::File::create(dir.path().join("server.log"))
            .map_err(|e| format!("cannot create the server log: {e}"))?;
        // The bench is one client address holding thousands of connections: its servers
        // allow that unless the environment says otherwise.
        if std::env::var_os(PER_CLIENT_ENV).is_none() {
            cmd.env(PER_CLIENT_ENV, "1000000");
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let pid = child.id();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, stdout.read_line(&mut line)).await;
        let log_text =
            || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let _ = child.start_kill();
            return Err(format!(
                "the server did not report its address within {START_TIMEOUT:?}; its log:\n{}",
                log_text()
            ));
        }
        let addr = line
            .trim()
            .strip_prefix("herald listening on http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected first line from the server: {line:?}"))?;
        Ok(Server {
            addr,
            pid,
            child: Some(Started {
                child,
                _stdout: stdout,
                dir,
            }),
        })
    }

    /// The server's resident memory and its peak (VmRSS, VmHWM) in MiB, when its pid is known.
    pub fn rss_mib(&self) -> Option<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let kib = |key: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }

    /// The CPU time used so far by the server and by the bench, to measure a load phase.
    pub fn cpu_mark(&self) -> CpuMark {
        CpuMark {
            server: self.pid.and_then(|pid| cpu_seconds(&pid.to_string())),
            bench: cpu_seconds("self"),
            at: std::time::Instant::now(),
        }
    }

    /// Whether a server that the bench started has exited (e.g. crashed under load).
    pub fn exited(&mut self) -> Option<String> {
        let started = self.child.as_mut()?;
        match started.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the server exited ({status}); its log:\n{}",
                std::fs::read_to_string(started.dir.path().join("server.log")).unwrap_or_default()
            )),
            _ => None,
        }
    }

    /// Stops a server that the bench started: SIGTERM, then SIGKILL after 5 s.
    pub async fn stop(mut self) {
        let Some(mut started) = self.child.take() else {
            return;
        };
        if let Some(pid) = started.child.id() {
            // SAFETY: kill(2) on our own child's pid, which it keeps until we reap it.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(STOP_TIMEOUT, started.child.wait())
            .await
            .is_err()
        {
            let _ = started.child.kill().await;
        }
    }
}

/// CPU seconds used by the server and the bench at one instant.
pub struct CpuMark {
    server: Option<f64>,
    bench: Option<f64>,
    at: std::time::Instant,
}

impl CpuMark {
    /// The CPU use of the server and of the bench since this mark, in % of one core.
    pub fn percent_since(&self, server: &Server) -> (Option<f64>, Option<f64>) {
        let now = server.cpu_mark();
        let wall = (now.at - self.at).as_secs_f64().max(1e-6);
        let percent =
            |before: Option<f64>, after: Option<f64>| Some((after? - before?) * 100.0 / wall);
        (
            percent(self.server, now.server),
            percent(self.bench, now.bench),
        )
    }
}

/// CPU seconds (user + system) used by process `pid` (a number or `self`), from
/// `/proc/PID/stat`.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_reads_this_process() {
        let spent = cpu_seconds("self").expect("/proc/self/stat");
        assert!(spent >= 0.0);
    }

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert_eq!(
            loopback_addr("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            loopback_addr("http://localhost:9/").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(
            loopback_addr("http://[::1]:8080").unwrap(),
            "[::1]:8080".parse().unwrap()
        );
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "https://127.0.0.1",
            "127.0.0.1:8080",
        ] {
            assert!(loopback_addr(bad).is_err(), "{bad}");
        }
    }
}

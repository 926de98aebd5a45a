//! `floor-sse`: the load of `fanout-sse` against a stand-in server that does only what
//! no SSE server can avoid: one thread, pinned like the server (`--server-cpu`), waits
//! for a publish (an HTTP POST from the same publishers), writes its body as one event
//! to each subscriber's socket with one `write` each (the body ended by the connection,
//! as Herald's streams are), and answers `202`. No routing, no storage, no scheduler.
//! Its latencies are the floor that this machine's loopback TCP and wake-ups put under
//! any server's fan-out, measured with the same clients and clock as the real
//! scenarios.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::load::{self, Destination, Transport};
use super::report::{Latency, Report, percentiles};
use super::scenario::{
    Ctx, FANOUT_PUBLISHERS, Listening, fanout_report, note_first_error, open_subscribers,
};

/// How long the stand-in waits for the subscribers to connect.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(60);

/// How often the stand-in looks whether the load is over while no publish comes.
const POLL_MS: libc::c_int = 100;

/// The stand-in's answer to a publish.
const ACCEPTED: &[u8] =
    b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// What the writer thread measured.
struct Written {
    publishes: u64,
    /// CPU time of the writing alone (thread CPU clock around each burst).
    write_cpu: Duration,
    /// Wall time of each burst: first write to last.
    bursts_us: Vec<u64>,
}

pub async fn floor_sse(
    ctx: &Ctx<'_>,
    name: &str,
    subscribers: usize,
    rate: f64,
) -> Result<Report, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let done = Arc::new(AtomicBool::new(false));
    let cpu = ctx.opts.server_cpu;
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || -> Result<(Written, Vec<TcpStream>), String> {
            if let Some(cpu) = cpu {
                pin_to(cpu)?;
            }
            let sockets = match accept_all(&listener, subscribers) {
                Ok(sockets) => sockets,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            Ok((relay(&listener, &sockets, &done)?, sockets))
        })
    };
    let channels: Vec<String> = (0..subscribers).map(|n| format!("floor{n}")).collect();
    let (subs, errors, first_error) = open_subscribers(addr, false, "floor", &channels).await;
    let connected = subs.len();
    let ready = tokio::task::spawn_blocking(move || ready_rx.recv())
        .await
        .map_err(|e| e.to_string())?;
    ready
        .map_err(|_| "the stand-in server stopped".to_string())?
        .map_err(|e| format!("stand-in server: {e}"))?;
    ctx.progress(&format!(
        "{name}: {connected}/{subscribers} subscribers connected; publishing {rate}/s for {} s",
        ctx.opts.duration
    ));
    let listening = Listening::start(subs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (schedule, published) = load::publish(
        addr,
        Transport::Http,
        Destination::Group("floor".into()),
        FANOUT_PUBLISHERS,
        ctx.duration(),
        Some(rate),
    )
    .await;
    done.store(true, Ordering::Relaxed);
    // The sockets stay open until the drain is over: a close is not a delivery.
    let (written, sockets) = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the stand-in server panicked".to_string())??;
    let received = listening
        .drain(published.accepted.len() as u64 * connected as u64)
        .await;
    drop(sockets);

    let mode = format!(
        "open loop at {rate}/s, {FANOUT_PUBLISHERS} HTTP publishers, one pinned thread \
         relaying (no Herald), SSE subscribers"
    );
    let mut report = fanout_report(
        name,
        mode,
        (&schedule, &published),
        (subscribers, connected),
        received,
        errors,
    );
    // The stand-in writes to every subscriber it accepted, and it accepts all of them.
    let writes = written.publishes * subscribers as u64;
    let per_write_us = written.write_cpu.as_secs_f64() * 1e6 / writes.max(1) as f64;
    let bursts = percentiles(written.bursts_us);
    report.notes.insert(
        0,
        format!(
            "{name}: writer CPU {per_write_us:.1} µs per write ({} writes); burst of {connected} writes{}",
            writes,
            bursts.map_or(String::new(), |b: Latency| format!(
                " p50/p99 {:.2}/{:.2} ms",
                b.p50_ms, b.p99_ms
            )),
        ),
    );
    note_first_error(&mut report, first_error);
    Ok(report)
}

/// Accepts `n` subscribers, reads each one's request head and answers with the head of
/// an event stream.
fn accept_all(listener: &TcpListener, n: usize) -> Result<Vec<TcpStream>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + ACCEPT_DEADLINE;
    let mut sockets = Vec::with_capacity(n);
    while sockets.len() < n {
        match listener.accept() {
            Ok((mut socket, _)) => {
                socket.set_nonblocking(false).map_err(|e| e.to_string())?;
                socket.set_nodelay(true).map_err(|e| e.to_string())?;
                read_head(&mut socket)?;
                socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          connection: close\r\n\r\n",
                    )
                    .map_err(|e| e.to_string())?;
                sockets.push(socket);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!(
                        "only {} of {n} subscribers connected",
                        sockets.len()
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(sockets)
}

/// Reads up to the blank line that ends a request head.
fn read_head(socket: &mut TcpStream) -> Result<(), String> {
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = socket.read(&mut byte).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("a subscriber closed before its request ended".into());
        }
        head.extend_from_slice(&byte[..n]);
    }
    Ok(())
}

/// Serves the publishers until `done`: accepts their connections, and for each POST
/// writes its body as one event to every subscriber (one `write` each), then answers
/// `202`. Waiting for a publish is a blocking `poll`, as any server's idle wait is.
fn relay(
    listener: &TcpListener,
    subscribers: &[TcpStream],
    done: &AtomicBool,
) -> Result<Written, String> {
    let mut written = Written {
        publishes: 0,
        write_cpu: Duration::ZERO,
        bursts_us: Vec::new(),
    };
    let mut publishers: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(publishers.iter().map(|(socket, _)| socket.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if ready < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if fds[0].revents != 0
            && let Ok((socket, _)) = listener.accept()
        {
            socket.set_nonblocking(false).map_err(|e| e.to_string())?;
            socket.set_nodelay(true).map_err(|e| e.to_string())?;
            publishers.push((socket, Vec::new()));
        }
        let mut closed = Vec::new();
        for (n, fd) in fds.iter().enumerate().skip(1) {
            if fd.revents == 0 {
                continue;
            }
            let (socket, pending) = &mut publishers[n - 1];
            let mut bytes = [0; 4096];
            match socket.read(&mut bytes) {
                Ok(0) | Err(_) => {
                    closed.push(n - 1);
                    continue;
                }
                Ok(read) => pending.extend_from_slice(&bytes[..read]),
            }
            while let Some((body, used)) = next_request(pending) {
                let event = format!(
                    "data:{}\nid:{}\n\n",
                    String::from_utf8_lossy(body),
                    written.publishes
                );
                let (cpu0, wall0) = (thread_cpu(), Instant::now());
                for mut subscriber in subscribers {
                    subscriber
                        .write_all(event.as_bytes())
                        .map_err(|e| e.to_string())?;
                }
                written.write_cpu += thread_cpu().saturating_sub(cpu0);
                written.bursts_us.push(wall0.elapsed().as_micros() as u64);
                written.publishes += 1;
                pending.drain(..used);
                socket.write_all(ACCEPTED).map_err(|e| e.to_string())?;
            }
        }
        for n in closed.into_iter().rev() {
            publishers.swap_remove(n);
        }
    }
    Ok(written)
}

/// The body of the first whole request in `bytes` (sized by `content-length`) and how
/// many bytes the request takes, or `None` while it is incomplete.
fn next_request(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let body = bytes.get(head_end..head_end + length)?;
    Some((body, head_end + length))
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only
    // read and write that set.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_cut_at_their_content_length() {
        let two = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\ncontent-length: 2\r\n\r\nxy";
        let (body, used) = next_request(two).expect("a whole request");
        assert_eq!(body, b"abc");
        let (body, rest) = next_request(&two[used..]).expect("a whole request");
        assert_eq!((body, used + rest), (&b"xy"[..], two.len()));
        assert!(next_request(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nab").is_none());
        assert!(next_request(b"POST /a HTTP/1.1\r\nContent-Len").is_none());
    }
}

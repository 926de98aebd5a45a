//! `floor-sse`: the fan-out of `fanout-sse` against a stand-in server that does only
//! what no SSE server can avoid: one thread, pinned like the server (`--server-cpu`),
//! writes each event to each subscriber's socket with one `write` (HTTP/1.1 chunked, as
//! Herald's streams are). No parsing, no storage, no scheduler. Its latencies are the
//! floor that this machine's loopback TCP puts under any server's fan-out, measured with
//! the same subscribers and clock as the real scenarios.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::load::{self, Schedule};
use super::report::{Latency, Report, merge, percentiles};
use super::scenario::{Ctx, Listening, note_first_error, open_subscribers};

/// How long the stand-in waits for the subscribers to connect.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(60);

/// Below this much time to a due publish, the writer spins instead of sleeping, so that
/// the thread's wake-up lag does not count against the floor.
const SPIN: Duration = Duration::from_micros(500);

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
    let (start_tx, start_rx) = mpsc::channel::<Arc<Schedule>>();
    let cpu = ctx.opts.server_cpu;
    let writer = std::thread::spawn(move || -> Result<(Written, Vec<TcpStream>), String> {
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
        let schedule = start_rx.recv().map_err(|e| e.to_string())?;
        Ok((write_all(&sockets, &schedule)?, sockets))
    });
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
        "{name}: {connected}/{subscribers} subscribers connected; writing {rate}/s for {} s",
        ctx.opts.duration
    ));
    let listening = Listening::start(subs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let schedule = Schedule::new(ctx.duration(), Some(rate));
    start_tx
        .send(schedule.clone())
        .map_err(|_| "the stand-in server stopped".to_string())?;
    // The sockets stay open until the drain is over: a close is not a delivery.
    let (written, sockets) = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the stand-in server panicked".to_string())??;
    let expected = written.publishes * connected as u64;
    let received = listening.drain(expected).await;
    drop(sockets);

    let elapsed = schedule.start().elapsed().as_secs_f64();
    let deliveries = received.latencies_us.len() as u64;
    let mut report = Report {
        scenario: name.into(),
        mode: format!(
            "open loop at {rate}/s, one pinned writer thread (no Herald), SSE subscribers"
        ),
        duration_s: ctx.opts.duration,
        subscribers_requested: subscribers,
        subscribers_connected: connected,
        publishes: written.publishes,
        publishes_per_s: Some(written.publishes as f64 / ctx.opts.duration),
        deliveries,
        deliveries_per_s: Some(deliveries as f64 / elapsed),
        expected: Some(expected),
        delivered_ratio: Some(deliveries as f64 / expected.max(1) as f64),
        latency_kind: Some("end to end: scheduled send to receive".into()),
        latency: percentiles(received.latencies_us),
        errors,
        ..Report::default()
    };
    merge(&mut report.errors, received.errors);
    // The stand-in writes to every subscriber it accepted, and it accepts all of them.
    let writes = written.publishes * subscribers as u64;
    let per_write_us = written.write_cpu.as_secs_f64() * 1e6 / writes.max(1) as f64;
    let bursts = percentiles(written.bursts_us);
    report.notes.push(format!(
        "{name}: writer CPU {per_write_us:.1} µs per write ({} writes); burst of {connected} writes{}",
        writes,
        bursts.map_or(String::new(), |b: Latency| format!(
            " p50/p99 {:.2}/{:.2} ms",
            b.p50_ms, b.p99_ms
        )),
    ));
    note_first_error(&mut report, first_error);
    Ok(report)
}

/// Accepts `n` subscribers, reads each one's request head and answers with the head of
/// a chunked event stream.
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
                          transfer-encoding: chunked\r\n\r\n",
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

/// Writes each due event to every socket, one `write` each, until the schedule ends.
fn write_all(sockets: &[TcpStream], schedule: &Schedule) -> Result<Written, String> {
    let mut written = Written {
        publishes: 0,
        write_cpu: Duration::ZERO,
        bursts_us: Vec::new(),
    };
    while let Some((seq, due)) = schedule.claim() {
        if let Some(wait) = due.checked_duration_since(Instant::now())
            && wait > SPIN
        {
            std::thread::sleep(wait - SPIN);
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let event = format!("data:{}\nid:{seq}\n\n", load::message(seq, due));
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        let (cpu0, wall0) = (thread_cpu(), Instant::now());
        for mut socket in sockets {
            socket
                .write_all(chunk.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        written.write_cpu += thread_cpu().saturating_sub(cpu0);
        written.bursts_us.push(wall0.elapsed().as_micros() as u64);
        written.publishes += 1;
    }
    Ok(written)
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

//! Criterion benchmarks of the channel layer's hot paths, with the default durability
//! (`sync`: every acknowledged operation is fsynced, concurrent ones share a flush).
//!
//! - `send_receive/{1,64}`: a send and a receive on one channel, from 1 or 64 tasks.
//! - `group_send/{1,100,10000}`: a group_send to a group of that many members, from
//!   32 tasks; throughput is counted in queue deliveries.
//! - `encode/json_to_msgpack`: parsing and validating a ~100-byte JSON message.
//! - `restart/100000`: opening a data directory that holds 100,000 pending messages in
//!   1,000 channels (reading the store back into memory), until the layer can serve.
//!
//! Run with `make bench`; the reference printed alongside is `send_receive/1`, the
//! rate of one client waiting for each fsync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::ChannelLayer;
use herald::config::Settings;
use herald::layer::clock::SystemClock;
use herald::message::Message;
use tokio::runtime::Runtime;

const BODY: &[u8] =
    br#"{"type":"alert.raised","host":"db-7","level":"critical","text":"disk /var is 97% full"}"#;

fn open(capacity: usize) -> (ChannelLayer, tempfile::TempDir) {
    // On the build disk, not a tmpfs, so that fsync costs what it costs in production.
    std::fs::create_dir_all("target/bench-data").unwrap();
    let dir = tempfile::tempdir_in("target/bench-data").unwrap();
    let layer = open_in(dir.path(), capacity);
    (layer, dir)
}

fn open_in(dir: &std::path::Path, capacity: usize) -> ChannelLayer {
    let mut settings = Settings::load(None).unwrap();
    settings.storage.data_dir = dir.to_path_buf();
    settings.layer.capacity = capacity;
    ChannelLayer::open(&settings, Arc::new(SystemClock)).unwrap()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `total` calls of `op` spread over `tasks` tasks and returns the elapsed time.
async fn spread<F, Fut>(tasks: u64, total: u64, op: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            let share = total / tasks + u64::from(t < total % tasks);
            tokio::spawn(async move {
                for i in 0..share {
                    op(t * 1_000_000 + i).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    start.elapsed()
}

fn send_receive(c: &mut Criterion) {
    let rt = runtime();
    let message = Message::from_json(BODY).unwrap();
    let mut group = c.benchmark_group("send_receive");
    group.throughput(Throughput::Elements(1));
    for tasks in [1u64, 64] {
        let (layer, _dir) = rt.block_on(async { open(100_000) });
        group.bench_with_input(BenchmarkId::from_parameter(tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                let layer = layer.clone();
                let message = message.clone();
                rt.block_on(spread(tasks, iters, move |_| {
                    let layer = layer.clone();
                    let message = message.clone();
                    async move {
                        layer.send("bench", message).await.unwrap();
                        layer
                            .receive("bench", Duration::ZERO)
                            .await
                            .unwrap()
                            .unwrap();
                    }
                }))
            })
        });
    }
    group.finish();
}

fn group_send(c: &mut Criterion) {
    let rt = runtime();
    let message = Message::from_json(BODY).unwrap();
    let mut group = c.benchmark_group("group_send");
    group.sample_size(10);
    for members in [1u64, 100, 10_000] {
        // Room for every copy the benchmark makes between flushes.
        let (layer, _dir) = open(1_000_000);
        let join = |layer: ChannelLayer| {
            spread(64, members, move |m| {
                let layer = layer.clone();
                async move {
                    let channel = format!("member.{}.{}", m / 1_000_000, m % 1_000_000);
                    layer.group_add("bench", &channel).await.unwrap();
                }
            })
        };
        rt.block_on(join(layer.clone()));
        group.throughput(Throughput::Elements(members));
        group.bench_with_input(
            BenchmarkId::from_parameter(members),
            &members,
            |b, &members| {
                b.iter_custom(|iters| {
                    // Empty the queues every few thousand deliveries' worth, outside the timing.
                    let chunk = (200_000 / members).clamp(1, 10_000);
                    let mut elapsed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(chunk);
                        let layer2 = layer.clone();
                        let message = message.clone();
                        elapsed += rt.block_on(spread(32, n, move |_| {
                            let layer = layer2.clone();
                            let message = message.clone();
                            async move {
                                let report = layer.group_send("bench", message).await.unwrap();
                                assert_eq!(report.full, 0);
                            }
                        }));
                        left -= n;
                        rt.block_on(async {
                            layer.flush().await.unwrap();
                            join(layer.clone()).await;
                        });
                    }
                    elapsed
                })
            },
        );
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json_to_msgpack", |b| {
        b.iter(|| Message::from_json(std::hint::black_box(BODY)).unwrap())
    });
    let message = Message::from_json(BODY).unwrap();
    group.bench_function("msgpack_to_json", |b| {
        b.iter(|| {
            Message::from_msgpack(std::hint::black_box(message.msgpack()))
                .unwrap()
                .json()
                .len()
        })
    });
    group.finish();
}

fn restart(c: &mut Criterion) {
    const PENDING: u64 = 100_000;
    let rt = runtime();
    let message = Message::from_json(BODY).unwrap();
    let (layer, dir) = open(1_000_000);
    rt.block_on(spread(64, PENDING, move |n| {
        let layer = layer.clone();
        let message = message.clone();
        async move {
            let channel = format!("pending.{}", n % 1000);
            layer.send(&channel, message).await.unwrap();
        }
    }));
    let mut group = c.benchmark_group("restart");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PENDING));
    group.bench_function(BenchmarkId::from_parameter(PENDING), |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let layer = open_in(dir.path(), 1_000_000);
                elapsed += start.elapsed();
                assert_eq!(layer.stats().pending_messages as u64, PENDING);
            }
            elapsed
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = send_receive, group_send, encode, restart
}
criterion_main!(benches);

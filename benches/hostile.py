#!/usr/bin/env python3
"""Hostile-client probes at scale, against a fresh release server on loopback.

Fills a server with CHANNELS channels (one pending message each), then runs each probe
while a victim client sends (durably: each send waits for its fsync) and receives one
message at a time, and prints a table:

- listing: 8 clients page through GET /v1/channels (1,000 a page), back to back;
- stats and metrics: GET /v1/stats and GET /metrics, one call after another;
- backup: 8 clients take 2 backups each, reading as fast as they can;
- uploads: 8 clients post hostile 1 MiB bodies in a loop (a msgpack array of nils, a
  JSON array of zeros), while /healthz is probed every 10 ms.

For each: the probe's own latencies, the victim's p99 and worst (a receive takes the
layer lock but waits for no disk, so it shows what the probe holds the lock for, and
CPU contention; a send adds its fsync), and the server's RSS.

    python3 benches/hostile.py [--herald-bin target/release/herald] [--channels 200000]

Standard library only; every loop is bounded by count or time and stops by itself.
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

HOST = "127.0.0.1"


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method, path, body=b"", headers=(), sink=None):
        """Sends a request; returns (status, body). With `sink`, body chunks go to it."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        status = int(status_line.split()[1])
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value.lower() == "close":
                close = True
        data = bytearray()
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                chunk = await self.reader.readexactly(size)
                await self.reader.readexactly(2)
                if sink:
                    sink(chunk)
                else:
                    data += chunk
        elif length:
            data = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, bytes(data)

    def close(self):
        if self.writer:
            self.writer.close()
        self.reader = self.writer = None


def percentile(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def ms(seconds):
    return f"{seconds * 1000:.1f}"


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def victim(port, stop, sends, receives):
    """Sends and receives one message at a time until `stop` is set, timing each."""
    conn = Conn(port)
    n = 0
    while not stop.is_set():
        start = time.perf_counter()
        body = json.dumps({"type": "victim", "n": n}).encode()
        status, _ = await conn.request(
            "POST", "/v1/channels/victim/messages", body, [("Content-Type", "application/json")]
        )
        assert status == 202, status
        sent = time.perf_counter()
        status, _ = await conn.request("GET", "/v1/channels/victim/messages")
        assert status == 200, status
        sends.append(sent - start)
        receives.append(time.perf_counter() - sent)
        n += 1
        await asyncio.sleep(0.005)
    conn.close()


async def with_victim(port, probe):
    """Runs `probe` while the victim works: (probe's result, send and receive times)."""
    stop, sends, receives = asyncio.Event(), [], []
    task = asyncio.create_task(victim(port, stop, sends, receives))
    await asyncio.sleep(0.2)
    try:
        result = await probe()
    finally:
        stop.set()
        await task
    return result, (sends, receives)


async def fill(port, channels):
    queue = iter(range(channels))

    async def worker():
        conn = Conn(port)
        for i in queue:
            status, _ = await conn.request(
                "POST", f"/v1/channels/ch.{i:07d}/messages", b'{"type":"x"}',
                [("Content-Type", "application/json")],
            )
            assert status == 202, status
        conn.close()

    await asyncio.gather(*(worker() for _ in range(64)))


async def listing(port, seconds, clients):
    pages = []
    deadline = time.monotonic() + seconds

    async def lister():
        conn, after = Conn(port), None
        while time.monotonic() < deadline:
            path = "/v1/channels?limit=1000" + (f"&after={after}" if after else "")
            start = time.perf_counter()
            status, body = await conn.request("GET", path)
            pages.append(time.perf_counter() - start)
            assert status == 200, status
            after = json.loads(body).get("next")
        conn.close()

    await asyncio.gather(*(lister() for _ in range(clients)))
    return pages


async def scrape(port, path, calls):
    conn, took = Conn(port), []
    for _ in range(calls):
        start = time.perf_counter()
        status, _ = await conn.request("GET", path)
        took.append(time.perf_counter() - start)
        assert status == 200, status
    conn.close()
    return took


async def backups(port, clients, each):
    took, sizes = [], []

    async def client():
        conn = Conn(port)
        for _ in range(each):
            size = [0]
            start = time.perf_counter()
            status, _ = await conn.request(
                "GET", "/v1/admin/backup", sink=lambda c: size.__setitem__(0, size[0] + len(c))
            )
            took.append(time.perf_counter() - start)
            sizes.append(size[0])
            assert status == 200, status
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return took, sizes


def hostile_bodies():
    size = 1 << 20
    msgpack = bytearray(b"\x82\xa4type\xa1x\xa1a\xdd")
    nils = size - len(msgpack) - 4
    msgpack += nils.to_bytes(4, "big") + b"\xc0" * nils
    body = b'{"type":"x","a":[0' + b",0" * ((size - 21) // 2) + b"]}"
    return [(bytes(msgpack), "application/msgpack"), (body, "application/json")]


async def uploads(port, seconds):
    deadline = time.monotonic() + seconds
    bodies = hostile_bodies()
    health, answers = [], {}

    async def uploader(n):
        conn = Conn(port)
        body, content_type = bodies[n % 2]
        while time.monotonic() < deadline:
            status, _ = await conn.request(
                "POST", "/v1/channels/hostile/messages", body, [("Content-Type", content_type)]
            )
            answers[status] = answers.get(status, 0) + 1

    async def prober():
        conn = Conn(port)
        while time.monotonic() < deadline:
            start = time.perf_counter()
            status, _ = await conn.request("GET", "/healthz")
            health.append(time.perf_counter() - start)
            assert status == 200, status
            await asyncio.sleep(0.01)
        conn.close()

    await asyncio.gather(prober(), *(uploader(n) for n in range(8)))
    return health, answers


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--herald-bin", default="target/release/herald")
    parser.add_argument("--channels", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="herald-hostile-")
    server = subprocess.Popen(
        [args.herald_bin, "serve", "--listen", f"{HOST}:0", "--data-dir", data],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RUST_LOG": "warn", "HERALD_LAYER__CAPACITY": "100"},
    )
    try:
        for line in server.stdout:
            found = re.search(r"listening on http://[\d.]+:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        start = time.perf_counter()
        await fill(port, args.channels)
        print(f"filled {args.channels} channels in {time.perf_counter() - start:.1f} s; "
              f"RSS {rss_mib(server.pid):.0f} MiB")
        rows = []

        def row(name, probe_lat, victim, extra=""):
            sends, receives = victim
            rows.append(
                f"| {name} | {len(probe_lat)} | {ms(percentile(probe_lat, 50))} | "
                f"{ms(percentile(probe_lat, 99))} | {ms(max(probe_lat, default=0))} | "
                f"{ms(percentile(sends, 99))} / {ms(max(sends))} | "
                f"{ms(percentile(receives, 99))} / {ms(max(receives))} | "
                f"{rss_mib(server.pid):.0f} | {extra} |"
            )

        _, lat = await with_victim(port, lambda: asyncio.sleep(args.seconds))
        row("nothing (the victim alone)", [], lat)
        for clients in (1, 8):
            pages, lat = await with_victim(port, lambda: listing(port, args.seconds, clients))
            row(f"{clients} client(s) paging GET /v1/channels?limit=1000", pages, lat)
        for path in ("/v1/stats", "/metrics"):
            took, lat = await with_victim(port, lambda: scrape(port, path, 200))
            row(f"GET {path}", took, lat)
        for clients, each in ((1, 4), (8, 2)):
            (took, sizes), lat = await with_victim(port, lambda: backups(port, clients, each))
            row(f"{clients} client(s) x {each} GET /v1/admin/backup", took, lat,
                f"dump {sizes[0] / 1e6:.1f} MB")
        (health, answers), lat = await with_victim(port, lambda: uploads(port, args.seconds))
        row("GET /healthz under 8 hostile 1 MiB uploaders", health, lat,
            "uploads answered " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
        print()
        print("| probe | calls | p50 ms | p99 ms | max ms | victim send p99 / max ms "
              "| victim receive p99 / max ms | RSS MiB | notes |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

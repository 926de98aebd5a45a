"""A real Herald server for the tests: the binary from HERALD_BIN, or the workspace's
debug build, on an ephemeral loopback port with a temporary data directory."""

import os
import pathlib
import re
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[3]


class HeraldServer:
    """A running ``herald serve``; ``url`` is its base URL."""

    def __init__(self, config: str = ""):
        binary = os.environ.get("HERALD_BIN") or str(ROOT / "target" / "debug" / "herald")
        self.dir = tempfile.TemporaryDirectory(prefix="herald-py-")
        config_path = pathlib.Path(self.dir.name) / "herald.toml"
        config_path.write_text(config)
        self.process = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir",
             str(pathlib.Path(self.dir.name) / "data"), "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        for line in self.process.stdout:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1).rstrip("/")
                break
        else:
            raise RuntimeError(f"herald did not start (exit {self.process.wait()})")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.dir.cleanup()


#: The layer settings of the upstream suites: capacity 3, and 1 for the channels "tiny"
#: and "one"; an expiry of 3 s for new_channel()'s channels, which channels_redis'
#: expiry tests give their layer (and room for this package's own "roomy.*" channels).
SUITE_CONFIG = (
    '[layer]\ncapacity = 3\n[layer.channel_capacity]\n"tiny" = 1\n"one" = 1\n"roomy.*" = 1000\n'
    '[layer.channel_expiry]\n"specific.*" = 3\n'
)

"""The seed's chat app, unchanged but for its CHANNEL_LAYERS, served by daphne with the
Herald layer: a browser-like WebSocket client joins through the consumer's
``group_add``, a ``group_send`` from sync code reaches it through ``chat_message``,
and its disconnect's ``group_discard`` leaves the group."""

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import pytest
import websockets
from asgiref.sync import async_to_sync

from conftest import server_fixture
from herald_channels import HeraldChannelLayer

server = server_fixture("")

PROJECT = '''
# settings.py
SECRET_KEY = "test"
INSTALLED_APPS = ["channels"]
ASGI_APPLICATION = "chat.application"
CHANNEL_LAYERS = {"default": {"BACKEND": "herald_channels.HeraldChannelLayer",
                              "CONFIG": {"url": "%(url)s"}}}
'''

APP = '''
import django
django.setup()

from asgiref.sync import async_to_sync
from channels.generic.websocket import WebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path


class ChatConsumer(WebsocketConsumer):
    def connect(self):
        async_to_sync(self.channel_layer.group_add)("chat_group", self.channel_name)
        self.accept()

    def disconnect(self, close_code):
        async_to_sync(self.channel_layer.group_discard)("chat_group", self.channel_name)

    def chat_message(self, event):
        self.send(text_data=event["message"])


application = ProtocolTypeRouter(
    {"websocket": URLRouter([path("ws/chat/", ChatConsumer.as_asgi())])}
)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def daphne(server):
    project = tempfile.TemporaryDirectory(prefix="herald-daphne-")
    root = pathlib.Path(project.name)
    (root / "settings.py").write_text(PROJECT % {"url": server.url})
    (root / "chat.py").write_text(textwrap.dedent(APP))
    port = free_port()
    daphne_bin = pathlib.Path(sys.executable).with_name("daphne")
    process = subprocess.Popen(
        [str(daphne_bin), "-b", "127.0.0.1", "-p", str(port), "chat:application"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "DJANGO_SETTINGS_MODULE": "settings"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daphne did not start: {process.stderr.read().decode()}")
            time.sleep(0.1)
    yield f"ws://127.0.0.1:{port}/ws/chat/"
    # daphne waits for its open connections after SIGTERM: give it a moment, then kill.
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    project.cleanup()


def members(server) -> list:
    with urllib.request.urlopen(f"{server.url}/v1/groups/chat_group/channels") as response:
        return json.loads(response.read())["channels"]


def test_the_seed_chat_app_runs_on_herald(server, daphne):
    async def chat():
        async with websockets.connect(daphne) as client:
            # connect() ran group_add before accepting.
            assert len(members(server)) == 1
            layer = HeraldChannelLayer(url=server.url)
            await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: async_to_sync(layer.group_send)(
                    "chat_group", {"type": "chat.message", "message": "Hello, world!"}
                ),
            )
            assert await asyncio.wait_for(client.recv(), 10) == "Hello, world!"

    asyncio.run(chat())
    # The consumer's disconnect left the group.
    deadline = time.monotonic() + 10
    while members(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert members(server) == []

"""Django Channels' and channels_redis' own layer test suites, run against Herald.

The test files here are copied unchanged from django/channels 4.3.2
(``tests/test_layers.py``, ``tests/test_inmemorychannel.py``) and
django/channels_redis 4.3.0 (``tests/test_core.py``), both BSD-licensed by the Django
Software Foundation and individual contributors. This file makes the layer classes they
construct (``InMemoryChannelLayer``, ``RedisChannelLayer``) HeraldChannelLayers on one
Herald server configured as the suites expect (capacity 3, 1 for ``tiny`` and ``one``,
and the 3 s expiry that channels_redis' expiry tests give their layer, for
``specific.*``), and flushes it before each test. The tests that look into one
implementation's internals are deselected below, each with its reason.
"""

import sys
import types
import urllib.request

import pytest
from django.conf import settings

import channels.layers
from channels.exceptions import ChannelFull

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from herald_server import SUITE_CONFIG, HeraldServer  # noqa: E402
from herald_channels import HeraldChannelLayer  # noqa: E402

SERVER = HeraldServer(SUITE_CONFIG)


class SuiteLayer(HeraldChannelLayer):
    """The layer a suite constructs: Herald, whatever backend options it passes."""

    def __init__(self, hosts=None, prefix=None, symmetric_encryption_keys=None, **kwargs):
        super().__init__(url=SERVER.url, **kwargs)
        # The server is configured as each suite expects: nothing to compare.
        self._configured = {}

    async def close_pools(self):
        """channels_redis' name for close()."""
        await self.close()


channels.layers.InMemoryChannelLayer = SuiteLayer
redis_core = types.ModuleType("channels_redis.core")
redis_core.RedisChannelLayer = SuiteLayer
redis_core.ChannelFull = ChannelFull
sys.modules.setdefault("channels_redis", types.ModuleType("channels_redis"))
sys.modules["channels_redis.core"] = redis_core

if not settings.configured:
    settings.configure(CHANNEL_LAYERS={})

#: Deselected upstream tests, with why.
NOT_APPLICABLE = {
    # InMemoryChannelLayer internals: its `channels` dict.
    "test_inmemorychannel.py::test_send_receive": "reads InMemoryChannelLayer.channels",
    "test_inmemorychannel.py::test_race_empty": "deletes from InMemoryChannelLayer.channels",
    "test_inmemorychannel.py::test_expiry_single": "per-instance expiry, and .channels",
    "test_inmemorychannel.py::test_expiry_unread": "per-instance expiry, and .channels",
    "test_inmemorychannel.py::test_expiry_multi": "per-instance expiry, and .channels",
    # channels_redis internals: hosts, shards, client prefixes, key formats, its buffer.
    "test_core.py::test_groups_multiple_hosts": "Redis shards",
    "test_core.py::test_groups_multiple_hosts_performance": "Redis shards",
    "test_core.py::test_reject_bad_client_prefix": "RedisChannelLayer.client_prefix",
    "test_core.py::test_random_reset__client_prefix": "RedisChannelLayer.client_prefix",
    "test_core.py::test_random_reset__channel_name": "RedisChannelLayer's random seed",
    "test_core.py::test_default_group_key_format": "Redis key format",
    "test_core.py::test_custom_group_key_format": "Redis key format",
    "test_core.py::test_receive_buffer_respects_capacity": "RedisChannelLayer.receive_buffer",
}


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        key = f"{item.path.name}::{item.originalname}"
        (dropped if key in NOT_APPLICABLE else kept).append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def pytest_collection_finish(session):
    """The suites name their own modules as in their repository (``tests.test_layers``)."""
    package = sys.modules.setdefault("tests", types.ModuleType("tests"))
    package.__path__ = []
    for name, module in list(sys.modules.items()):
        if name.split(".")[-1] in ("test_layers", "test_core", "test_inmemorychannel"):
            sys.modules[f"tests.{name.split('.')[-1]}"] = module


def pytest_unconfigure(config):
    SERVER.stop()


@pytest.fixture(autouse=True)
def flushed():
    """Every test starts on an empty server."""
    urllib.request.urlopen(urllib.request.Request(SERVER.url + "/v1/flush", method="POST"))
    yield

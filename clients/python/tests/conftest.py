"""A real Herald server per test module (see ``herald_server``)."""

import pytest

from herald_server import HeraldServer


def server_fixture(config: str):
    """A module-scoped fixture serving a Herald with ``config``."""

    @pytest.fixture(scope="module")
    def server():
        running = HeraldServer(config)
        yield running
        running.stop()

    return server

import io
from collections.abc import Iterator

import pytest

from tests.harness import UPSTREAM_KEY, ProcessServer, start_process
from tests.redis_server import RedisServer
from zaiproxy.core import logs


@pytest.fixture(autouse=True)
def _quiet_logs():
    """Worker logs go to a buffer the test can read (and not to the terminal)."""
    buf = io.BytesIO()
    logs.configure("info", proc="test", stream=buf)
    yield buf
    logs.get_logger().flush()


@pytest.fixture
def log_buffer(_quiet_logs):
    return _quiet_logs


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """The mock upstream as a real child process, ONE process (its /mock/stats counts every
    request it got), shared by the tests of one module. Modules may define their own."""
    server = start_process(["mock-upstream", "--port", "0", "--api-key", UPSTREAM_KEY],
                           env=None, stderr_path=tmp_path_factory.mktemp("mock") / "mock.log")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that share it use their own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()

import io

import pytest

from zaiproxy import logs


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

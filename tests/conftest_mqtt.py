"""The `mqtt_broker` fixture: a real mosquitto on 127.0.0.1 for each test that requests it.

tests/conftest.py imports this module so that every test file can use the fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import MosquittoBroker, find_mosquitto

MOSQUITTO_MISSING = (
    "mosquitto not found on PATH or in /usr/sbin; "
    "install the Debian package with `apt-get install mosquitto`"
)


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running broker with anonymous access, no persistence and its log in tmp_path.

    The broker object has `host`, `port`, `stop()`, `start()` (same port again),
    `pause()`, `resume()`, `log_text()` and `subscriber(topic)`. Teardown disconnects
    the subscribers and stops the broker even when the test failed.
    """
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MOSQUITTO_MISSING)
    broker = MosquittoBroker(tmp_path / "mosquitto", executable=executable)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()

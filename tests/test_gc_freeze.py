"""Start-up objects frozen out of garbage collection while the server runs, handed back when it stops."""

import gc

from server.gc_freeze import freeze_long_lived, thaw
from tests.api_utils import running_app
from tests.conftest import FIXTURE


def test_full_collections_leave_the_frozen_objects_alone_until_thawed():
    alive = [[index] for index in range(50_000)]  # long-lived, tracked by the collector
    try:
        freeze_long_lived("test")
        gc.collect()
        assert gc.get_freeze_count() >= len(alive)
    finally:
        thaw()
    assert gc.get_freeze_count() == 0


def test_the_server_freezes_once_ready_and_thaws_on_stop(tmp_path):
    with running_app(FIXTURE / "model", tmp_path / "store") as client:
        assert client.get("/ready").status_code == 200
        assert gc.get_freeze_count() > 10_000  # torch's, transformers' and the model's objects, at least
    assert gc.get_freeze_count() == 0

"""Keep Python's full garbage collections off the serving path.

After start-up a server process holds some 400,000 objects that live as long as it does: the modules
of torch and transformers, the model, the engine. A full (generation 2) collection walks them all:
240 ms on the 2-CPU VM of the README's figures. While serving, the objects made per request and per
token set such collections off now and then, and each one stalls the process: an engine step, or
every stream of the HTTP server. `freeze_long_lived` moves every object alive at that moment into
the permanent generation, which collections skip (as vLLM does after start-up); the objects made
later are collected as usual. `thaw` hands them back to the collector (on shutdown, so that a
process that starts and stops servers, as the tests do, can free them).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_long_lived(process: str) -> None:
    """Collect once, then freeze what is left; `process` names this process in the log line."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    fields = {"process": process, "objects": gc.get_freeze_count(), "seconds": round(time.perf_counter() - started, 3)}
    log.info("start-up objects frozen out of garbage collection", extra={"fields": fields})


def thaw() -> None:
    gc.unfreeze()

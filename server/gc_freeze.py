"""Keep Python's full garbage collections off the serving path.

After start-up a server process holds some 400,000 objects that live as long as it does: the modules
of torch and transformers, the model, the engine. A full (generation 2) collection walks them all:
240 ms on the 2-CPU VM of the README's figures. While serving, the objects made per request and per
token set such collections off now and then, and each one stalls the process: an engine step, or
every stream of the HTTP server. `freeze_long_lived` moves every object alive at that moment into
the permanent generation, which collections skip (as vLLM does after start-up); the objects made
later are collected as usual. `thaw` hands them back to the collector (on shutdown, so that a
process that starts and stops servers, as the tests do, can free them).

A process that ends after serving has no use for the interpreter's teardown either: it collects those
objects once more (1.2 s on that VM, every stop of a server or a rolling restart's pod), and where they
are still frozen it leaves Triton's bindings alive, which then print nanobind's leak warnings to stderr.
`exit_without_teardown` runs the exit handlers and leaves the memory to the operating system.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import time
from typing import NoReturn

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


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with `code` once the process's own shutdown is done: the atexit handlers run (logging's flush,
    multiprocessing's and the compile workers' clean-up, temporary files), the standard streams are flushed,
    and the interpreter's teardown is skipped."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)

"""The serving engine: continuous batching over a paged KV cache, with no knowledge of ReFT beyond
its seam.

`async_engine.py` is the front end the HTTP layer uses (submit, stream, cancel; detokenizing and
stop strings on the event loop); `core.py` steps in its own thread: `Scheduler` picks the chunks,
`ModelRunner` runs the model once over them (decode-only steps on a GPU as a CUDA graph replay,
`cuda_graphs.py`), `Sampler` draws the tokens on the device (with async scheduling the host reads
them one step later, `transfers.py` keeps every copy from waiting for the device). A request's ReFT edit
(`server.reft.request_edit.RequestEdit`) rides on its `Sequence` unopened: the runner asks it which
rows a chunk edits and hands them to ReFT's step plan, the prefix cache asks it for its identity.
"""

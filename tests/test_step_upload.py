"""A step's integer inputs reach the device in one copy (transfers.py's StepUpload): staged values land
where the handed-out tensors point, a step that outgrows the buffers keeps what it staged before, and a
whole engine, on every path (sdpa, paged with decode graphs, async scheduling, adapters, chunked
prefill), sends each step's inputs in exactly one copy."""

import numpy as np
import pytest
import torch

from server.engine.transfers import StepUpload
from tests.engine_utils import load_engine_model
from tests.test_async_scheduling import PATHS, requests, serve

CPU = torch.device("cpu")


def test_staged_values_land_after_one_copy():
    upload = StepUpload(CPU, capacity=64)
    tokens = upload.stage([5, 6, 7])
    tables = upload.stage([[1, 2], [3, 4]])
    pairs = upload.stage(np.array([(0, 9)]))
    host, reserved = upload.reserve((2, 3))
    host[...] = [[1, 1, 1], [2, 2, 2]]
    empty = upload.stage([])
    assert upload.copies == 0
    upload.send()
    assert upload.copies == 1
    assert tokens.tolist() == [5, 6, 7] and tables.tolist() == [[1, 2], [3, 4]] and pairs.tolist() == [[0, 9]]
    assert reserved.tolist() == [[1, 1, 1], [2, 2, 2]] and empty.shape == (0,)
    assert {t.dtype for t in (tokens, tables, pairs, reserved)} == {torch.long}


def test_every_staged_tensor_starts_on_a_16_byte_boundary():
    """Triton specializes a kernel on each pointer's alignment: staged metadata must always be aligned, or
    serving compiles variants as steps run (and runs ones the ahead-of-time compile tests never saw)."""
    upload = StepUpload(CPU, capacity=8)
    staged = [upload.stage(list(range(n))) for n in (3, 1, 2, 5, 7, 1, 16)]  # odd sizes, and growth
    upload.send()
    assert all(t.data_ptr() % 16 == 0 for t in staged)
    assert [t.tolist() for t in staged] == [list(range(n)) for n in (3, 1, 2, 5, 7, 1, 16)]


def test_nothing_is_there_before_the_send():
    upload = StepUpload(CPU)
    staged = upload.stage([3, 1, 4])
    assert staged.tolist() == [-1, -1, -1]  # off CUDA the buffer starts as -1s: an early read shows
    upload.send()
    assert staged.tolist() == [3, 1, 4]


def test_a_step_that_outgrows_the_buffers_keeps_what_it_staged():
    upload = StepUpload(CPU, capacity=4)
    first = upload.stage([1, 2, 3])
    second = upload.stage(list(range(10)))  # does not fit: what is staged goes now, the rest in larger buffers
    third = upload.stage([7])
    upload.send()
    assert (first.tolist(), second.tolist(), third.tolist()) == ([1, 2, 3], list(range(10)), [7])
    assert upload.copies == 2
    again = [upload.stage([1, 2, 3]), upload.stage(list(range(10))), upload.stage([7])]
    upload.send()
    assert upload.copies == 3, "the larger buffers are kept: the next step of that size is one copy"
    assert [t.tolist() for t in again] == [first.tolist(), second.tolist(), third.tolist()]


def test_a_later_step_leaves_an_earlier_steps_tensors_alone():
    """Each step gets buffers of its own: the device may still read the last step's while the host stages
    the next (async scheduling)."""
    upload = StepUpload(CPU)
    earlier = upload.stage([1, 2, 3])
    upload.send()
    upload.stage([9, 9, 9])
    upload.send()
    assert earlier.tolist() == [1, 2, 3]


def test_buffers_that_fail_to_open_leave_the_upload_as_it_was(monkeypatch):
    """Out of device memory while opening buffers: what was staged still lands, never a buffer nobody
    wrote (the runner sends in a `finally`, then clears the blocks it staged), and a later step opens
    buffers again."""
    full = torch.full

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    upload = StepUpload(CPU, capacity=4)
    blocks = upload.stage([3, 7])
    monkeypatch.setattr(torch, "full", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        upload.stage(list(range(10)))  # grows
    upload.send()
    assert blocks.tolist() == [3, 7]
    with pytest.raises(torch.OutOfMemoryError):
        upload.stage([1])  # the first stage after a send opens buffers
    monkeypatch.setattr(torch, "full", full)
    later = upload.stage([5])
    upload.send()
    assert later.tolist() == [5]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("path", PATHS)
def test_every_engine_step_sends_its_inputs_in_one_copy(tiny_model_dir, path, async_scheduling):
    model = load_engine_model(tiny_model_dir("llama"))
    runners, steps = [], []  # per forward: (copies it made, whether it edited)

    def count_copies(core):
        runner = core.runner
        runner.upload = StepUpload(runner.device, capacity=1 << 16)  # large enough never to grow
        runners.append(runner)
        forward = runner.forward

        def counted(batch, pending=None):
            copies = runner.upload.copies
            result = forward(batch, pending)
            steps.append((runner.upload.copies - copies, bool(batch.edits)))
            return result

        runner.forward = counted

    _, took_pending = serve(model, requests(model, count=20), async_scheduling, prepare=count_copies, **PATHS[path])
    assert {copies for copies, _ in steps} == {1}
    assert any(edited for _, edited in steps), "steps with adapter edits must be among them"
    assert (took_pending > 0) == async_scheduling, "with async scheduling, steps that place pending tokens too"
    if path == "graphs":
        assert runners[0].graphs.steps_run > 0, "decode steps replayed from the graphs' buffers too"

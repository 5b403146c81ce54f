"""The batched plan edits every row as that row's own intervention does, alone.

Rows land in matmuls of other shapes than alone, so the last bit may differ (as it may for any GEMM
of another size); a wrong intervention or a missed row differs by O(1). Token-exactness of whole
generations is the engine tests' job."""

import dataclasses

import pytest
import torch

from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.reft.plan import build_plan
from server.reft.request_edit import request_edit

D = 32


def adapter(name, kind, layers, rank, positions, share=True, act="linear", seed=0, dtype=torch.float32):
    file = random_adapter_file(kind, layers, rank, positions, D, share_weights=share, seed=seed)
    if act != "linear":
        file.config = dataclasses.replace(file.config, activation=act)
    return materialize(file, name=name, dtype=dtype)


def chunks_for(requests):
    """(adapter, prompt length, chunk start, chunk length) -> the edited rows of chunks packed one
    after another (chunks that edit nothing have none), and the number of rows."""
    chunks, row = [], 0
    for i, (a, prompt_len, start, length) in enumerate(requests):
        edit = request_edit(a, prompt_len)
        if edit is not None and (edited := edit.rows(f"r{i}", row, start, length)) is not None:
            chunks.append(edited)
        row += length
    return chunks, row


def edited_alone(hidden, chunks, layer):
    """What each chunk's own interventions do to its rows, one intervention at a time."""
    out = hidden.clone()
    for chunk in chunks:
        if layer not in chunk.adapter.layers:
            continue
        for index, rows in enumerate(chunk.rows):
            if rows:
                index_tensor = torch.tensor(rows)
                out[index_tensor] = chunk.adapter.layers[layer][index](out[index_tensor])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_edits_equal_each_intervention_alone(dtype):
    many = adapter("many", "loreft", (0, 1), 4, "f3+l3", dtype=dtype)
    adapters = [
        many,
        adapter("unshared", "loreft", (1, 2), 4, "f2+l2", share=False, seed=1, dtype=dtype),
        adapter("rank8", "loreft", (0, 1), 8, "l2", seed=2, dtype=dtype),
        adapter("relu", "loreft", (1,), 4, "f3+l3", act="relu", seed=3, dtype=dtype),
        adapter("noreft", "noreft", (1,), 4, "f1+l1", seed=4, dtype=dtype),
        adapter("direft", "direft", (0, 1), 2, "f2", share=False, seed=5, dtype=dtype),
        adapter("consreft", "consreft", (1,), 4, "l3", seed=6, dtype=dtype),
        adapter("lobireft", "lobireft", (1, 2), 4, "f1+l1", seed=7, dtype=dtype),
        adapter("nodireft", "nodireft", (2,), 4, "0,2,-1", seed=8, dtype=dtype),
        *(adapter(f"same{i}", "loreft", (0, 1), 4, "f3+l3", seed=10 + i, dtype=dtype) for i in range(6)),
    ]
    requests = [(many, 20, 0, 20) for _ in range(9)]  # one adapter far more frequent: its pairs span segments
    requests += [(a, 14, 0, 14) for a in adapters[1:]]
    requests += [(None, 9, 0, 9), (many, 40, 16, 24), (adapters[1], 30, 0, 12)]  # base, later and first chunks
    chunks, rows = chunks_for(requests)
    plan = build_plan(chunks, "cpu")
    hidden = torch.randn(rows, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    for layer in (0, 1, 2):
        expected = edited_alone(hidden, chunks, layer)
        plan.apply(layer, hidden)
        torch.testing.assert_close(hidden, expected, msg=f"layer {layer}")
    assert not plan.failures
    # layer 0: seven rank-4 LoReFTs in one batch, the rank-8 one, DiReFT's #0 and #1: not one per adapter;
    # DiReFT's one-sided spec without shared weights edits its rows with #0, then #1: two batches in order
    assert len(plan.layers[0]) == 4


def test_unshared_interventions_batch_together_unless_a_row_gets_both():
    """Two-sided specs without shared weights: #0 (first positions) and #1 (last) edit apart, so they run as
    one batch. A one-sided spec without shared weights (as a pyreft checkpoint may be) edits its rows with #0,
    then #1: a step with such a request runs every #0 first."""
    adapters = [adapter(f"u{i}", "loreft", (0,), 4, "f3+l3", share=False, seed=i) for i in range(3)]
    one_sided = adapter("o", "loreft", (0,), 4, "f3", share=False, seed=9)
    for extra, batches in (([], 1), ([(one_sided, 8, 0, 8)], 2)):
        requests = [(a, 12, 0, 12) for a in adapters] + extra
        chunks, rows = chunks_for(requests)
        plan = build_plan(chunks, "cpu")
        hidden = torch.randn(rows, D, generator=torch.Generator().manual_seed(0))
        expected = edited_alone(hidden, chunks, 0)
        plan.apply(0, hidden)
        torch.testing.assert_close(hidden, expected)
        assert len(plan.layers[0]) == batches


def test_a_failing_intervention_fails_only_its_owners():
    good = adapter("good", "loreft", (0,), 4, "f2+l2")
    broken = adapter("broken", "loreft", (0,), 4, "f2+l2", seed=1)
    wrong = dict(broken.layers[0][0].params, rotation=torch.zeros(D + 1, 4))
    broken.layers[0][0] = type(broken.layers[0][0])(broken.layers[0][0].kind, broken.layers[0][0].act, wrong)
    chunks, rows = chunks_for([(good, 10, 0, 10), (broken, 10, 0, 10), (good, 12, 0, 12)])
    plan = build_plan(chunks, "cpu")
    hidden = torch.randn(rows, D)
    expected = edited_alone(hidden, [chunks[0], chunks[2]], 0)
    plan.apply(0, hidden)
    assert set(plan.failures) == {"r1"}
    torch.testing.assert_close(hidden[:10], expected[:10])
    torch.testing.assert_close(hidden[20:], expected[20:])


def test_non_finite_rows_are_reported_against_their_owner_only():
    a = adapter("a", "loreft", (0,), 4, "f2+l2")
    chunks, rows = chunks_for([(a, 10, 0, 10), (a, 10, 0, 10)])
    plan = build_plan(chunks, "cpu")
    hidden = torch.randn(rows, D)
    hidden[13, 5] = float("inf")
    plan.check_finite(hidden)
    assert list(plan.non_finite_owners(plan.finite_rows.tolist())) == ["r1"]


def test_a_fused_form_gets_each_row_with_its_own_parameters(monkeypatch):
    """A type's fused form (LoReFT's kernel on CUDA) receives the batch's rows, where each sits in the segments,
    and what makes the parameters stacked [layers, S, ...], with this layer's position: here a Python twin of the kernel
    that edits row by row through those arguments gives each intervention's own edit; with fused=False the
    formula edits and the fused form is never called."""
    from server.reft import interventions

    calls = []

    def row_by_row(hidden, rows, positions, length, stacked, layer_index, act):
        calls.append(layer_index)
        for row, position in zip(rows.tolist(), positions.tolist(), strict=True):
            own = {name: tensor[layer_index, position // length] for name, tensor in stacked().items()}
            own["bias"] = own["bias"][0]  # [1, r] in the stack
            hidden[row] = interventions.loreft(hidden[row : row + 1], own, act)[0]
        return True

    loreft = dataclasses.replace(interventions.intervention_type("loreft"), fused=row_by_row)
    adapters = [adapter(f"a{i}", "loreft", (0, 2), 4, "f3+l3", share=False, seed=i) for i in range(5)]
    for a in adapters:
        for layer in a.layers.values():
            layer[:] = [dataclasses.replace(iv, kind=loreft) for iv in layer]
    chunks, rows = chunks_for([(a, 9 + 4 * i, 0, 9 + 4 * i) for i, a in enumerate(adapters + adapters[:1])])
    for fused in (True, False):
        calls.clear()
        plan = build_plan(chunks, "cpu", fused=fused)
        hidden = torch.randn(rows, D, generator=torch.Generator().manual_seed(0))
        for layer in (0, 1, 2):
            expected = edited_alone(hidden, chunks, layer)
            plan.apply(layer, hidden)
            torch.testing.assert_close(hidden, expected, msg=f"layer {layer}")
        # no row is edited twice: #0 and #1 in one batch, at layer 0, then at layer 2 (stack position 1)
        assert calls == ([0, 1] if fused else [])

"""Importing pyreft checkpoints: both key styles, trainer checkpoints, and bad checkpoints."""

import json
import pickle
import shutil

import pytest
import torch

from server.adapters.errors import AdapterError
from server.adapters.model_shape import ModelShape
from server.adapters.pyreft import import_pyreft, orthogonal_from_parametrization
from tests.conftest import FIXTURE

MODEL = ModelShape(num_layers=6, hidden_size=192)


def copy_fixture(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(FIXTURE / "adapters" / name, target)
    return target


def test_householder_reconstruction_matches_torch_parametrization():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 24, bias=False)  # weight 24 x 4: tall, like pyreft's rotation (d x r)
    layer = torch.nn.utils.parametrizations.orthogonal(layer)
    original = layer.parametrizations.weight.original
    with torch.no_grad():  # move the reflectors away from the initial point, as training does
        original.add_(0.3 * torch.randn(24, 4).tril(diagonal=-1))
    state = layer.state_dict()
    got = orthogonal_from_parametrization(
        state["parametrizations.weight.original"], state["parametrizations.weight.0.base"]
    )
    torch.testing.assert_close(got, layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.T @ got, torch.eye(4), rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # weight decay shrinks the diagonal below 1: torch's .int() zeroes that column
        original[1, 1] = 0.9
    state = layer.state_dict()
    got = orthogonal_from_parametrization(
        state["parametrizations.weight.original"], state["parametrizations.weight.0.base"]
    )
    torch.testing.assert_close(got, layer.weight, rtol=1e-5, atol=1e-6)
    assert got[:, 1].abs().max() == 0


@pytest.mark.parametrize("name, kind", [("lo_all_f2l2", "loreft"), ("di_l13_f1l2_unshared", "direft")])
def test_trainer_checkpoint_without_config_json(tmp_path, name, kind):
    with_config = import_pyreft(FIXTURE / "adapters" / name, positions="f2+l2", share_weights="unshared" not in name)
    directory = copy_fixture(name, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(AdapterError, match="needs the intervention type"):
        import_pyreft(directory, positions="f2+l2", share_weights="unshared" not in name)
    without = import_pyreft(
        directory,
        positions="f2+l2",
        share_weights="unshared" not in name,
        intervention_type=kind,
        layers=list(with_config.config.layers),
        rank=with_config.config.rank,
        model=MODEL,
    )
    assert without.config == with_config.config
    assert all(torch.equal(without.tensors[k], with_config.tensors[k]) for k in with_config.tensors)


def test_dotted_key_style_of_older_pyvene(tmp_path):
    directory = copy_fixture("lo_l14_f3l3_unshared", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    dotted = [key.replace("_", ".").replace("block.output", "block_output") for key in config["sorted_keys"]]
    for old, new in zip(config["sorted_keys"], dotted, strict=True):
        (directory / f"intkey_{old}.bin").rename(directory / f"intkey_{new}.bin")
    config["sorted_keys"] = dotted
    (directory / "config.json").write_text(json.dumps(config))
    adapter = import_pyreft(directory, positions="f3+l3", share_weights=False, model=MODEL)
    assert adapter.config.layers == (1, 4)
    reference = import_pyreft(FIXTURE / "adapters" / "lo_l14_f3l3_unshared", positions="f3+l3", share_weights=False)
    assert all(torch.equal(adapter.tensors[k], reference.tensors[k]) for k in reference.tensors)


def test_missing_intervention_file(tmp_path):
    directory = copy_fixture("lo_l14_f3l3_unshared", tmp_path)
    next(directory.glob("intkey_layer_4*#1.bin")).unlink()
    with pytest.raises(AdapterError, match=r"names intkey_layer_4.*#1\.bin, which is missing"):
        import_pyreft(directory, positions="f3+l3", share_weights=False)


def test_not_a_directory_or_empty(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        import_pyreft(tmp_path / "nope", positions="f1", share_weights=True)
    with pytest.raises(AdapterError, match="no intkey"):
        import_pyreft(tmp_path, positions="f1", share_weights=True)


def test_wrong_hidden_size_for_the_model():
    with pytest.raises(AdapterError, match="the model has 256") as info:
        import_pyreft(
            FIXTURE / "adapters" / "lo_l2_f1l1", positions="f1+l1", share_weights=True, model=ModelShape(6, 256)
        )
    assert info.value.field == "hidden_size"


def test_wrong_tensor_shapes(tmp_path):
    directory = copy_fixture("lo_l2_f1l1", tmp_path)
    path = next(directory.glob("intkey_*.bin"))
    state = torch.load(path, weights_only=True)
    state["weight"] = torch.randn(3, 192)
    torch.save(state, path)
    with pytest.raises(AdapterError, match=r"shape \[3, 192\] does not match \[4, 192\]"):
        import_pyreft(directory, positions="f1+l1", share_weights=True, model=MODEL)


def test_nan_weights(tmp_path):
    directory = copy_fixture("no_l2_f2l2", tmp_path)
    path = next(directory.glob("intkey_*.bin"))
    state = torch.load(path, weights_only=True)
    state["learned_source.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        import_pyreft(directory, positions="f2+l2", share_weights=True)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    directory = copy_fixture("lo_l2_f1l1", tmp_path)
    _Exploit.marker = tmp_path / "pwned"
    path = next(directory.glob("intkey_*.bin"))
    path.write_bytes(pickle.dumps({"weight": _Exploit()}))
    with pytest.raises(AdapterError, match="cannot be read safely"):
        import_pyreft(directory, positions="f1+l1", share_weights=True)
    assert not _Exploit.marker.exists()


def test_garbage_file(tmp_path):
    directory = copy_fixture("lo_l2_f1l1", tmp_path)
    next(directory.glob("intkey_*.bin")).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="cannot be read safely"):
        import_pyreft(directory, positions="f1+l1", share_weights=True)


def test_share_weights_must_match_the_checkpoint():
    with pytest.raises(AdapterError, match="share_weights=True needs 1") as info:
        import_pyreft(FIXTURE / "adapters" / "lo_l14_f3l3_unshared", positions="f3+l3", share_weights=True)
    assert info.value.field == "share_weights"


def test_unsupported_component(tmp_path):
    directory = copy_fixture("lo_l2_f1l1", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    old = config["sorted_keys"][0]
    new = old.replace("block_output", "mlp_output")
    (directory / f"intkey_{old}.bin").rename(directory / f"intkey_{new}.bin")
    config["sorted_keys"] = [new]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="only 'block_output'"):
        import_pyreft(directory, positions="f1+l1", share_weights=True)


def test_broken_config_json(tmp_path):
    directory = copy_fixture("lo_l2_f1l1", tmp_path)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not a pyvene IntervenableConfig"):
        import_pyreft(directory, positions="f1+l1", share_weights=True)


def test_mismatched_explicit_arguments():
    with pytest.raises(AdapterError, match="not noreft"):
        import_pyreft(
            FIXTURE / "adapters" / "lo_l2_f1l1", positions="f1", share_weights=True, intervention_type="noreft"
        )
    with pytest.raises(AdapterError, match=r"layers \[2\], not \[3\]"):
        import_pyreft(FIXTURE / "adapters" / "lo_l2_f1l1", positions="f1", share_weights=True, layers=[3])
    with pytest.raises(AdapterError, match="rank 4, not 8"):
        import_pyreft(FIXTURE / "adapters" / "lo_l2_f1l1", positions="f1", share_weights=True, rank=8)


def test_a_stride_0_view_is_refused_before_it_unpacks(tmp_path):
    """A few stored bytes viewed as 4 x 2^36 floats: materialising it would take 1 TiB."""
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    state = {
        "rotate_layer": torch.linalg.qr(torch.randn(192, 4))[0],
        "learned_source.weight": torch.zeros(1).expand(4, 2**36),
        "learned_source.bias": torch.zeros(4),
    }
    torch.save(state, tmp_path / f"intkey_{key}.bin")
    with pytest.raises(AdapterError, match="a view of more elements than the file stores"):
        import_pyreft(
            tmp_path, positions="f1+l1", share_weights=True, intervention_type="loreft", model=ModelShape(6, 192)
        )

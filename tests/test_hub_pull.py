"""Adapters pulled from the Hugging Face Hub, offline: each test lays out a Hub cache itself (the
layout huggingface_hub reads: models--owner--name/refs/<branch> -> commit, snapshots/<commit>/files)
and turns huggingface_hub's offline mode on, so snapshot_download resolves revisions from it. The
admin API's status says why a fetch failed: missing, gated, a refused id, or the Hub unreachable.
Where the Hub is online, its listing (model_info) and snapshot_download are stand-ins that record
what they were asked."""

import hashlib
import json
import socket

import huggingface_hub.constants
import huggingface_hub.errors
import pytest
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import ModelInfo

from server.adapters.random_adapters import random_adapter_file
from server.adapters.stores import open_store
from server.cli import main
from tests.api_utils import ADMIN, running_app
from tests.conftest import FIXTURE

PYREFT_CHECKPOINT = FIXTURE / "adapters" / "lo_l2_f1l1"  # shared weights, positions f1+l1, hidden 192
HIDDEN = 192  # the fixture model's hidden size
GiB = 2**30
OFFLINE_HUB = {  # the real ones, which the hub fixture's offline mode keeps off the network
    (huggingface_hub.HfApi, "model_info"): huggingface_hub.HfApi.model_info,
    (huggingface_hub, "snapshot_download"): huggingface_hub.snapshot_download,
}
A_MODEL = {"config.json": 700, "model-00001-of-00002.safetensors": 5 * GiB, "model-00002-of-00002.safetensors": GiB}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """hub(repo_id, {file name: bytes}, branch) -> the commit the branch now points to."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in files.items():
            (snapshot / name).write_bytes(data)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        return commit

    return publish


@pytest.fixture
def hub_online(monkeypatch):
    """hub_online(repo_id, {file name: size, None for unknown}, commit) -> the downloads asked for: the Hub
    lists those files at that commit, and a download answers the commit's snapshot in the local cache."""
    downloads = []

    def listed(repo_id: str, sizes: dict[str, int | None], commit: str = "0" * 40) -> list[dict]:
        def model_info(self, asked_id, *, revision=None, files_metadata=False, **kwargs):
            assert asked_id == repo_id and files_metadata, "asked for the files' sizes"
            return ModelInfo(id=repo_id, sha=commit, siblings=[{"rfilename": n, "size": s} for n, s in sizes.items()])

        def snapshot_download(asked_id, **kwargs):
            downloads.append(kwargs)
            cache = huggingface_hub.constants.HF_HUB_CACHE
            return f"{cache}/{repo_folder_name(repo_id=asked_id, repo_type='model')}/snapshots/{kwargs['revision']}"

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return downloads

    return listed


def pyreft_files() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in PYREFT_CHECKPOINT.iterdir() if path.is_file()}


def pull(*args: str) -> int:
    return main(["adapters", "pull", *args])


def test_cli_pulls_a_pyreft_checkpoint_and_records_repo_and_commit(hub, store_location, capsys):
    commit = hub("someone/lo-reft", pyreft_files())
    pyreft_args = ("--positions", "f1+l1", "--share-weights")
    assert pull("someone/lo-reft", "--name", "lo", *pyreft_args, "--store", store_location) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["positions"] == "f1+l1"
    config = open_store(store_location).read_config("lo", 1)
    assert config.provenance["hub"] == {"repo_id": "someone/lo-reft", "revision": "main", "commit": commit}


def test_cli_pulls_a_safetensors_adapter_at_a_branch_or_commit(hub, tmp_path, capsys):
    adapter = random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=4)
    old = hub("someone/ours", {"adapter.safetensors": adapter.to_bytes()}, branch="v1")
    store = str(tmp_path / "store")
    assert pull("someone/ours@v1", "--name", "ours", "--store", store) == 0
    assert pull(f"someone/ours@{old}", "--name", "ours", "--store", store) == 0
    stored = open_store(store)
    assert stored.versions("ours") == [1, 2] and stored.read("ours", 1)[1] != b""
    assert stored.read_config("ours", 2).provenance["hub"]["revision"] == old


@pytest.mark.parametrize(
    "args, message",
    [
        (["nobody/missing"], "cannot fetch nobody/missing"),
        (["someone/lo-reft"], "give the positions"),
        (["bad repo id"], "invalid Hub reference"),
        (["someone/lo-reft@"], "invalid Hub reference"),
        (["someone/lo-reft@../../x"], "invalid Hub reference"),
    ],
)
def test_cli_pull_errors_are_clear(hub, tmp_path, capsys, args, message):
    hub("someone/lo-reft", pyreft_files())
    assert pull(*args, "--name", "x", "--store", str(tmp_path / "store")) == 2
    assert message in capsys.readouterr().err


def test_admin_api_pulls_from_the_hub(hub, tmp_path):
    commit = hub("someone/lo-reft", pyreft_files())
    form = {"repo": "someone/lo-reft@main", "positions": "f1+l1", "share_weights": "true"}
    with running_app(FIXTURE / "model", tmp_path / "store") as client:
        created = client.post("/v1/adapters/lo/hub", data=form, headers=ADMIN)
        assert created.status_code == 201, created.text
        shown = client.get("/v1/adapters/lo", headers=ADMIN).json()
        assert shown["details"][0]["provenance"]["hub"]["commit"] == commit
        missing = client.post("/v1/adapters/lo/hub", data={**form, "repo": "nobody/missing"}, headers=ADMIN)
        assert missing.status_code == 404 and "cannot fetch" in missing.json()["error"]["message"]
        invalid = client.post("/v1/adapters/lo/hub", data={**form, "repo": "a b"}, headers=ADMIN)
        assert invalid.status_code == 400
        unpositioned = client.post("/v1/adapters/lo/hub", data={"repo": "someone/lo-reft"}, headers=ADMIN)
        assert unpositioned.status_code == 422 and "positions" in unpositioned.json()["error"]["message"]


def test_admin_api_hub_pulls_obey_the_adapter_magnitude_bound(hub, tmp_path):
    huge = random_adapter_file("loreft", (1,), 2, "f1+l1", HIDDEN, seed=5)
    huge.tensors["layers.1.0.weight"].fill_(100.0)  # within the default bound, beyond the operator's
    hub("someone/huge", {"adapter.safetensors": huge.to_bytes()})
    with running_app(FIXTURE / "model", tmp_path / "store", adapter_max_abs=10) as client:
        refused = client.post("/v1/adapters/huge/hub", data={"repo": "someone/huge"}, headers=ADMIN)
    assert refused.status_code == 422 and "adapter_max_abs" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    "limit_args, limit_env, limit",
    [([], None, "256.0MiB"), (["--max-upload-size", "1GiB"], None, "1.0GiB"), ([], "2GiB", "2.0GiB")],
)
def test_cli_refuses_a_pull_over_the_upload_limit_before_downloading(
    hub, hub_online, tmp_path, monkeypatch, capsys, limit_args, limit_env, limit
):
    """A repo id naming a model, not an adapter: refused from the Hub's listing, not downloaded whole."""
    if limit_env is not None:
        monkeypatch.setenv("REFT_MAX_UPLOAD_SIZE", limit_env)
    downloads = hub_online("someone/llama", A_MODEL)
    assert pull("someone/llama", "--name", "x", "--store", str(tmp_path / "store"), *limit_args) == 2
    err = capsys.readouterr().err
    assert f"the files a pull fetches come to 6.0GiB, over the adapter size limit of {limit}" in err
    assert downloads == []


def test_admin_api_refuses_a_pull_over_the_upload_limit_before_downloading(hub, hub_online, tmp_path):
    downloads = hub_online("someone/big", {"adapter.safetensors": 2 * 2**20})
    with running_app(FIXTURE / "model", tmp_path / "store", max_upload_size="1MiB") as client:
        refused = client.post("/v1/adapters/big/hub", data={"repo": "someone/big"}, headers=ADMIN)
    assert refused.status_code == 413 and "size limit of 1.0MiB" in refused.json()["error"]["message"]
    assert downloads == []


def test_a_pull_within_the_limit_downloads_the_commit_it_checked(hub, hub_online, tmp_path, monkeypatch):
    """Only the files a pull fetches count; the download asks for the commit whose sizes were checked, so a
    push to the branch meanwhile cannot slip other files in, and an offline pull by branch finds it after."""
    data = random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=4).to_bytes()
    commit = hub("someone/ours", {"adapter.safetensors": data}, branch="elsewhere")
    downloads = hub_online("someone/ours", {"adapter.safetensors": len(data), "pytorch_model.bin": 5 * GiB}, commit)
    store = str(tmp_path / "store")
    assert pull("someone/ours", "--name", "ours", "--store", store, "--max-upload-size", str(len(data))) == 0
    assert [download["revision"] for download in downloads] == [commit]
    assert open_store(store).read_config("ours", 1).provenance["hub"]["commit"] == commit
    for (module, attribute), real in OFFLINE_HUB.items():
        monkeypatch.setattr(module, attribute, real)
    assert pull("someone/ours", "--name", "ours", "--store", store) == 0
    assert open_store(store).read_config("ours", 2).provenance["hub"]["commit"] == commit


def test_a_file_the_hub_gives_no_size_for_is_not_fetched(hub, hub_online, tmp_path, capsys):
    """Nothing would bound its download: refused rather than fetched and measured afterwards."""
    downloads = hub_online("someone/odd", {"adapter.safetensors": None, "config.json": 10})
    assert pull("someone/odd", "--name", "x", "--store", str(tmp_path / "store")) == 2
    assert "does not say how big adapter.safetensors is" in capsys.readouterr().err and downloads == []


def test_offline_the_cached_files_are_held_to_the_limit(hub, tmp_path, capsys):
    """The Hub cannot be asked: the cache's files are measured instead, and a pull within the limit works."""
    data = random_adapter_file("loreft", (1,), 2, "f1+l1", 16, seed=4).to_bytes()
    hub("someone/ours", {"adapter.safetensors": data, "README.md": b"x" * len(data)})
    store = str(tmp_path / "store")
    assert pull("someone/ours", "--name", "ours", "--store", store, "--max-upload-size", str(len(data) - 1)) == 2
    assert "over the adapter size limit" in capsys.readouterr().err
    assert pull("someone/ours", "--name", "ours", "--store", store, "--max-upload-size", str(len(data))) == 0


def test_an_unreachable_hub_pulls_from_the_cache(hub, tmp_path, monkeypatch):
    """Online but unreachable, a pull falls back to the cache as huggingface_hub itself does."""
    commit = hub("someone/lo-reft", pyreft_files())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as unreachable:
        unreachable.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{unreachable.getsockname()[1]}")
        store = str(tmp_path / "store")
        assert pull("someone/lo-reft", "--name", "lo", "--positions", "f1+l1", "--share-weights", "--store", store) == 0
    assert open_store(store).read_config("lo", 1).provenance["hub"]["commit"] == commit


def hub_http_error(kind, status: int):
    import httpx

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/o/n"))
    return kind(f"{status} from the Hub", response=response)


@pytest.mark.parametrize(
    "raised, status",
    [
        (lambda: hub_http_error(huggingface_hub.errors.RepositoryNotFoundError, 404), 404),
        (lambda: hub_http_error(huggingface_hub.errors.RevisionNotFoundError, 404), 404),
        (lambda: hub_http_error(huggingface_hub.errors.GatedRepoError, 403), 403),
        (lambda: hub_http_error(huggingface_hub.errors.HfHubHTTPError, 503), 502),
        (lambda: huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached"), 404),
        (lambda: ConnectionError("network unreachable"), 502),
        (lambda: ValueError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"), 400),
    ],
)
def test_admin_api_says_why_a_hub_fetch_failed(tmp_path, monkeypatch, raised, status):
    def fail(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)  # whichever a pull asks first
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with running_app(FIXTURE / "model", tmp_path / "store") as client:
        answer = client.post("/v1/adapters/lo/hub", data={"repo": "owner/name", "positions": "f1+l1"}, headers=ADMIN)
    assert answer.status_code == status and "cannot fetch owner/name" in answer.json()["error"]["message"]

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from server.models.loader import load_causal_lm
from server.models.tiny import build_tiny_model

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(min(torch.get_num_threads(), 2))

FIXTURE = Path(__file__).parent / "fixtures" / "pyreft_reference"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(family) -> directory of a random-init model of that family, built once."""
    built = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get


def load_reference_model(path):
    """A plain transformers model (sdpa attention) for the reference generator."""
    return load_causal_lm(path, torch.float32, attention="sdpa")


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(engine model, reference model) of the tiny Llama."""
    directory = tiny_model_dir("llama")
    return load_causal_lm(directory, torch.float32), load_reference_model(directory)


@pytest.fixture(scope="session")
def pyreft_fixture():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model = load_reference_model(FIXTURE / "model")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "model")
    return model, tokenizer, expected


# Building it (conversion, ~20 s on 2 cores, and four adapters trained where the shipped ones do not fit:
# minutes) may take long: the first test that asks for it gets this much time instead of pytest's default.
SMOLLM2_DEMO_TIMEOUT = 1500


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory):
    """The SmolLM2 demo built once per session, as `reft-server serve` builds it at first start:
    (PreparedDemo with the results of what it trained, demo directory, store directory)."""
    from server.demo import prepare_demo

    root = tmp_path_factory.mktemp("smollm2_demo")
    demo_dir, store_dir = root / "demo", root / "store"
    return prepare_demo("smollm2", demo_dir, store_dir, log=lambda _: None), demo_dir, store_dir


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server for the session; credentials and endpoint in the environment, so
    that stores opened here and in child processes find it."""
    from tests.s3_server import S3Server

    server = S3Server()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        yield server
    server.stop()


@pytest.fixture(params=["directory", "s3"])
def store_location(request, tmp_path):
    """A fresh, empty store location of each backend: a directory, then an s3:// prefix."""
    if request.param == "directory":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").fresh_url()

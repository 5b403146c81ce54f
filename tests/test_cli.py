"""The command line: adapter store management and the serve flags."""

import json

import pytest

from server.cli import build_parser, main, settings_from_args
from server.config import Settings
from tests.conftest import FIXTURE


def test_adapters_import_list_show_set_current_delete(tmp_path, capsys):
    store = str(tmp_path / "store")
    checkpoint = str(FIXTURE / "adapters" / "lo_l14_f3l3_unshared")
    args = ["adapters", "--store", store, "import-pyreft", checkpoint, "--name", "lo", "--positions", "f3+l3"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["version"] == 1 and first["type"] == "loreft" and first["layers"] == [1, 4]
    assert main([*args, "--share-weights"]) == 2  # the checkpoint has unshared weights
    assert "share_weights=True needs 1" in capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()

    assert main(["adapters", "--store", store, "list"]) == 0
    assert capsys.readouterr().out.split("\t")[:3] == ["lo", "v2", "2 version(s)"]
    assert main(["adapters", "--store", store, "set-current", "lo", "1"]) == 0
    capsys.readouterr()
    assert main(["adapters", "--store", store, "show", "lo"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["current_version"] == 1 and [v["version"] for v in shown["versions"]] == [1, 2]
    assert shown["versions"][0]["config"]["positions"] == "f3+l3"

    assert main(["adapters", "--store", store, "delete", "lo"]) == 0
    assert main(["adapters", "--store", store, "show", "lo"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["adapters", "--store", store, "set-current", "bad/name", "1"]) == 2


def test_store_flag_goes_before_or_after_the_action(tmp_path, capsys):
    checkpoint = str(FIXTURE / "adapters" / "lo_l2_f1l1")
    after = ["adapters", "import-pyreft", checkpoint, "--name", "lo", "--positions", "f1+l1", "--share-weights"]
    assert main([*after, "--store", str(tmp_path / "after")]) == 0
    assert main(["adapters", "--store", str(tmp_path / "before"), *after[1:]]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--store", str(tmp_path / "after")]) == 0
    assert capsys.readouterr().out.startswith("lo\tv1")
    assert main(["adapters", "show", "lo", "--store", str(tmp_path / "before")]) == 0


def test_conditional_writes_from_the_command_line(tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    imp = ["adapters", "import-pyreft", str(FIXTURE / "adapters" / "lo_l2_f1l1"), "--name", "lo"]
    imp += ["--positions", "f1+l1", "--share-weights", *store]
    assert main([*imp, "--if-absent"]) == 0
    assert main([*imp, "--if-absent"]) == 3
    assert "precondition failed: adapter 'lo' is at version 1" in capsys.readouterr().err
    assert main([*imp, "--if-version", "2"]) == 3
    assert main([*imp, "--if-version", "1"]) == 0
    with pytest.raises(SystemExit):
        main([*imp, "--if-version", "1", "--if-absent"])
    assert main(["adapters", "set-current", "lo", "1", "--if-version", "1", *store]) == 3
    assert main(["adapters", "set-current", "lo", "1", "--if-version", "2", *store]) == 0
    assert main(["adapters", "delete", "lo", "--if-version", "2", *store]) == 3
    assert main(["adapters", "delete", "lo", "--if-version", "1", *store]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", *store]) == 0 and capsys.readouterr().out == ""


def test_serve_has_a_flag_and_an_env_var_for_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"REFT_{name.upper()}" in help_text.replace("\n", "").replace(" ", "")


def test_flags_override_env_and_env_overrides_defaults(monkeypatch):
    monkeypatch.setenv("REFT_PORT", "9001")
    monkeypatch.setenv("REFT_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("REFT_MODEL", "")
    args = build_parser().parse_args(["serve", "--port", "9002", "--kv-cache-memory", "1GiB", "--no-log-json"])
    settings = settings_from_args(args)
    assert (settings.port, settings.max_num_seqs, settings.model) == (9002, 7, None)
    assert int(settings.kv_cache_memory) == 2**30 and settings.log_json is False


def test_batch_limits_default_by_device_and_given_ones_win():
    def limits(settings, device_type):
        config = settings.engine_config(device_type)
        return config.max_num_seqs, config.max_batched_tokens

    assert limits(Settings(), "cpu") == (64, 512)
    assert limits(Settings(), "cuda") == (256, 8192)
    assert limits(Settings(max_num_seqs=12, max_batched_tokens=96), "cuda") == (12, 96)
    assert limits(Settings(max_batched_tokens=1024), "cpu") == (64, 1024)


def test_async_scheduling_defaults_on_with_a_gpu_and_the_flag_wins():
    def async_scheduling(args, device_type):
        settings = settings_from_args(build_parser().parse_args(["serve", *args]))
        return settings.engine_config(device_type).async_scheduling

    assert async_scheduling([], "cuda") and not async_scheduling([], "cpu")
    assert not async_scheduling(["--no-async-scheduling"], "cuda") and async_scheduling(["--async-scheduling"], "cpu")


def test_invalid_settings_exit_with_a_message(capsys):
    assert main(["serve", "--port", "99999"]) == 2
    assert "--port" in capsys.readouterr().err


def test_torch_threads_default_to_one_where_the_model_runs_on_a_gpu():
    """A GPU's host only launches kernels: one torch thread (GPU_HOST_THREADS) unless --threads says otherwise;
    on a CPU the forward runs on torch's threads, so torch's own choice stays."""
    assert Settings().torch_threads("cuda") == 1
    assert Settings().torch_threads("cpu") is None
    assert Settings(threads=6).torch_threads("cuda") == Settings(threads=6).torch_threads("cpu") == 6
    assert settings_from_args(build_parser().parse_args(["serve", "--threads", "3"])).torch_threads("cuda") == 3

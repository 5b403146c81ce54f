"""Server settings: every field is an environment variable (REFT_<FIELD>) and a `serve` CLI flag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.adapters.store import StoreError
from server.adapters.stores import check_location
from server.engine.config import EngineConfig, async_scheduling_default
from server.plugins import split_plugins

DEFAULT_DEMO_DIR = Path.home() / ".cache" / "reft-server" / "demo"

# (max_num_seqs, max_batched_tokens) when unset, by whether the engine runs on a GPU. On a GPU a decode
# step of 256 rows gives about twice the tokens per second of one of 64 (the weights are read once either
# way: 7.0 vs 3.6 ms on an H200), and a burst of prompts goes through in a few steps of 8192 tokens; a
# CPU's step grows with every row.
BATCH_LIMITS = {True: (256, 8192), False: (64, 512)}

# torch's CPU threads in a serving process whose model runs on a GPU, unless --threads says otherwise: its CPU
# work is launching kernels and small host-side tensors, and a thread per core for them (torch's default) only
# competes for the cores with the engine's own threads and the API process's (vLLM defaults OMP_NUM_THREADS=1)
GPU_HOST_THREADS = 1

# the Settings field each EngineConfig field is made from (engine_config), where their names differ
ENGINE_CONFIG_SOURCES = {"kv_cache_bytes": "kv_cache_memory", "compile_backend": "compile"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFT_", extra="ignore")

    # model
    model: str | None = Field(None, description="Local path or hub id of the base model; unset = the offline demo")
    served_model_name: str | None = Field(None, description="Base model id in the API (default: the model's name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; auto = cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch (default: 1 where the model runs on a GPU, whose host only launches "
        "kernels; torch's choice on a CPU, where the forward runs on them)",
    )
    demo: Literal["smollm2", "tiny"] = Field(
        "smollm2", description="Demo served without a model: smollm2 (SmolLM2-135M-Instruct) or tiny (a toy model)"
    )
    demo_dir: Path = Field(DEFAULT_DEMO_DIR, description="Where the demo model and adapters are built and cached")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Python modules to import at start-up, comma-separated (e.g. ones registering intervention types)",
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return split_plugins(value)

    tensor_parallel: int = Field(
        1, ge=1, description="GPUs (processes) one model is sharded over; >1 spawns the other ranks unless torchrun did"
    )

    @field_validator("model", "served_model_name", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    # network
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")

    # engine
    kv_cache_memory: ByteSize | Literal["auto"] = Field(
        "auto",
        description="KV cache budget, e.g. 512MiB or 20GiB; auto = on a GPU what gpu_memory_utilization leaves after "
        "the weights, a warm-up step and the decode graphs, on a CPU 512MiB",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory the server may use (with kv_cache_memory auto)"
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Requests in the running batch at most (default: 256 on a GPU, 64 on a CPU)"
    )
    max_batched_tokens: int | None = Field(
        None, ge=1, description="Tokens per engine step, prefill chunked to fit (default: 8192 on a GPU, 512 on a CPU)"
    )
    max_model_len: int | None = Field(None, ge=2, description="Prompt + output tokens at most (default: the model's)")
    prefix_caching: bool = Field(True, description="Reuse the KV cache of prompt prefixes already computed")
    attention_backend: Literal["auto", "sdpa", "paged", "flex"] = Field(
        "auto",
        description="Attention over the KV cache: sdpa (gathered blocks), paged (decode rows and prefill chunks read "
        "the cache in place, with Triton kernels on CUDA), flex (FlexAttention, in place); auto = paged on a GPU "
        "(sdpa where Triton is missing), sdpa on a CPU",
    )
    cuda_graphs: bool = Field(
        True, description="Replay decode-only steps from CUDA graphs (paged attention on a GPU; captured at start)"
    )
    fused_kernels: bool = Field(
        True,
        description="Run the model's RMSNorms, and on a GPU its rotary embeddings, through fused kernels that give "
        "its own values bit for bit (fewer kernels a layer), and on a GPU LoReFT's edits in one kernel per batch of "
        "adapters and layer (equal to the torch formula but for the last bit); off: the model's own code and "
        "the formulas",
    )
    step_token_multiple: int = Field(
        1,
        ge=1,
        le=512,
        description="Pad every step that runs eagerly (those that prefill, and decode steps no CUDA graph replays) "
        "with unused rows up to a multiple of this many tokens, so that its matrix products see a few shapes instead "
        "of a new one each step (cuBLAS chooses a kernel on the host per new shape); 1 = no padding",
    )
    compile: bool = Field(
        False,
        description="torch.compile the decode forward before capturing its CUDA graphs, and each decoder layer for "
        "the steps that prefill (fuses each layer's small kernels; start-up takes longer)",
    )
    async_scheduling: bool | None = Field(
        None,
        description="Overlap each engine step's host work (scheduling, inputs, reading the sampled tokens) with the "
        "device's work on the step before; tokens reach the client one step later (default: on a GPU, not on a CPU)",
    )
    engine_core: Literal["auto", "process", "thread"] = Field(
        "auto",
        description="Where the engine steps: process = a process of its own, so HTTP streaming and stepping never "
        "take turns on the GIL; thread = a thread of the server's process; auto = process on one GPU, else thread",
    )
    max_queue: int = Field(256, ge=0, description="Requests waiting beyond the running batch; more get 429")
    request_timeout: float = Field(600.0, gt=0, description="Seconds before a request is aborted")

    # request limits
    max_request_body: ByteSize = Field(
        ByteSize(4 * 2**20), description="Largest request body on every route but adapter uploads"
    )
    max_prompt_chars: int | None = Field(
        None, ge=1, description="Prompt characters at most, checked before tokenizing (default: 16 per context token)"
    )
    max_prompts: int = Field(
        16, ge=1, description="Completions in one OpenAI request at most, prompts x n (never more than the queue holds)"
    )

    tool_call_parser: Literal["hermes", "llama3_json"] | None = Field(
        None,
        description='How the model writes tool calls, read back for tool_choice "auto" (vLLM\'s flag): hermes = '
        '<tool_call>{"name": ..., "arguments": ...}</tool_call> (Hermes 2 Pro, Qwen2.5, Qwen3); llama3_json = an '
        'answer that starts with {"name": ..., "parameters": ...}, more after ";" (Llama 3.1-3.3); unset, "auto" '
        "is a 400",
    )

    # adapters
    store: str = Field(
        "adapters_store",
        description="Adapter store: a directory (may be shared by replicas) or s3://bucket/prefix",
    )

    @field_validator("store", mode="before")
    @classmethod
    def _path_as_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("store")
    @classmethod
    def _supported_store(cls, value: str) -> str:
        try:
            return check_location(value)
        except StoreError as e:
            raise ValueError(str(e)) from None

    store_sync_interval: float = Field(
        2.0, gt=0, description="Seconds between looks at the store for other replicas' changes"
    )
    adapter_memory: ByteSize = Field(ByteSize(2**30), description="Budget of resident adapters")
    max_resident_adapters: int = Field(1024, ge=1, description="Resident adapters at most")
    max_upload_size: ByteSize = Field(ByteSize(256 * 2**20), description="Largest adapter upload accepted")
    allow_foreign_adapters: bool = Field(
        False, description="Accept and serve adapters whose base-model fingerprint is another model's"
    )
    adapter_max_abs: float = Field(
        1e4, gt=0, allow_inf_nan=False, description="Largest magnitude of any adapter parameter accepted"
    )

    # security
    admin_token: SecretStr | None = Field(None, description="Bearer token for the admin API (/v1/adapters)")
    admin_open: bool = Field(False, description="Open the admin API without a token (local use only)")
    api_key: SecretStr | None = Field(None, description="Bearer token required on generation routes when set")

    @field_validator("admin_token", "api_key")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None):
        # an empty secret (a Kubernetes Secret without its key's value, say) would be a token nobody can send
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty: give a token, or leave it unset")
        return value

    # operations
    profile_dir: str | None = Field(
        None,
        description="Directory where POST /v1/admin/profile writes torch.profiler results of the engine's next steps "
        "(a summary and a trace); unset, that route is off",
    )
    shutdown_grace: float = Field(30.0, ge=0, description="Seconds to drain running requests on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    log_json: bool = Field(True, description="Structured JSON logs (false = plain text)")
    vllm_compatible_metrics: bool = Field(
        True, description="Also export the load metrics under vLLM's names (vllm:num_requests_waiting, ...)"
    )

    def torch_threads(self, device_type: str) -> int | None:
        """The CPU threads torch should use in a serving process whose model runs on a device of that type:
        --threads, else GPU_HOST_THREADS on a GPU; None: torch's own choice."""
        if self.threads:
            return self.threads
        return GPU_HOST_THREADS if device_type == "cuda" else None

    def apply_torch_threads(self, device_type: str) -> None:
        """Give torch `torch_threads` CPU threads, if any: in a process that loads the model, once it is loaded
        (its dtype casts run on the CPU, on every thread torch has)."""
        if (threads := self.torch_threads(device_type)) is not None:
            torch.set_num_threads(threads)

    def engine_config(self, device_type: str) -> EngineConfig:
        """The engine's part of these settings, for a model on a device of that type ("cuda", "cpu")."""
        max_num_seqs, max_batched_tokens = BATCH_LIMITS[device_type == "cuda"]
        return EngineConfig(
            block_size=self.block_size,
            kv_cache_bytes=None if self.kv_cache_memory == "auto" else int(self.kv_cache_memory),
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs or max_num_seqs,
            max_batched_tokens=self.max_batched_tokens or max_batched_tokens,
            max_model_len=self.max_model_len,
            prefix_caching=self.prefix_caching,
            attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs,
            compile_backend="inductor" if self.compile else None,
            fused_kernels=self.fused_kernels,
            step_token_multiple=self.step_token_multiple,
            async_scheduling=(
                self.async_scheduling if self.async_scheduling is not None else async_scheduling_default(device_type)
            ),
        )

"""The engine's settings, in one place: the KV pool, the batch limits, prefix caching, the attention
backend, CUDA graphs, async scheduling. The server's Settings make one (`Settings.engine_config`); the scheduler and the
core read it as it is."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "sdpa", "paged", "flex")  # see attention.py; auto: paged on CUDA (with Triton), else sdpa


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (CUDA builds of torch bring it on Linux, not everywhere)."""
    return importlib.util.find_spec("triton") is not None


class EngineConfigError(ValueError):
    """A setting the engine cannot be built with: `fields` name it (EngineConfig fields, which the
    server's flags map to), `reason` says why."""

    def __init__(self, fields: tuple[str, ...], reason: str):
        super().__init__(fields, reason)  # these args: an engine process sends it back pickled
        self.fields = fields
        self.reason = reason

    def __str__(self) -> str:
        return f"{'/'.join(self.fields)}: {self.reason}"


def resolve_attention_backend(name: str, device_type: str) -> str:
    """auto: paged on CUDA where Triton is, else sdpa. Paged on CUDA without Triton is refused here, at
    start-up, rather than at the first step."""
    if name == "auto":
        return "paged" if device_type == "cuda" and triton_available() else "sdpa"
    if name == "paged" and device_type == "cuda" and not triton_available():
        raise EngineConfigError(
            ("attention_backend",), "paged runs Triton kernels on CUDA: install triton, or use sdpa"
        )
    return name


def async_scheduling_default(device_type: str) -> bool:
    """On a GPU, where the host's work can overlap the device's (an H100: the 1b preset's decode step at 128
    sequences 4.56 -> 3.66 ms); on a CPU the forward runs on the host, so there is nothing to overlap."""
    return device_type == "cuda"


def decode_graphs_apply(cuda_graphs: bool, backend: str) -> bool:
    """Whether decode steps replay from CUDA graphs: asked for, and the (resolved) backend is paged."""
    return cuda_graphs and backend == "paged"


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # the KV pool's memory budget; None = sized from the device (memory.py)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the server may use, with kv_cache_bytes None
    num_blocks: int | None = None  # overrides kv_cache_bytes when set
    max_num_seqs: int = 64
    max_batched_tokens: int = 512  # per step; prefills are chunked to fit
    max_model_len: int | None = None  # prompt + output; default: the model's context window
    prefix_caching: bool = True  # reuse the K/V of identical (tokens, adapter edits) prefixes
    watermark_blocks: int = 1  # free blocks kept in reserve when admitting, so decodes rarely preempt
    attention_backend: str = "auto"  # how attention reads the KV pool (attention.py)
    cuda_graphs: bool = True  # replay decode-only steps of the paged backend from CUDA graphs (cuda_graphs.py)
    compile_backend: str | None = None  # torch.compile those steps' forward and the others' layers ("inductor")
    async_scheduling: bool = False  # read each step's sampled tokens in the next step, after its launch (core.py)
    # the model's RMSNorms, and on CUDA its rotary embeddings, through fused kernels with its own bits
    # (fused_norms.py, fused_rotary.py); off: its own modules' code
    fused_kernels: bool = True
    # the tokens of every eagerly run step rounded up to a multiple of this with padding rows (model_runner.py's
    # `padded`), so that its matrix products see a few shapes rather than a new one every step; 1: none
    step_token_multiple: int = 1

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {self.attention_backend!r}"
            )
        if self.step_token_multiple < 1:
            raise ValueError(f"step_token_multiple must be at least 1, not {self.step_token_multiple}")

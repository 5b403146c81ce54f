"""Every GPU figure in one run on one device, printed and written to JSON (--json).

Parts (--parts, default all, in this order):
  engine     the engine on N requests arriving at once, base model only and with K distinct LoReFT adapters,
             with the server's defaults (on CUDA: paged attention, decode steps replayed from CUDA graphs,
             async scheduling)
  decode     the engine's decode step at several batch sizes next to its memory floor, at the bandwidth of a
             large device-to-device copy measured in the same run
  engine-sync, decode-sync, engine-async, decode-async, engine-compile, decode-compile, engine-compile-async,
  decode-compile-async, engine-eager, decode-eager, engine-sdpa, decode-sdpa, engine-flex, decode-flex
             the same two without and with async scheduling (a step's host work overlaps the last step's device
             work), with the decode forward compiled by Inductor before its graphs are captured (--compile), both,
             without CUDA graphs (eager), with the gathered sdpa attention (the old path and the reference),
             and with FlexAttention, so one run compares them (all but -async and -compile-async synchronous)
  kernel     the paged decode kernel alone over every layer at the largest decode batch, as the engine launches it,
             under a grid of other launch configurations (and again at --kernel-shapes: few rows, long contexts),
             and torch's paged varlen flash attention over the same rows where this torch has it
             (bench/decode_kernel_launches.py; CUDA only); then one step's prefill
             chunks through the paged prefill kernel and through the gathered sdpa groups: prompts from position
             0, the same after cached tokens, one prompt of the whole budget, each also under a grid of the
             prefill kernel's launches on CUDA (bench/prefill_kernel.py)
  profile    torch.profiler over decode steps of the largest decode batch and over steps that prefill a full
             token budget of new prompts, without adapters and with one per prompt: the top operators by
             device time and by host time, and each prefill step's launch time against its time on the device
  hf-static  HF `generate` on the same requests, static left-padded batches
  hf-cb      transformers' `generate_batch` (continuous batching) on the same requests, held to the engine's
             limits; its first call (start-up and warm-up included) is reported apart
  parity     the pyreft fixture through the engine in float32 and bfloat16, against pyreft's tokens and the
             reference path in the same dtype; and in bfloat16 with pyreft's tokens fed back, each attention
             backend's logit error against the engine in float32

The model is a random-init Llama built straight on the device (`--preset 1b`: Llama-3.2-1B's shape).
A GPU session gets a few minutes of device time: on an H200, engine + decode + hf-static + parity took
under two minutes (2026-11-26); every part, with flex's compiles and generate_batch, takes longer, so pick
parts with --parts. `--smoke` runs every part on the CPU on the tiny preset in seconds, which keeps this
script working in CI.

    python bench/gpu.py --json gpu.json                 # on a GPU machine (bench/gpu.sh runs it)
    python bench/gpu.py --smoke --parts engine,parity   # on any machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PRESETS, build_on_device, machine, make_adapters, stamp, workload  # noqa: E402
from bench.decode_floor import decode_step, decoding_core, kv_bytes_per_token, with_floor  # noqa: E402
from bench.decode_kernel_launches import GRID as DECODE_GRID  # noqa: E402
from bench.decode_kernel_launches import SMOKE_GRID as DECODE_SMOKE_GRID  # noqa: E402
from bench.decode_kernel_launches import time_launches  # noqa: E402
from bench.device_timing import GIB, copy_bandwidth, peak_memory_gib, release_memory  # noqa: E402
from bench.fixture_parity import fixture_parity, forced_logit_error  # noqa: E402
from bench.gemm_shapes import linear_host_costs  # noqa: E402
from bench.prefill_kernel import GRID as PREFILL_GRID  # noqa: E402
from bench.prefill_kernel import SMOKE_GRID as PREFILL_SMOKE_GRID  # noqa: E402
from bench.prefill_kernel import time_prefill  # noqa: E402
from bench.serving_peers import continuous_batching_config, run_continuous, run_engine, run_static  # noqa: E402
from bench.step_profile import profile_steps  # noqa: E402
from server.config import GPU_HOST_THREADS  # noqa: E402
from server.engine.attention import ATTENTION_NAME  # noqa: E402
from server.engine.config import EngineConfig, async_scheduling_default, resolve_attention_backend  # noqa: E402
from server.engine.profile_summary import SIDES  # noqa: E402
from server.metrics import STEP_PHASES  # noqa: E402
from server.models.tiny import VOCAB_SIZE  # noqa: E402

# engine variants: part suffix -> (attention_backend, cuda_graphs, torch.compile backend of the decode forward,
# async scheduling, None for the server's default on the device)
VARIANTS = {
    "": ("auto", True, None, None),
    "sync": ("auto", True, None, False),
    "async": ("auto", True, None, True),
    "compile": ("auto", True, "inductor", False),
    "compile-async": ("auto", True, "inductor", True),
    "eager": ("auto", False, None, False),
    "sdpa": ("sdpa", False, None, False),
    "flex": ("flex", False, None, False),
}
ENGINE_PARTS = tuple(f"{kind}-{suffix}".rstrip("-") for suffix in VARIANTS for kind in ("engine", "decode"))
PARTS = (*ENGINE_PARTS, "kernel", "profile", "gemm-shapes", "hf-static", "hf-cb", "parity")
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pyreft_reference"

# flag -> (GPU default, --smoke default); a flag given on the command line wins over both
SIZES = {
    "preset": ("1b", "tiny"),
    "device": ("cuda" if torch.cuda.is_available() else "cpu", "cpu"),
    # on a GPU the server's default (Settings.torch_threads): one, as the host only launches kernels; with --smoke
    # one too: tiny models gain nothing from more, and a busy CI host stalls them
    "threads": (GPU_HOST_THREADS if torch.cuda.is_available() else None, 1),
    "requests": (256, 6),
    "prompt_len": ((128, 512), (8, 24)),
    "output_len": (128, 6),
    "max_num_seqs": (128, 4),
    "max_batched_tokens": (4096, 48),
    "kv_cache_gib": (16.0, 0.0625),
    "adapters": (64, 4),
    "engine_rounds": (5, 1),  # run D's rounds of 1.5 s spread by 10%: a median of 5
    "adapter_layers": (8, 2),
    "static_batch": (64, 4),
    "decode_seqs": ((1, 16, 64, 128, 256), (1, 4)),
    "decode_context": (256, 16),
    "decode_steps": (20, 2),
    "kernel_shapes": (((16, 256), (64, 2048)), ((2, 40),)),
    "copy_gib": (1.0, 1 / 32),
    "parity_cases": (None, 2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--smoke",
        action="store_true",
        help="CPU, tiny preset, a few requests, a few kernel launches swept: every part in seconds",
    )
    add("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    add("--json", type=Path, default=None, help="write the results here (rewritten after every part)")
    add("--preset", choices=list(PRESETS))
    add("--device")
    add("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on GPU, float32 on CPU")
    add("--threads", type=int, help="CPU threads for torch (default: 1 on a GPU, as the server; torch's on a CPU)")
    add("--requests", type=int, help="requests, all arriving at once")
    add("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="prompt tokens, uniform (random ids)")
    add("--output-len", type=int, help="output tokens of every request (EOS ignored)")
    add("--max-num-seqs", type=int, help="running sequences at most (engine and generate_batch)")
    add("--max-batched-tokens", type=int, help="tokens per step at most (engine and generate_batch)")
    add("--kv-cache-gib", type=float, help="KV cache memory (engine and generate_batch)")
    add("--step-token-multiple", type=int, default=1, help="pad eager steps to a multiple of this many tokens")
    add("--adapters", type=int, help="distinct LoReFT adapters in the engine's adapter run")
    add("--engine-rounds", type=int, help="rounds of base and adapter runs, alternating; medians reported")
    add("--adapter-rank", type=int, default=4)
    add("--adapter-layers", type=int, help="intervened layers, evenly spread")
    add("--adapter-positions", default="f7+l7")
    add("--static-batch", type=int, help="HF generate batch size")
    add("--decode-seqs", type=lambda text: tuple(int(n) for n in text.split(",")), help="batch sizes, e.g. 1,16")
    add("--decode-context", type=int, help="prompt tokens of the decoding sequences")
    add("--decode-steps", type=int, help="timed decode steps per batch size (the median is reported)")
    add(
        "--kernel-shapes",
        type=lambda text: tuple(tuple(int(n) for n in shape.split("x")) for shape in text.split(",")),
        help="more decode kernel sweeps (the kernel part), SEQSxCONTEXT each, e.g. 16x256,64x2048",
    )
    add("--copy-gib", type=float, help="size of the bandwidth copy")
    add("--parity-cases", type=int, help="first N fixture cases (default all)")
    add("--fixture", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"unknown parts {', '.join(unknown) or '(none given)'}; known: {', '.join(PARTS)}")
    on_gpu = torch.device(args.device).type == "cuda"
    args.dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if on_gpu else torch.float32
    return args


def say(text: str) -> None:
    print(text, flush=True)


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the upper one of an even count)."""
    return sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2]


class DeviceModel:
    """The benchmark model, at most one copy on the device: with the engine's paged attention or with
    sdpa for the transformers baselines. Switching frees the old one first; builds are timed."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.attention: str | None = None
        self.model = None
        self.builds: list[dict] = []

    def get(self, attention: str):
        if attention != self.attention:
            self.model = None
            release_memory(self.args.device)
            started = time.perf_counter()
            self.model = build_on_device(self.args.preset, self.args.device, self.args.dtype, attention)
            self.attention = attention
            self.builds.append({"attention": attention, "seconds": time.perf_counter() - started})
        return self.model


class Benchmark:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.models = DeviceModel(args)
        vocab = PRESETS[args.preset].get("vocab_size", VOCAB_SIZE)
        output = (args.output_len, args.output_len)
        self.requests = workload(args.requests, tuple(args.prompt_len), output, 0, vocab_size=vocab)

    def engine_config(self, variant: str = "") -> EngineConfig:
        attention_backend, cuda_graphs, compile_backend, async_scheduling = VARIANTS[variant]
        if async_scheduling is None:
            async_scheduling = async_scheduling_default(torch.device(self.args.device).type)
        return EngineConfig(
            kv_cache_bytes=int(self.args.kv_cache_gib * GIB),
            max_num_seqs=self.args.max_num_seqs,
            max_batched_tokens=self.args.max_batched_tokens,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            compile_backend=compile_backend,
            async_scheduling=async_scheduling,
            step_token_multiple=self.args.step_token_multiple,
        )

    def run_part(self, part: str) -> dict:
        kind, _, variant = part.partition("-")
        if part in ENGINE_PARTS:
            return getattr(self, kind)(variant)
        return getattr(self, part.replace("-", "_"))()

    def adapter_layers(self, model) -> tuple[int, ...]:
        """`--adapter-layers` layers, spread evenly from the first."""
        num_layers = model.config.num_hidden_layers
        count = min(self.args.adapter_layers, num_layers)
        return tuple(range(0, num_layers, num_layers // count))[:count]

    def engine(self, variant: str = "") -> dict:
        args = self.args
        config = self.engine_config(variant)
        model = self.models.get(ATTENTION_NAME)
        layers = self.adapter_layers(model)
        adapters = make_adapters(model, args.adapters, args.adapter_rank, layers, args.adapter_positions)
        mixed = [replace(r, adapter=i % args.adapters) for i, r in enumerate(self.requests)]
        # untimed, both workloads first: each new step shape costs once (kernel choices, flex compiles, the
        # edits' batched products), and it must not land in one round's run
        warm_up = run_engine(model, self.requests, adapters, config)
        run_engine(model, mixed, adapters, config)
        say(f"  warm-up, untimed: the base run {warm_up['tokens_per_s']:10.1f} tok/s, then the adapters' run")
        rounds = []
        for index in range(args.engine_rounds):  # alternating which goes first, so drift hits both alike
            runs = {"base": self.requests, "adapters": mixed}
            order = list(runs) if index % 2 == 0 else list(reversed(runs))
            measured = {name: run_engine(model, runs[name], adapters, config) for name in order}
            measured["ratio"] = measured["adapters"]["tokens_per_s"] / measured["base"]["tokens_per_s"]
            rounds.append(measured)
            say(
                f"  round {index + 1}: base {measured['base']['tokens_per_s']:10.1f} tok/s, {args.adapters} adapters "
                f"{measured['adapters']['tokens_per_s']:10.1f} tok/s, ratio {measured['ratio']:.3f}"
            )
        base = median_run([r["base"] for r in rounds])
        with_adapters = median_run([r["adapters"] for r in rounds])
        ratio = statistics.median(r["ratio"] for r in rounds)
        say(f"  medians: base {base['tokens_per_s']:.1f} tok/s, adapters {with_adapters['tokens_per_s']:.1f} tok/s")
        say(f"  adapters / base = {ratio:.3f} (median of {len(rounds)} rounds)")
        for name, run in (("base", base), ("adapters", with_adapters)):
            for kind, title in (("prefill", "steps that prefilled"), ("decode", "steps that only decoded")):
                steps = run["steps"][kind]
                phases = " / ".join(f"{ms:.2f}" for ms in steps["phase_mean_ms"].values())
                say(
                    f"  {name}: {steps['count']} {title}, mean / median / slowest {steps['mean_ms']:.2f} / "
                    f"{steps['median_ms']:.2f} / {steps['max_ms']:.1f} ms ({' / '.join(STEP_PHASES)} {phases}; "
                    f"on the CPU {steps['cpu_mean_ms']:.2f}), {steps['device_wait_share']:.0%} blocked on the device"
                )
            say(f"  {name}: {1000 * run['outside_steps_s']:.1f} ms of the run outside the steps")
        return {
            "attention_backend": resolve_attention_backend(config.attention_backend, torch.device(args.device).type),
            "cuda_graphs": config.cuda_graphs,
            "compile_backend": config.compile_backend,
            "async_scheduling": config.async_scheduling,
            "adapter_layers": list(layers),
            "warm_up": warm_up,
            "base": base,
            "adapters": with_adapters,
            "adapters_over_base": ratio,
            "rounds": rounds,
        }

    def decode(self, variant: str = "") -> dict:
        args = self.args
        config = self.engine_config(variant)
        bandwidth = copy_bandwidth(args.device, int(args.copy_gib * GIB))
        say(f"  copy bandwidth {bandwidth['gb_per_s']:.0f} GB/s (read + written, {args.copy_gib:g} GiB copies)")
        model = self.models.get(ATTENTION_NAME)
        steps = []
        for batch in args.decode_seqs:
            measured = decode_step(model, batch, args.decode_context, args.decode_steps, config)
            steps.append(with_floor(model, measured, bandwidth["gb_per_s"]))
            step = steps[-1]
            say(
                f"  {batch:4d} seqs (context ~{step['mean_context']:.0f}): {step['step_ms']:8.2f} ms "
                f"(forward {step['forward_ms']:.2f}, attention kernel {step['attention_ms']:.2f}); "
                f"memory floor {step['floor_ms']:7.3f} ms ({step['over_floor']:.1f}x)"
            )
        element = next(model.parameters()).element_size()
        kv_bytes = kv_bytes_per_token(model.config, element)
        return {
            "attention_backend": resolve_attention_backend(config.attention_backend, torch.device(args.device).type),
            "cuda_graphs": config.cuda_graphs,
            "compile_backend": config.compile_backend,
            "async_scheduling": config.async_scheduling,
            "bandwidth": bandwidth,
            "kv_bytes_per_token": kv_bytes,
            "steps": steps,
        }

    def decode_sweep(self, model, batch: int, context: int) -> dict:
        """The decode kernel's launch grid over `batch` sequences of ~`context` tokens."""
        core, sequences = decoding_core(model, batch, context, 2, self.engine_config("eager"))
        grid = DECODE_SMOKE_GRID if self.args.smoke else DECODE_GRID
        result = time_launches(core, sequences, self.args.decode_steps, grid)
        mean_context = sum(len(s.token_ids) - 1 for s in sequences) / batch
        say(f"  {batch} seqs, mean context {mean_context:.0f}, {result['kv_bytes'] / 1e9:.3f} GB of K/V:")
        default = result["default"]
        say(f"  as the engine launches it: {default['ms']:.3f} ms, {default['gb_per_s']:.0f} GB/s")
        for launch in sorted(result["launches"], key=lambda launch: launch["ms"]):
            say(
                f"    tile {launch['tile']:3d}, {launch['num_warps']} warps, {launch['num_stages']} stages: "
                f"{launch['ms']:.3f} ms, {launch['gb_per_s']:.0f} GB/s, max difference {launch['max_difference']:.1e}"
            )
        return {"seqs": batch, "mean_context": mean_context, **result}

    def kernel(self) -> dict:
        args = self.args
        model = self.models.get(ATTENTION_NAME)
        result = self.decode_sweep(model, max(args.decode_seqs), args.decode_context)
        if "varlen" in result:
            varlen = result["varlen"]
            if "error" in varlen:
                say(f"  torch's paged varlen flash attention: {varlen['error']}")
            else:
                say(
                    f"  torch's paged varlen flash attention: {varlen['ms']:.3f} ms, {varlen['gb_per_s']:.0f} GB/s, "
                    f"max difference {varlen['max_difference']:.1e}"
                )
        sweeps = [self.decode_sweep(model, batch, context) for batch, context in args.kernel_shapes]
        cached = max(args.prompt_len)  # the second chunk of a prompt twice the longest
        grid = PREFILL_SMOKE_GRID if args.smoke else PREFILL_GRID
        prefill = time_prefill(model, tuple(args.prompt_len), args.max_batched_tokens, cached, args.decode_steps, grid)
        for case in prefill.values():
            say(
                f"  prefill, {case['chunks']} chunks of {case['tokens']} tokens after {case['cached']} cached: "
                f"paged {case['paged_ms']:.3f} ms, gathered sdpa {case['sdpa_ms']:.3f} ms over every layer, "
                f"max difference {case['max_difference']:.1e}"
            )
            for launch in sorted(case.get("launches", ()), key=lambda launch: launch.get("ms", float("inf"))):
                name = "    {query_tile:2d} queries, {key_tile:3d} keys, {num_warps} warps:".format(**launch)
                if "error" in launch:
                    say(f"{name} {launch['error']}")
                else:
                    mark = " (the engine's)" if launch["default"] else ""
                    say(f"{name} {launch['ms']:.3f} ms, max difference {launch['max_difference']:.1e}{mark}")
        return {**result, "sweeps": sweeps, "prefill": prefill}

    def profile(self) -> dict:
        args = self.args
        batch = max(args.decode_seqs)
        model = self.models.get(ATTENTION_NAME)
        adapters = make_adapters(
            model, args.adapters, args.adapter_rank, self.adapter_layers(model), args.adapter_positions
        )
        config = self.engine_config()
        result = profile_steps(model, batch, args.decode_context, 5, config, tuple(args.prompt_len), adapters)
        budget, decoding = config.max_batched_tokens, result["mixed"]["decoding"]
        titles = {
            "decode": f"decode step ({batch} sequences)",
            "prefill": f"prefill step ({budget} tokens)",
            "prefill_adapters": f"prefill step ({budget} tokens, an adapter per prompt)",
            "mixed": f"mixed step ({budget} tokens, {decoding} of them decoding)",
            "mixed_adapters": f"mixed step ({budget} tokens, {decoding} of them decoding, an adapter per prompt)",
        }
        for phase, title in titles.items():
            if phase != "decode":
                figures = result[phase]
                say(
                    f"  {title}: {figures['prompts']} prompts, launched in {figures['launch_ms']:.2f} ms, done in "
                    f"{figures['done_ms']:.2f} ms (the median of {len(figures['launches_ms'])} launches: "
                    f"{', '.join(f'{ms:.2f}' for ms in figures['launches_ms'])} ms)"
                )
            for side, what in SIDES.items():
                if result[phase][side]:
                    say(f"  {title}, {what}")
                for op in result[phase][side]:
                    say(f"    {op['ms']:8.3f} ms  {op['calls']:7.1f} calls  {op['name']}")
        return {"seqs": batch, **result}

    def gemm_shapes(self) -> dict:
        """The host's time per projection launch over a step's worth of rows, for row counts seen and new."""
        rows = self.args.max_batched_tokens
        costs = linear_host_costs(self.models.get(ATTENTION_NAME), rows)
        for cost in costs:
            out_features, in_features = cost["shape"]
            say(
                f"  {rows} x {in_features} -> {out_features}: {cost['seen_us']:6.1f} us per launch over row counts "
                f"seen before, {cost['new_us']:6.1f} over new ones"
            )
        return {"rows": rows, "shapes": costs}

    def hf_static(self) -> dict:
        model = self.models.get("sdpa")
        first = run_static(model, self.requests, self.args.static_batch)  # as the engine's warm-up run
        result = run_static(model, self.requests, self.args.static_batch)
        say(f"  first call {first['tokens_per_s']:10.1f} tok/s")
        say(f"  batches of {self.args.static_batch}: {result['tokens_per_s']:10.1f} tok/s  {result['seconds']:7.2f} s")
        return {"batch_size": self.args.static_batch, "first_call": first, **result}

    def hf_cb(self) -> dict:
        args = self.args
        model = self.models.get("sdpa")
        kv_bytes = kv_bytes_per_token(model.config, next(model.parameters()).element_size())
        config, applied = continuous_batching_config(
            args.max_num_seqs, args.max_batched_tokens, int(args.kv_cache_gib * GIB), kv_bytes
        )
        result = run_continuous(model, self.requests, config)
        first = result["first_call"]
        say(f"  first call {first['tokens_per_s']:10.1f} tok/s  {first['seconds']:7.2f} s (start-up included)")
        say(f"  second     {result['tokens_per_s']:10.1f} tok/s  {result['seconds']:7.2f} s")
        return {"settings": applied, **result}

    def parity(self) -> dict:
        results = {}
        for dtype in (torch.float32, torch.bfloat16):
            counts = fixture_parity(self.args.fixture, self.args.device, dtype, self.args.parity_cases)
            results[str(dtype).removeprefix("torch.")] = counts
            n = counts["cases"]
            prompts = counts["base_prompts"]
            say(f"  ({n} cases, whose base requests repeat {prompts} prompts: one flip moves a base count by several)")
            say(
                f"  {dtype}: vs pyreft adapter {counts['adapter_engine_vs_pyreft']}/{n} "
                f"base {counts['base_engine_vs_pyreft']}/{n}; vs the reference in {dtype} "
                f"adapter {counts['adapter_engine_vs_reference']}/{n} base {counts['base_engine_vs_reference']}/{n}"
            )
            if "adapter_sdpa_engine_vs_pyreft" in counts:
                say(
                    f"  {dtype}, engine with sdpa: vs pyreft adapter {counts['adapter_sdpa_engine_vs_pyreft']}/{n} "
                    f"base {counts['base_sdpa_engine_vs_pyreft']}/{n}; default vs sdpa adapter "
                    f"{counts['adapter_engine_vs_sdpa_engine']}/{n} base {counts['base_engine_vs_sdpa_engine']}/{n}"
                )
        forced = forced_logit_error(self.args.fixture, self.args.device, torch.bfloat16, self.args.parity_cases)
        results["bfloat16_forced"] = forced
        for backend, error in forced.items():
            margin = error["largest_float32_margin_at_a_flip"]
            say(
                f"  bfloat16 {backend}, pyreft's tokens fed back: mean |logit error| vs float32 "
                f"{error['mean_abs_error']:.5f} over {error['positions']} positions; top token differs at "
                f"{error['flips']} (float32's top-two margin there at most {margin:.4f})"
            )
        return results


def environment(args: argparse.Namespace) -> dict:
    cuda = torch.device(args.device).type == "cuda"
    return {
        "device": torch.cuda.get_device_name(args.device) if cuda else machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": stamp(),
    }


def settings(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in SIZES}
    return {**values, "dtype": str(args.dtype).removeprefix("torch."), "adapter_rank": args.adapter_rank}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    results = {"environment": environment(args), "settings": settings(args), "parts": {}}
    say(f"{results['environment']['device']}: torch {torch.__version__}, transformers {transformers.__version__}")
    benchmark = Benchmark(args)
    for part in [p for p in PARTS if p in args.parts]:
        say(f"[{part}]")
        release_memory(args.device)
        part_started = time.perf_counter()
        try:
            result = benchmark.run_part(part)
        except Exception:  # one failing part must not cost the others their device time
            traceback.print_exc()
            result = {"error": traceback.format_exc(limit=-8)}
        result["wall_s"] = time.perf_counter() - part_started
        result["peak_memory_gib"] = peak_memory_gib(args.device)
        say(f"  ({result['wall_s']:.1f} s)")
        results["parts"][part] = result
        results["model_builds"] = benchmark.models.builds
        results["wall_s"] = time.perf_counter() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    say(f"total {results['wall_s']:.1f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(parse_args(argv))
    failed = [name for name, part in results["parts"].items() if "error" in part]
    if failed:
        say(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

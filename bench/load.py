"""Load generator: replays a synthetic workload against a running reft-server over HTTP.

It only targets loopback. Requests stream from POST /v1/generate (server-sent events), so each one
yields its time to first token, its inter-token latencies and its end-to-end latency. Arrivals are
either a Poisson process at `--rate` requests/s or a closed loop of `--concurrency` clients.
Prompts are random token ids (`input_ids`, so their lengths are exact), outputs run to
`max_new_tokens` (`ignore_eos`), and each request picks an adapter from a uniform or Zipf mix, or
the base model with `--base-share`.

    python bench/load.py --url http://127.0.0.1:8000 --requests 200 --rate 4 \
        --adapters a0,a1,a2,a3 --zipf 1.1 --base-share 0.1 --out results.json

From Python: `await run_load(url, LoadSpec(...))` returns the same summary the CLI writes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

MAX_ERROR_SAMPLES = 5
BUSY_CLIENT_SHARE = 0.8  # of one core, above which the client's measurements are suspect


@dataclass(frozen=True)
class LoadSpec:
    requests: int = 100
    rate: float | None = None  # Poisson arrivals per second; None = closed loop
    concurrency: int = 8  # clients of the closed loop
    prompt_len: tuple[int, int] = (32, 128)  # uniform, BOS included
    output_len: tuple[int, int] = (32, 128)  # uniform
    adapters: tuple[str, ...] = ()
    zipf: float | None = None  # exponent of a Zipf mix over `adapters`; None = uniform
    base_share: float = 0.0  # share of requests on the base model
    seed: int = 0
    deadline: float = 600.0  # seconds for the whole run; unfinished requests count as errors
    bos_id: int | None = 1
    token_range: tuple[int, int] = (3, 259)  # prompt ids are drawn from [low, high)


@dataclass(frozen=True)
class Planned:
    index: int
    prompt: list[int]
    max_new_tokens: int
    adapter: str | None
    arrival: float  # seconds after the start (0 in a closed loop)


@dataclass
class Outcome:
    index: int
    adapter: str | None
    start: float = 0.0
    ttft: float | None = None
    end: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def plan(spec: LoadSpec) -> list[Planned]:
    """The workload, fully determined by the spec (and its seed)."""
    rng = random.Random(spec.seed)
    names = list(spec.adapters)
    weights = [1.0 / (rank + 1) ** spec.zipf for rank in range(len(names))] if spec.zipf else None
    clock = 0.0
    planned = []
    for index in range(spec.requests):
        if spec.rate:
            clock += rng.expovariate(spec.rate)
        length = rng.randint(*spec.prompt_len)
        prompt = [rng.randrange(*spec.token_range) for _ in range(length)]
        if spec.bos_id is not None:
            prompt[0] = spec.bos_id
        adapter = None
        if names and rng.random() >= spec.base_share:
            adapter = rng.choices(names, weights)[0]
        planned.append(Planned(index, prompt, rng.randint(*spec.output_len), adapter, clock))
    return planned


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data fields of a server-sent event stream. Lines end at LF (CR LF) only, as the SSE spec
    says: httpx's aiter_lines() also splits at U+0085, U+2028, U+001C-U+001E..., which JSON strings
    may hold unescaped (the server writes them with ensure_ascii=False)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r").decode()


async def send(client: httpx.AsyncClient, url: str, request: Planned, origin: float) -> Outcome:
    """One streamed request; never raises (failures are recorded in the outcome)."""
    outcome = Outcome(request.index, request.adapter, start=time.perf_counter() - origin)
    body = {"input_ids": request.prompt, "max_new_tokens": request.max_new_tokens, "ignore_eos": True, "stream": True}
    if request.adapter is not None:
        body["adapter"] = request.adapter
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/generate", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return outcome
            async for payload in sse_data(response):
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    outcome.error = f"stream error: {data['error'].get('message', data['error'])}"
                    return outcome
                count = len(data.get("token_ids", ()))
                if not count:
                    continue
                now = time.perf_counter() - origin
                if outcome.ttft is None:
                    outcome.ttft = now - outcome.start
                else:  # a chunk of k coalesced tokens counts as k gaps of (gap / k)
                    outcome.itl.extend([(now - last) / count] * count)
                last = now
                outcome.tokens += count
        if outcome.tokens < request.max_new_tokens:
            outcome.error = f"short output: {outcome.tokens} of {request.max_new_tokens} tokens"
    except Exception as e:  # a load generator records every failure and goes on
        outcome.error = f"{type(e).__name__}: {e}"
    finally:
        outcome.end = time.perf_counter() - origin
    return outcome


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: list[float]) -> dict:
    return {
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "mean": sum(values) / len(values) if values else None,
    }


def summarize(spec: LoadSpec, outcomes: list[Outcome], elapsed: float) -> dict:
    done = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    tokens = sum(o.tokens for o in outcomes)
    end = max((o.end for o in outcomes if o.end is not None), default=elapsed)
    return {
        "spec": asdict(spec),
        "requests": len(outcomes),
        "completed": len(done),
        "errors": len(failed),
        "error_kinds": dict(Counter(o.error.split(":")[0] for o in failed)),
        "error_samples": [o.error for o in failed[:MAX_ERROR_SAMPLES]],
        "duration_s": end,
        "requests_per_s": len(done) / end if end else 0.0,
        "output_tokens_per_s": tokens / end if end else 0.0,
        "output_tokens": tokens,
        "ttft_s": distribution([o.ttft for o in done]),
        "itl_s": distribution([gap for o in done for gap in o.itl]),
        "e2e_s": distribution([o.end - o.start for o in done]),
    }


def require_loopback(url: str) -> None:
    """A load generator is a traffic cannon: it only ever aims at this machine."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url}: the load generator only targets loopback (127.0.0.0/8, ::1, localhost)")


async def run_load(url: str, spec: LoadSpec, client: httpx.AsyncClient | None = None) -> dict:
    """Replay the spec's workload against `url` (loopback only) and summarize it. Bounded by
    `spec.requests` and `spec.deadline`."""
    require_loopback(url)
    workload = plan(spec)
    own_client = client is None
    if own_client:
        width = spec.concurrency if spec.rate is None else max(spec.requests, 1)
        limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
        client = httpx.AsyncClient(timeout=httpx.Timeout(spec.deadline, connect=10.0), limits=limits)
    origin, cpu_at_origin = time.perf_counter(), time.process_time()
    finished: dict[int, Outcome] = {}  # filled as requests end, so a deadline keeps what completed

    async def issue(request: Planned) -> None:
        finished[request.index] = await send(client, url, request, origin)

    if spec.rate is None:
        queue = iter(workload)

        async def client_loop() -> None:
            for request in queue:  # the clients share one iterator: each takes the next request
                await issue(request)

        coroutines = [client_loop() for _ in range(min(spec.concurrency, len(workload)))]
    else:

        async def arrive(request: Planned) -> None:
            await asyncio.sleep(max(0.0, request.arrival - (time.perf_counter() - origin)))
            await issue(request)

        coroutines = [arrive(request) for request in workload]
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, timeout=spec.deadline)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if own_client:
            await client.aclose()
    elapsed = time.perf_counter() - origin
    client_cpu = (time.process_time() - cpu_at_origin) / elapsed
    outcomes = [
        finished.get(r.index)
        or Outcome(r.index, r.adapter, end=elapsed, error=f"deadline: not done within {spec.deadline:g} s")
        for r in workload
    ]
    return {**summarize(spec, outcomes, elapsed), "client_cpu_share": client_cpu}


def describe(summary: dict) -> str:
    def ms(dist: dict) -> str:
        return " / ".join("-" if dist[q] is None else f"{dist[q] * 1000:.0f}" for q in ("p50", "p90", "p99"))

    return (
        f"{summary['completed']}/{summary['requests']} ok, {summary['errors']} errors {summary['error_kinds'] or ''}  "
        f"{summary['requests_per_s']:.2f} req/s  {summary['output_tokens_per_s']:.1f} tok/s  "
        f"TTFT {ms(summary['ttft_s'])} ms  ITL {ms(summary['itl_s'])} ms  E2E {ms(summary['e2e_s'])} ms (p50/p90/p99)"
        f"  client CPU {summary['client_cpu_share']:.2f} of a core{_busy_client_warning(summary)}"
    )


def _busy_client_warning(summary: dict) -> str:
    """The client times every event on one event loop: near a full core, its own backlog is in the latencies."""
    if summary["client_cpu_share"] < BUSY_CLIENT_SHARE:
        return ""
    return " (busy: its own queueing may inflate the TTFT and ITL it measures)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=100)
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    arrivals.add_argument("--concurrency", type=int, default=8, help="closed loop of this many clients (default)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--adapters", default="", help="comma-separated adapter names")
    parser.add_argument("--zipf", type=float, default=None, help="Zipf exponent of the adapter mix (default uniform)")
    parser.add_argument("--base-share", type=float, default=0.0, help="share of requests on the base model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    args = parser.parse_args()
    try:
        require_loopback(args.url)
    except ValueError as e:
        parser.error(str(e))
    spec = LoadSpec(
        requests=args.requests,
        rate=args.rate,
        concurrency=args.concurrency,
        prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len),
        adapters=tuple(name for name in args.adapters.split(",") if name),
        zipf=args.zipf,
        base_share=args.base_share,
        seed=args.seed,
        deadline=args.deadline,
    )
    summary = asyncio.run(run_load(args.url.rstrip("/"), spec))
    print(describe(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

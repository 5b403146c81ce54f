"""Plots of bench/compare.py's results: PNGs written next to the JSON file.

    python bench/plots.py bench/results/compare.json

- <stem>-adapters.png: output throughput vs the number of distinct adapters, ours vs the
  grouped-by-adapter HF generate + hooks baseline, with base-only lines for ours and HF static batches.
- <stem>-latency.png: time to first token and inter-token latency (p50/p90/p99) vs offered Poisson
  load, over HTTP.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def subtitle(results: dict) -> str:
    return f"{results['preset']} preset, {results['machine']}, {results['date']}"


def adapters_plot(results: dict, path: Path) -> Path:
    part = results["adapters"]
    ks = [int(k) for k in part["per_k"]]
    rows = list(part["per_k"].values())
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for key, label, style in (
        ("ours", "ours: mixed batches", "o-"),
        ("grouped", "HF generate + hooks, grouped by adapter (pyreft-style);\nlabels: ours / this", "s-"),
    ):
        medians = [row[f"{key}_tokens_per_s"] for row in rows]
        # rounds are stored rounded to 0.1: clamp so a bar never goes negative
        spread = [[max(0.0, m - min(row[f"{key}_rounds"])) for m, row in zip(medians, rows, strict=True)]]
        spread.append([max(0.0, max(row[f"{key}_rounds"]) - m) for m, row in zip(medians, rows, strict=True)])
        axes.errorbar(ks, medians, yerr=spread, fmt=style, capsize=3, label=label)
    axes.axhline(part["ours_base"]["tokens_per_s"], color="C0", linestyle=":", label="ours, base model only")
    axes.axhline(
        part["hf_static"]["tokens_per_s"], color="C2", linestyle="--", label="HF generate, static batches, base model"
    )
    for k, row in zip(ks, rows, strict=True):
        axes.annotate(
            f"{row['mixed_over_grouped']:.1f}x",
            (k, row["grouped_tokens_per_s"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("distinct adapters in the workload (K)")
    axes.set_ylabel("output tokens/s (median; bars: min-max of rounds)")
    workload = results["settings"]
    axes.set_title(
        f"Throughput vs adapters: {workload['requests']} requests, prompts {workload['prompt_len'][0]}-"
        f"{workload['prompt_len'][1]}, outputs {workload['output_len'][0]}-{workload['output_len'][1]} tokens\n"
        f"{subtitle(results)}",
        fontsize=9,
    )
    axes.legend(fontsize=8, loc="center", bbox_to_anchor=(0.5, 0.7))  # the empty band between the lines
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def latency_plot(results: dict, path: Path) -> Path:
    """TTFT and, beside it, inter-token latency: where the load shows once new prompts are admitted at once."""
    curve = results["server"]["latency_vs_load"]
    rates = [point["rate"] for point in curve]
    capacity = results["server"]["capacity_requests_per_s"]
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.2))
    for axes, key, title in ((panels[0], "ttft_s", "time to first token"), (panels[1], "itl_s", "inter-token latency")):
        for quantile, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-")):
            axes.plot(rates, [point[key][quantile] * 1000 for point in curve], style, label=quantile)
        axes.axvline(capacity, color="grey", linestyle=":", label=f"closed-loop capacity ({capacity:.2f}/s)")
        axes.set_ylim(bottom=0)
        axes.set_xlabel("offered load (Poisson arrivals, requests/s)")
        axes.set_ylabel(f"{title} (ms)")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    spec = curve[0]["spec"]
    figure.suptitle(
        f"Latency vs load over HTTP (streaming /v1/generate): {len(spec['adapters'])} adapters (Zipf {spec['zipf']}, "
        f"{spec['base_share']:.0%} base), prompts {spec['prompt_len'][0]}-{spec['prompt_len'][1]}, outputs "
        f"{spec['output_len'][0]}-{spec['output_len'][1]} tokens\n{subtitle(results)}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_plots(results: dict, json_path: Path) -> list[Path]:
    """The PNGs for one results file, named after it; returns their paths."""
    stem = json_path.with_suffix("")
    paths = [adapters_plot(results, Path(f"{stem}-adapters.png"))]
    if "server" in results:
        paths.append(latency_plot(results, Path(f"{stem}-latency.png")))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).parent / "results" / "compare.json")
    args = parser.parse_args()
    for path in write_plots(json.loads(args.results.read_text()), args.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

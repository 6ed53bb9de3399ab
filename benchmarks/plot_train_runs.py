"""Tables and plots from ``results/gpu/train/train_runs.json`` (the training runs made by
hand on a lent GPU machine with ``python -m dist_sparse_attn.train``; see
benchmarks/README.md for the commands).

    python benchmarks/plot_train_runs.py [--json PATH] [--out DIR]

Prints a markdown table of step time / tokens/s / speed-up vs the dense baselines per
sequence length, and writes ``train_speed.png`` (tokens/s per config) and
``train_quality.png`` (eval loss vs step of the equal-step quality runs).
"""
from __future__ import annotations

import argparse
import json
import os
import re


def _speedup(runs, name, backend):
    """Dense baseline's step time / run ``name``'s, for the dense run of the same GPU
    count and length (``<prefix>_dense_<backend>`` or ``..._dense_dsu_<backend>``)."""
    base = re.sub(r"_(hash\d+.*|qk\d+|dense_.*)$", "", name)
    for cand in (f"{base}_dense_{backend}", f"{base}_dense_dsu_{backend}"):
        if cand in runs and runs[cand].get("median_step_ms"):
            return runs[cand]["median_step_ms"] / runs[name]["median_step_ms"]
    return None


def _fmt(x):
    return f"{x:.2f}" if x else "–"


def table(data) -> str:
    lines = []
    for tag, block in data["runs"].items():
        runs = block["runs"]
        lines.append(f"\n**{tag}**: {block['note']}\n")
        lines.append("| run | GPUs | N | step ms | tokens/s | x dense cuDNN | x dense flash | peak GiB/GPU |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, s in sorted(runs.items(), key=lambda kv: (kv[1]["world"], kv[1]["seq_len"], kv[0])):
            if name.startswith("q_") or s.get("median_step_ms") is None:
                continue
            c, f = _speedup(runs, name, "cudnn"), _speedup(runs, name, "flash")
            lines.append(f"| {name} | {s['world']} | {s['seq_len']} | {s['median_step_ms']:.1f} | "
                         f"{s['tokens_per_s'] / 1e3:.0f}k | {_fmt(c)} | {_fmt(f)} | "
                         f"{s['peak_mem_gib_per_gpu']:.1f} |")
    return "\n".join(lines)


def plots(data, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, block in data["runs"].items():
        for name, s in block["runs"].items():
            if not name.startswith("q_"):
                continue
            ev = [m for m in s["metrics"] if "eval_loss" in m]
            ax.plot([m["step"] for m in ev], [m["eval_loss"] for m in ev], "o-", label=name[2:])
    ax.set_xlabel("step (8192 tokens/step)")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title("GPT-2-small shape, 8k tokens, 1x H100: equal-step quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "train_quality.png"), dpi=120)
    plt.close(fig)

    block = list(data["runs"].values())[0]["runs"]
    groups = {}
    for name, s in block.items():
        if name.startswith("q_") or not s.get("tokens_per_s"):
            continue
        key = f"{s['world']} GPU, N={s['seq_len'] // 1024}k"
        groups.setdefault(key, []).append((name.split("_", 2)[-1], s["tokens_per_s"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4), squeeze=False)
    for ax, (key, vals) in zip(axes[0], sorted(groups.items())):
        vals.sort(key=lambda t: t[1])
        ax.barh([v[0] for v in vals], [v[1] / 1e3 for v in vals])
        ax.set_title(key)
        ax.set_xlabel("tokens/s (k)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "train_speed.png"), dpi=110)
    plt.close(fig)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=os.path.join(here, "results/gpu/train/train_runs.json"))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    data = json.load(open(a.json))
    print(table(data))
    out = a.out or os.path.dirname(a.json)
    os.makedirs(out, exist_ok=True)
    try:
        plots(data, out)
    except ImportError:
        print("(matplotlib missing: no plots)")


if __name__ == "__main__":
    main()

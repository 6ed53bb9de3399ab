"""What the trainer measures and where it goes: model FLOPs and MFU, device memory, time
in Python's garbage collector, the metrics file, DeepSpeed's monitor and the loss plot.

MFU (model FLOPs utilisation, as in nanoGPT, torchtitan and the PaLM paper) is the model
FLOPs a step needs divided by the step time and by the peak bf16 FLOP/s of the devices:

    MFU = tokens/s * flops_per_token / (peak FLOP/s per device * world size)
    flops_per_token = 6 * n_params + attention FLOPs per token

``6 * n_params``: every parameter takes part in one multiply-add (2 FLOPs) per token in
the forward and two in the backward (the embedding table counts once, for the tied
output head). The attention's own FLOPs (QK^T and PV) depend on how many (query, key)
pairs the kernels compute, estimated from the model settings (:func:`attention_pairs`):
dense causal attention over N tokens computes N^2/2 pairs per head, 4 * D FLOPs each
(QK^T and PV, a multiply-add each), so ``2 * N^2 * D * H`` per layer forward and three
times that forward + backward. Hash attention with nb buckets computes ~1/nb of the
pairs (the pairs inside each bucket), its block-local heads the pairs inside each
window, qk attention with keep rate r about r^2 of them, "none" none. Activation
recomputation is not counted (model FLOPs, not hardware FLOPs), so the MFU of a run
with ``activation_checkpointing`` understates how busy the device is.

The peak is the dense (no 2:4 sparsity) bf16 tensor-core FLOP/s of NVIDIA's data sheets,
by device name (:data:`PEAK_BF16_TFLOPS`), or ``train.peak_tflops``; for any other device
MFU is left out, not guessed. An fp32 run is measured against the bf16 peak as well.
"""
from __future__ import annotations

import json
import os
import time

import torch

PEAK_BF16_TFLOPS = (
    # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); the first match wins
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),        # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.4),        # SXM
    ("A100", 312.0),        # SXM4 and PCIe
)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 TFLOP/s of a device by its name (:data:`PEAK_BF16_TFLOPS`); None if unknown."""
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def attention_pairs(mcfg, seq_len: int) -> float:
    """(query, key) pairs the attention of one layer computes over one sequence of
    ``seq_len`` tokens, summed over the query heads (an estimate for the sparse kinds;
    see the module docstring)."""
    n, heads = float(seq_len), mcfg.n_head
    if mcfg.attention == "none":
        return 0.0
    dense = n * n / 2
    if mcfg.attention == "dense":
        return dense * heads
    if mcfg.attention == "qk":
        return dense * mcfg.qk_keep_rate ** 2 * heads
    # hash: the last local_heads kv heads (and the query heads that read them) are
    # block-local, the others hash into n_buckets buckets of ~seq_len / n_buckets tokens
    n_kv = mcfg.n_kv_head or mcfg.n_head
    local = mcfg.local_heads * (heads // n_kv)
    w = mcfg.local_window
    full, rest = divmod(seq_len, w)
    window = (full * w * w + rest * rest) / 2
    return dense / mcfg.n_buckets * (heads - local) + window * local


def flops_per_token(mcfg, n_params: int, seq_len: int) -> float:
    """Model FLOPs of one training token, forward and backward: ``6 * n_params`` plus
    three times the attention's forward FLOPs (4 * head dim per pair), per token."""
    head_dim = mcfg.n_embd // mcfg.n_head
    attention = 3 * 4 * head_dim * attention_pairs(mcfg, seq_len) * mcfg.n_layer / seq_len
    return 6.0 * n_params + attention


def mfu(tokens_per_s: float, flops_token: float, peak_tflops_per_device: float | None,
        world: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a peak."""
    if not peak_tflops_per_device:
        return None
    return tokens_per_s * flops_token / (peak_tflops_per_device * 1e12 * world)


def memory_gib(device: torch.device) -> tuple[float, float] | None:
    """(allocated now, peak allocated) GiB of a CUDA device; None for the CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.memory_allocated(device) / 2 ** 30,
            torch.cuda.max_memory_allocated(device) / 2 ** 30)


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class GcClock:
    """Time spent in Python's cyclic garbage collector (``gc.callbacks``)."""

    def __init__(self):
        self.ms, self.count, self._t0 = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += (time.perf_counter() - self._t0) * 1e3
            self.count += 1
            self._t0 = None

    def take(self) -> tuple[float, int]:
        out = self.ms, self.count
        self.ms, self.count = 0.0, 0
        return out


# metrics.jsonl key -> DeepSpeed monitor tag (TensorBoard, CSV, W&B, Comet)
MONITOR_TAGS = {
    "loss": "Train/loss", "loss_avg": "Train/loss_avg", "lr": "Train/lr",
    "step_ms": "Train/step_ms", "tokens_per_s": "Train/tokens_per_s", "mfu": "Train/mfu",
    "mem_gib": "Train/mem_gib", "peak_mem_gib": "Train/peak_mem_gib",
    "eval_loss": "Eval/loss", "retrieval_accuracy": "Eval/retrieval_accuracy",
}


class MetricsWriter:
    """Rank 0 appends each record to ``out_dir/metrics.jsonl`` and passes its numbers to
    DeepSpeed's monitor (``engine.monitor``: the DeepSpeed JSON's "tensorboard",
    "csv_monitor", "wandb" or "comet" blocks), with the step as x; the other ranks
    write nothing."""

    def __init__(self, out_dir: str, rank: int, monitor=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.rank = rank
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) \
            else None

    def restart(self, history: list):
        """Rewrite the metrics file with ``history`` (a resumed run's records so far).

        Records the file holds beyond it (steps logged after the checkpoint, before a
        crash, or the later steps of a run resumed from an older checkpoint) are not
        lost: the file as it was is first renamed to ``metrics.replaced-at-step<N>.jsonl``
        (N the step resumed from; ``-<k>`` added when that name is taken)."""
        if self.rank != 0:
            return
        text = "".join(json.dumps(r) + "\n" for r in history)
        if os.path.exists(self.path):
            with open(self.path) as f:
                old = f.read()
            if old != text and old.strip():
                step = history[-1].get("step", 0) if history else 0
                base = os.path.join(os.path.dirname(self.path),
                                    f"metrics.replaced-at-step{step}")
                kept, k = base + ".jsonl", 1
                while os.path.exists(kept):
                    kept, k = f"{base}-{k}.jsonl", k + 1
                os.replace(self.path, kept)
        with open(self.path, "w") as f:
            f.write(text)

    def write(self, record: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None:
            events = [(tag, float(record[key]), record["step"])
                      for key, tag in MONITOR_TAGS.items() if record.get(key) is not None]
            if events:
                self.monitor.write_events(events)


def plot_history(metrics_path: str, png_path: str):
    """Train and eval loss vs step (PNG); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train, evals = [], []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append(r)
            elif "eval_loss" in r:
                evals.append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([r["step"] for r in train], [r.get("loss_avg", r["loss"]) for r in train],
                label="train (mean since the previous point)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops", "attention_pairs", "flops_per_token", "mfu",
           "memory_gib", "GcClock", "MetricsWriter", "MONITOR_TAGS", "plot_history"]

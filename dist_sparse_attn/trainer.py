"""The training loop: :class:`Trainer` runs one configured run on an initialised process
group (the DeepSpeed engine, the sequence-parallel groups, steps, evaluation,
checkpoints, metrics). The command line and the process-group start are
:mod:`dist_sparse_attn.train`.

Layout of ``world = dp x sp`` ranks: every rank of a sequence-parallel group holds a
contiguous shard of the same sequences (:func:`dist_sparse_attn.data.shard_bounds`).
DeepSpeed sums gradients over all W ranks and divides by dp, so each rank's loss is its
shard's cross-entropy SUM over the sequence's token count: the sum over a group is the
sequence's mean loss, and the update equals single-device training.

Exact resume: batch t of data-parallel rank d is drawn from a generator seeded by
(seed, t, d) (:func:`dist_sparse_attn.data.train_batch`), the learning rate is a
function of t (:func:`lr_at`), and torch's RNG is re-seeded per step; a DeepSpeed
checkpoint (model, optimizer) plus the step number therefore reproduces the following
steps' losses.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from .checkpoint import checkpoint_layout, load_checkpoint, save_checkpoint
from .config import TrainConfig, run_config
from .data import (TokenData, eval_retrieval, load_data, seeded_generator, shard_bounds,
                   train_batch, val_batch)
from .integrations.ds_groups import SequenceParallelMPU
from .metrics import (GcClock, MetricsWriter, flops_per_token, fmt_rate, fmt_time, memory_gib,
                      mfu, peak_tflops, plot_history)
from . import model as _model
from .model import GPT, GPTConfig


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup to lr, cosine decay to min_lr at the last step."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    frac = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
    return tcfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * (tcfg.lr - tcfg.min_lr)


def build_model(mcfg: GPTConfig, sp: int = 1):
    """The model a config describes: this package's GPT, or (``family="hf"``) a Hugging
    Face Llama with this library's attention (same forward interface)."""
    if mcfg.family == "hf":
        from .integrations.transformers import build_from_config
        return build_from_config(mcfg, sequence_parallel=sp > 1)
    return GPT(mcfg)


def parallelize(model, group, strategy: str):
    """Sequence parallelism for a model of :func:`build_model`, in place (its family's
    ``parallelize``): its forward then takes this rank's shard. Returns the model."""
    if isinstance(model, GPT):
        if strategy == "ds-ulysses":
            from .integrations.deepspeed import ulysses_dense_attention
            strategy = ulysses_dense_attention
        return _model.parallelize(model, group, strategy)
    from .integrations.transformers import parallelize as parallelize_hf
    return parallelize_hf(model, group, strategy)


def describe_run(mcfg: GPTConfig, tcfg: TrainConfig, layout: dict, ds: dict, world: int,
                 cuda: bool, trainer: "Trainer | None" = None) -> str:
    """The plan of a run as ``[train] ...`` lines: layout, model, batch, DeepSpeed,
    optimizer, evaluation, compilation; with ``trainer``, also the parameter count and
    the FLOPs behind the MFU."""
    sp, dp = layout["sp"], layout["dp"]
    n_params = trainer.n_params if trainer else None
    opt = ds.get("optimizer")
    lines = [
        f"world {world} = dp {dp} x sp {sp} ({'NCCL, CUDA' if cuda else 'gloo, CPU'}); "
        f"sp strategy {tcfg.sp_strategy!r}",
        f"model: {mcfg.n_layer} layers, {mcfg.n_head} heads ({mcfg.n_kv_head} kv), d={mcfg.n_embd}, "
        f"attention {mcfg.attention!r}"
        + (f" ({mcfg.n_buckets} buckets)" if mcfg.attention == "hash" else "")
        + (f", {mcfg.local_heads} block-local kv heads (window {mcfg.local_window})"
           if mcfg.local_heads else "")
        + (f" (keep {mcfg.qk_keep_rate:.0%})" if mcfg.attention == "qk" else "")
        + (f", {n_params / 1e6:.2f}M params" if n_params else ""),
        f"batch: {tcfg.micro_batch} x {tcfg.grad_accum} accum x {dp} dp = {ds['train_batch_size']} "
        f"sequences of {tcfg.seq_len} tokens = {ds['train_batch_size'] * tcfg.seq_len} tokens/step; "
        f"{tcfg.seq_len // sp}-{-(-tcfg.seq_len // sp)} tokens per rank",
        f"DeepSpeed: ZeRO {ds.get('zero_optimization', {}).get('stage', 0)}, "
        f"bf16 {ds['bf16']['enabled']}, {tcfg.steps} steps, out {tcfg.out_dir}",
        f"optimizer: {opt['type'] + ' built by DeepSpeed' if opt else 'torch AdamW'} (lr "
        f"{tcfg.lr:g} -> {tcfg.min_lr:g}, warmup {tcfg.warmup}, betas {tuple(tcfg.betas)}, "
        f"weight decay {tcfg.weight_decay:g}); gradient clipping {ds['gradient_clipping']:g}"
        + (" (0: off)" if not ds["gradient_clipping"] else ""),
        "retrieval eval: " + (f"{tcfg.retrieval_samples} sequences of {tcfg.retrieval_len} tokens "
                              f"at the end (train.retrieval_mix {tcfg.retrieval_mix:g})"
                              if tcfg.retrieval_evaluated else
                              "off (train.retrieval_mix = 0: the model is not trained on it)"
                              if tcfg.retrieval_mix == 0 else "off (train.retrieval_samples = 0)"),
    ]
    if trainer is not None:
        lines.append(f"model FLOPs: {trainer.flops_per_token / 1e6:.2f} MFLOP/token; MFU "
                     + (f"against {trainer.peak_tflops:g} TFLOP/s per device"
                        if trainer.peak_tflops else
                        f"not shown (no peak FLOP/s known for {trainer.device_name}: set "
                        "train.peak_tflops)"))
    if mcfg.compile == "blocks":
        lines.append(f"torch.compile (backend {mcfg.compile_backend!r}, default mode, static "
                     f"shapes): each block's ln_1+qkv+RoPE and out-proj+residual+ln_2+MLP, "
                     f"2 graphs shared by the {mcfg.n_layer} blocks; attention, embedding, "
                     f"ln_f, head and loss stay eager")
    if mcfg.compile == "model":
        lines.append(f"torch.compile (backend {mcfg.compile_backend!r}, default mode, static "
                     f"shapes): the whole forward as one graph, attention as the library's "
                     f"custom ops")
    if mcfg.cuda_graph:
        lines.append("CUDA graphs: each training forward and backward replayed from two "
                     "graphs, captured in the first step")
    return "\n".join("[train] " + s for s in lines)


class Trainer:
    """One training run on an initialised process group: the DeepSpeed engine, the
    sequence-parallel groups, the loop, evaluation and checkpoints.

    ``layout``: {"sp", "dp"} (:func:`~dist_sparse_attn.config.check_config`);
    ``ds_config``: the resolved DeepSpeed JSON (:func:`~dist_sparse_attn.config.deepspeed_config`);
    ``resume``: a checkpoint tag already checked by
    :func:`~dist_sparse_attn.checkpoint.resolve_checkpoint` (on every rank), or None;
    ``data``: the :func:`~dist_sparse_attn.data.load_data` corpus (loaded here when None)."""

    def __init__(self, mcfg: GPTConfig, tcfg: TrainConfig, layout: dict, ds_config: dict,
                 cuda: bool, resume: str | None = None, data: TokenData | None = None):
        import deepspeed
        self.mcfg, self.tcfg, self.cuda = mcfg, tcfg, cuda
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sp, self.dp = layout["sp"], layout["dp"]
        self.sp_rank, self.dp_rank = self.rank % self.sp, self.rank // self.sp
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.data = data if data is not None else load_data(tcfg)
        torch.manual_seed(tcfg.seed)          # identical initial weights on every rank
        model = build_model(mcfg, self.sp)
        self.n_params = model.get_num_params()
        # AdamW over the model's weight-decay groups: torch's, or DeepSpeed's when the JSON
        # has an "optimizer" (which config.deepspeed_config checked against [train])
        optimizer = model.configure_optimizers(tcfg.weight_decay, tcfg.lr, tcfg.betas,
                                               device_type=self.device.type)
        groups = None
        if "optimizer" in ds_config:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                      for g in optimizer.param_groups]
            optimizer = None
        # Every group gets the run's collective timeout: torch gives a new group its own
        # default (30 min for gloo, 10 for NCCL), so a stalled rank would hang the others
        # in an all-to-all. The mpu is passed with sp = 1 too: without one, DeepSpeed
        # clones the world group for the gradient all-reduce, with that default.
        mpu = SequenceParallelMPU(self.sp, timeout=datetime.timedelta(minutes=tcfg.timeout_min))
        self.sp_group = mpu.get_sequence_parallel_group() if self.sp > 1 else None
        parallelize(model, self.sp_group, tcfg.sp_strategy)     # attention over the sp group
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups, config=ds_config, mpu=mpu)
        if self.sp > 1:
            self.sp_rank = dist.get_rank(self.sp_group)
            self.dp_rank = mpu.get_data_parallel_rank()
        self.lo, self.hi = shard_bounds(tcfg.seq_len, self.sp_rank, self.sp)
        # one device: None = the model's default arange(N), which lets the block-local
        # heads use the counting sort (a promise the model cannot check for given positions)
        self.positions = (torch.arange(self.lo, self.hi, device=self.device)
                          if self.sp > 1 else None)
        # DeepSpeed 0.19.8's ZeRO-3 averages the gradients of replicated parameters over the
        # whole dp x sp grid (ZeRO 0-2 sum them and divide by dp): scale the loss given to
        # backward by sp so every stage makes the single-device update
        # (tests/train/test_train.py checks the losses against a one-process run).
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.backward_scale = float(self.sp) if zero == 3 and self.sp > 1 else 1.0
        self.ckpt_dir = os.path.join(tcfg.out_dir, "checkpoints")
        # what each checkpoint records: the layout a resume must match, and the whole
        # configuration, which a resume compares with its own (train.resume_changes)
        self.layout = {**checkpoint_layout(mcfg, layout, ds_config),
                       "config": run_config(mcfg, tcfg, ds_config, self.world)}
        self.device_name = torch.cuda.get_device_name() if cuda else "cpu"
        self.flops_per_token = flops_per_token(mcfg, self.n_params, tcfg.seq_len)
        self.peak_tflops = tcfg.peak_tflops or peak_tflops(self.device_name if cuda else None)
        self.metrics = MetricsWriter(tcfg.out_dir, self.rank, getattr(self.engine, "monitor", None))
        self.step, self.history = 0, []
        if resume:
            self._resume(resume)

    # -- one step ---------------------------------------------------------------------------

    def _loss(self, x, y):
        """This rank's share of the mean loss: CE sum over its shard / all tokens of the
        micro-batch (see the module docstring)."""
        xs = x[:, self.lo:self.hi].to(self.device, non_blocking=True)
        ys = y[:, self.lo:self.hi].to(self.device, non_blocking=True)
        # the model's mean CE over this shard (computed chunk by chunk with
        # model.loss_chunk, never as whole-sequence logits), times the shard's tokens
        _, loss = self.engine(xs, ys, positions=self.positions)
        return loss * (ys.numel() / y.numel())

    def _mean_over_world(self, local: torch.Tensor) -> float:
        """Sum over the world / dp: the mean over the global batch of per-sequence losses."""
        t = local.detach().float().reshape(1).clone()
        dist.all_reduce(t)
        return float(t) / self.dp

    def train_step(self) -> float:
        t = self.tcfg
        torch.manual_seed(t.seed * 1000003 + self.step * self.world + self.rank)   # dropout
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        acc = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x, y = train_batch(self.data, t, self.step, micro, self.dp_rank)
            loss = self._loss(x, y)
            self.engine.backward(loss * self.backward_scale if self.backward_scale != 1 else loss)
            self.engine.step()
            acc += loss.detach() / t.grad_accum
        self.step += 1
        return self._mean_over_world(acc)

    def _profiled_step(self) -> float:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with profile(activities=acts, profile_memory=True) as prof:
            loss = self.train_step()
            if self.cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        mem = "self_cuda_memory_usage" if self.cuda else "self_cpu_memory_usage"
        table = prof.key_averages()
        with open(os.path.join(self.tcfg.out_dir, f"profile_rank{self.rank}.txt"), "w") as f:
            f.write(table.table(sort_by=key, row_limit=40))
            # where the memory goes: operators by the memory they allocate (net of frees)
            f.write(f"\n\nBy allocated memory ({mem}):\n")
            f.write(table.table(sort_by=mem, row_limit=25))
            if self.cuda:
                f.write(f"\npeak allocated during the step: "
                        f"{torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f} GiB\n")
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        acc = torch.zeros((), device=self.device)
        for i in range(self.tcfg.eval_iters):
            x, y = val_batch(self.data, self.tcfg, i, self.dp_rank)
            acc += self._loss(x, y) / self.tcfg.eval_iters
        self.engine.train()
        return self._mean_over_world(acc)

    def evaluate_retrieval(self) -> float:
        """Accuracy on the planted-key retrieval task
        (:func:`~dist_sparse_attn.data.eval_retrieval`); the answer is read from the last
        position, which the last rank of each SP group holds. Every data-parallel group
        runs the same batches (counted once per group, hence / dp): ZeRO-3 gathers
        parameters over all ranks, so every rank must run the same number of forwards."""
        t = self.tcfg
        acc = eval_retrieval(self.engine, t.retrieval_samples, t.retrieval_len, t.micro_batch,
                             generator=seeded_generator(t.seed, 3), device=self.device,
                             shard=(self.sp_rank, self.sp))
        total = torch.tensor([acc or 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.dp

    # -- checkpoints --------------------------------------------------------------------------

    def save(self):
        """A checkpoint of this step (:func:`~dist_sparse_attn.checkpoint.save_checkpoint`)."""
        if self.tcfg.save_checkpoint:
            save_checkpoint(self.engine, self.ckpt_dir, f"step{self.step:07d}", self.layout,
                            self.step, {"step": self.step, "history": self.history})

    def _resume(self, tag: str):
        path, state = load_checkpoint(self.engine, self.ckpt_dir, tag)
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        self.metrics.restart(self.history)     # the file restarts from the saved history
        if self.rank == 0:
            print(f"[train] resumed from {path} at step {self.step}", flush=True)

    # -- the loop -----------------------------------------------------------------------------

    def log(self, record: dict):
        self.history.append(record)
        self.metrics.write(record)

    def run(self) -> dict:
        clock = GcClock()       # time in Python's cyclic GC per step (metrics, summary)
        gc.callbacks.append(clock)
        try:
            return self._run(clock)
        finally:
            gc.callbacks.remove(clock)

    def _progress(self, rec: dict, timed: bool, mean_dt: float) -> str:
        t = self.tcfg
        done = self.step / t.steps
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        parts = [f"[train] step {self.step:>6}/{t.steps} [{bar}] loss {rec['loss_avg']:.4f}",
                 f"{fmt_rate(rec['tokens_per_s'])} tok/s"]
        if rec.get("mfu") is not None:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        if rec.get("mem_gib") is not None:
            parts.append(f"mem {rec['mem_gib']:.2f} GiB (peak {rec['peak_mem_gib']:.2f})")
        parts += [f"{mean_dt * 1e3:.0f} ms/step",
                  f"ETA {fmt_time((t.steps - self.step) * mean_dt) if timed else '--'}"]
        return " | ".join(parts)

    def _run(self, clock: GcClock) -> dict:
        t = self.tcfg
        tokens_per_step = t.micro_batch * t.grad_accum * self.dp * t.seq_len
        step_times, gc_times, last_loss, eval_loss = [], [], float("nan"), None
        since_log = []          # losses since the last log line (the line shows their mean)
        t_start = time.perf_counter()
        first = self.step
        while self.step < t.steps:
            if self.cuda:
                torch.cuda.synchronize()
            clock.take()            # collections outside the step (eval, logging) not counted
            t0 = time.perf_counter()
            profiled = t.profile and self.step == first + t.warmup_steps_excluded
            if profiled:
                loss = self._profiled_step()
            else:
                loss = self.train_step()    # the all_reduce inside synchronises the ranks
            dt = time.perf_counter() - t0
            gc_ms, _ = clock.take()
            # the profiled step (the profiler slows it) is not a timed step either
            if self.step - first > t.warmup_steps_excluded and not profiled:
                step_times.append(dt)
                gc_times.append(gc_ms)
            last_loss = loss
            since_log.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            # the ETA and rates come from timed steps only: the first steps (compilation,
            # allocator warmup, train.warmup_steps_excluded) would inflate the ETA
            timed = bool(step_times)
            mean_dt = statistics.fmean(step_times[-20:]) if timed else dt
            if self.step % t.log_interval == 0 or self.step == t.steps or self.step == first + 1:
                avg = statistics.fmean(since_log)
                since_log = []
                tps = tokens_per_step / mean_dt
                rec = {"step": self.step, "loss": loss, "loss_avg": avg, "lr": lr_at(self.step - 1, t),
                       "step_ms": dt * 1e3, "gc_ms": gc_ms, "tokens_per_s": tps}
                util = mfu(tps, self.flops_per_token, self.peak_tflops, self.world)
                if util is not None:
                    rec["mfu"] = util
                mem = memory_gib(self.device)
                if mem is not None:
                    rec["mem_gib"], rec["peak_mem_gib"] = mem
                self.log(rec)
                if self.rank == 0:
                    print(self._progress(rec, timed, mean_dt), flush=True)
            if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.steps:
                eval_loss = self.evaluate()
                self.log({"step": self.step, "eval_loss": eval_loss})
                if self.rank == 0:
                    print(f"[train] step {self.step:>6}: eval loss {eval_loss:.4f}", flush=True)
            if t.checkpoint_interval and self.step % t.checkpoint_interval == 0 \
                    and self.step != t.steps:
                self.save()
        if self.step > first:
            self.save()
        # a model never trained on the retrieval task (retrieval_mix 0) is not evaluated on it
        retrieval = self.evaluate_retrieval() if t.retrieval_evaluated else None
        if retrieval is not None:
            self.metrics.write({"step": self.step, "retrieval_accuracy": retrieval})
        if eval_loss is None:
            eval_loss = self.evaluate()
        wall = time.perf_counter() - t_start
        mem = None
        if self.cuda:
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mem = float(peak)
        med = statistics.median(step_times) if step_times else None
        tps = tokens_per_step / med if med else None
        summary = {
            "steps": self.step, "steps_this_run": self.step - first,
            "final_train_loss": last_loss, "final_eval_loss": eval_loss,
            "retrieval_accuracy": retrieval, "wall_s": wall,
            "timed_steps": len(step_times),
            "median_step_ms": med * 1e3 if med else None,
            "mean_step_ms": statistics.fmean(step_times) * 1e3 if step_times else None,
            "gc_ms_per_step": statistics.fmean(gc_times) if gc_times else None,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tps,
            "flops_per_token": self.flops_per_token, "peak_tflops_per_device": self.peak_tflops,
            "mfu": mfu(tps, self.flops_per_token, self.peak_tflops, self.world) if tps else None,
            "peak_mem_gib_per_gpu": mem, "n_params": self.n_params,
            "world": self.world, "sp": self.sp, "dp": self.dp,
            "device": self.device_name,
            "attention": self.mcfg.attention, "seq_len": t.seq_len,
        }
        if self.rank == 0:
            with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_history(os.path.join(t.out_dir, "metrics.jsonl"),
                         os.path.join(t.out_dir, "loss.png"))
            ret = "" if retrieval is None else f", retrieval accuracy {retrieval:.2f}"
            print(f"[train] done: {self.step} steps in {fmt_time(wall)}, "
                  f"last step's loss {last_loss:.4f}, "
                  f"eval loss {eval_loss:.4f}{ret}"
                  + (f", {fmt_rate(tps)} tok/s, median step {summary['median_step_ms']:.1f} ms"
                     if tps else "")
                  + (f", MFU {100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else "")
                  + (f", peak memory {mem:.2f} GiB/GPU" if mem else "")
                  + f"; outputs in {t.out_dir}", flush=True)
        return summary


__all__ = ["Trainer", "build_model", "lr_at", "describe_run"]

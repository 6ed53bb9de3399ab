"""Train the GPT of :mod:`dist_sparse_attn.model` with DeepSpeed: the library's main job.

    python -m dist_sparse_attn.train --config configs/tiny.toml                 # 1 process
    deepspeed --num_gpus 2 -m dist_sparse_attn.train --config configs/tiny.toml  # launcher
    torchrun --nproc_per_node 2 -m dist_sparse_attn.train --config ...          # or torchrun
    mpirun -n 2 python -m dist_sparse_attn.train --config ...                   # or MPI
    launch/train.sh [config] [--set key=value ...]                             # picks one

A run is described by a TOML preset (``configs/*.toml``: a ``[model]`` table of
:class:`~dist_sparse_attn.model.GPTConfig` fields and a ``[train]`` table of
:class:`TrainConfig` fields) plus a DeepSpeed JSON (``configs/ds/*.json``: ZeRO
stage, precision, clipping). ``--set section.field=value`` overrides either
table from the command line. Batch sizes and the sequence-parallel mesh are
written into the DeepSpeed config here, from the preset and the world size:

    world W = data-parallel dp  x  sequence-parallel sp
    train_batch_size = micro_batch * grad_accum * dp
    tokens per optimizer step = train_batch_size * seq_len

Every rank of a sequence-parallel group holds a contiguous shard of the same
sequences (:func:`dist_sparse_attn.data.shard_sequence`); the group comes from
DeepSpeed's device mesh (``sequence_parallel_size`` / ``data_parallel_size``).
DeepSpeed sums gradients over all W ranks and divides by dp, so each rank's loss
is its shard's cross-entropy SUM over the sequence's token count: the sum over a
group is the sequence's mean loss, and the update equals single-device training.

Exact resume: batch t of data-parallel rank d is drawn from a generator seeded by
(seed, t, d), the learning rate is a function of t, and torch's RNG is re-seeded
per step; a DeepSpeed checkpoint (model, optimizer) plus the step number therefore
reproduces the following steps' losses.

Outputs in ``out_dir``: ``metrics.jsonl`` (one JSON per log/eval line),
``summary.json``, ``loss.png``, ``config.json`` (the resolved configuration) and
``checkpoints/`` (DeepSpeed's format, ``latest`` names the newest).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import TokenData, load_bin, load_text, retrieval_batch, shard_bounds, stdlib_corpus
from .integrations.ds_groups import SequenceParallelMPU
from . import model as _model
from .model import ATTENTIONS, GPT, SP_STRATEGIES, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """A configuration that cannot run (message says what and how to fix it)."""


@dataclass
class TrainConfig:
    data: str = "stdlib"
    """"stdlib" (this Python's standard library sources, byte-level: exists on every
    machine), a text file (bytes), or a nanoGPT-style token ``.bin`` (uint16)."""
    max_bytes: int = 4_000_000
    """For "stdlib" and text files: read at most this many bytes."""
    val_fraction: float = 0.1
    """The last fraction of the tokens is the validation split."""
    seq_len: int = 1024
    """Tokens per training sequence (the whole sequence, before sequence-parallel sharding)."""
    micro_batch: int = 1
    """Sequences per data-parallel rank per micro-step (DeepSpeed's micro batch)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    steps: int = 200
    """Optimizer steps."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    """Linear warmup steps, then cosine decay from lr to min_lr at ``steps``."""
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    sequence_parallel: int = 0
    """Ranks per sequence-parallel group sp (must divide the world size); 0 = all ranks."""
    sp_strategy: str = "bucket"
    """"bucket", "ulysses", "allgather" or "ds-ulysses" (see :mod:`dist_sparse_attn.model`)."""
    deepspeed_config: str = "configs/ds/zero1.json"
    """DeepSpeed JSON (relative paths: to the current directory, then the repository)."""
    precision: str = "auto"
    """"auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"; written into the DeepSpeed config."""
    eval_interval: int = 50
    """Evaluate the validation loss every this many steps (and at the end); 0 = only at the end."""
    eval_iters: int = 4
    """Validation batches per evaluation (the same batches every time)."""
    retrieval_mix: float = 0.0
    """Fraction of training sequences replaced by the synthetic retrieval task
    (:func:`dist_sparse_attn.data.retrieval_batch`), so the model can learn it."""
    retrieval_samples: int = 32
    """Retrieval-eval sequences at the end (0 = skip); accuracy of the planted digit."""
    retrieval_seq_len: int = 0
    """Length of retrieval-eval sequences; 0 = seq_len."""
    log_interval: int = 10
    checkpoint_interval: int = 0
    """Save a DeepSpeed checkpoint every this many steps (and at the end); 0 = only at the end."""
    save_checkpoint: bool = True
    seed: int = 1337
    out_dir: str = "runs/default"
    timeout_min: float = 10.0
    """Collective timeout: a rank that dies or stalls makes the others fail after this."""
    warmup_steps_excluded: int = 2
    """Steps left out of the step-time statistics (compilation, allocator warmup)."""
    profile: bool = False
    """Profile one step after the excluded warmup steps (torch.profiler) and write the
    top operators by device time, then by allocated memory, and the step's peak memory
    to ``out_dir/profile_rank<r>.txt`` (where the step and the memory go)."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

def _find(path: str) -> str:
    if os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(REPO, path)
    return alt if os.path.exists(alt) else path


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, int) or current is None and text.lstrip("-").isdigit():
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        return tuple(float(t) for t in text.strip("()[]").split(","))
    return text


def load_config(path: str | None, overrides=()) -> tuple[GPTConfig, TrainConfig]:
    """Read a TOML preset and apply ``section.field=value`` overrides.

    Unknown sections, fields or bad values raise :class:`ConfigError` naming them."""
    import tomllib
    raw = {"model": {}, "train": {}}
    if path:
        with open(_find(path), "rb") as f:
            loaded = tomllib.load(f)
        for sec in loaded:
            if sec not in raw:
                raise ConfigError(f"{path}: unknown section [{sec}] (expected [model], [train])")
            raw[sec].update(loaded[sec])
    fields = {"model": {f.name: f for f in dataclasses.fields(GPTConfig)},
              "train": {f.name: f for f in dataclasses.fields(TrainConfig)}}
    defaults = {"model": GPTConfig(), "train": TrainConfig()}
    for item in overrides:
        key, sep, value = item.partition("=")
        sec, dot, name = key.partition(".")
        if not sep or not dot or sec not in raw:
            raise ConfigError(f"--set expects section.field=value with section model or train, "
                              f"got {item!r}")
        if name not in fields[sec]:
            raise ConfigError(f"--set {item!r}: [{sec}] has no field {name!r}; fields: "
                              f"{', '.join(fields[sec])}")
        try:
            raw[sec][name] = _parse_value(value, getattr(defaults[sec], name))
        except ValueError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
    for sec in raw:
        unknown = set(raw[sec]) - set(fields[sec])
        if unknown:
            raise ConfigError(f"[{sec}] has unknown field(s) {sorted(unknown)}; fields: "
                              f"{', '.join(fields[sec])}")
    if "betas" in raw["train"]:
        raw["train"]["betas"] = tuple(raw["train"]["betas"])
    if raw["model"].get("attention", "dense") not in ATTENTIONS:
        raise ConfigError(f"model.attention must be one of {ATTENTIONS}, "
                          f"got {raw['model']['attention']!r}")
    train = TrainConfig(**raw["train"])
    raw["model"].setdefault("seq_len", train.seq_len)
    try:
        model = GPTConfig(**raw["model"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[model]: {e}") from None
    return model, train


def check_config(mcfg: GPTConfig, tcfg: TrainConfig, world: int) -> dict:
    """Validate against the world size; returns the parallel layout {sp, dp}."""
    sp = tcfg.sequence_parallel or world
    if sp < 1 or world % sp:
        raise ConfigError(f"train.sequence_parallel={tcfg.sequence_parallel} must divide the "
                          f"world size {world} (0 = all {world} ranks)")
    if tcfg.sp_strategy not in SP_STRATEGIES:
        raise ConfigError(f"train.sp_strategy must be one of {SP_STRATEGIES}, "
                          f"got {tcfg.sp_strategy!r}")
    if tcfg.seq_len < sp:
        raise ConfigError(f"train.seq_len={tcfg.seq_len} is shorter than the sequence-parallel "
                          f"size {sp}: every rank needs at least one token")
    if sp > 1 and tcfg.sp_strategy in ("ulysses", "ds-ulysses"):
        if mcfg.n_kv_head % sp or mcfg.n_head % sp:
            raise ConfigError(f"sp_strategy={tcfg.sp_strategy!r} splits heads over the "
                              f"{sp} ranks: n_head={mcfg.n_head} and n_kv_head={mcfg.n_kv_head} "
                              f"must be multiples of {sp} (strategy 'bucket' has no such rule)")
        if tcfg.seq_len % sp:
            raise ConfigError(f"sp_strategy={tcfg.sp_strategy!r} needs equal shards: "
                              f"seq_len={tcfg.seq_len} must be a multiple of {sp}")
    if tcfg.sp_strategy == "ds-ulysses" and mcfg.attention != "dense":
        raise ConfigError("sp_strategy='ds-ulysses' is the dense baseline (DeepSpeed-Ulysses "
                          "over SDPA): use it with model.attention='dense'")
    for name in ("steps", "micro_batch", "grad_accum"):
        if getattr(tcfg, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(tcfg, name)}")
    if tcfg.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {tcfg.precision!r}")
    if not 0.0 <= tcfg.retrieval_mix < 1.0:
        raise ConfigError(f"train.retrieval_mix must be in [0, 1), got {tcfg.retrieval_mix}")
    if mcfg.vocab_size < 256 and tcfg.data == "stdlib":
        raise ConfigError("the stdlib corpus is byte-level: model.vocab_size must be >= 256")
    return {"sp": sp, "dp": world // sp}


def deepspeed_config(tcfg: TrainConfig, layout: dict, cuda: bool) -> dict:
    """The DeepSpeed JSON with the batch arithmetic, precision and SP mesh filled in."""
    path = _find(tcfg.deepspeed_config)
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: no file {tcfg.deepspeed_config!r}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    sp, dp = layout["sp"], layout["dp"]
    ds["train_micro_batch_size_per_gpu"] = tcfg.micro_batch
    ds["gradient_accumulation_steps"] = tcfg.grad_accum
    ds["train_batch_size"] = tcfg.micro_batch * tcfg.grad_accum * dp
    bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and cuda)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    # the SP/DP groups come from an mpu (integrations.ds_groups), not from DeepSpeed's
    # "sequence_parallel_size" mesh, which does not reduce gradients across SP ranks
    for key in ("sequence_parallel_size", "data_parallel_size"):
        if key in ds and ds.pop(key) not in (None, sp if key[0] == "s" else dp):
            raise ConfigError(f"{path}: {key} disagrees with train.sequence_parallel={sp} on "
                              f"this world (dp={dp}); set train.sequence_parallel instead")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_compile(mcfg: GPTConfig, ds: dict, sp: int = 1):
    """model.compile="blocks" needs ZeRO 0-2: ZeRO-3 gathers each submodule's parameters
    in forward hooks that are ``torch.compiler.disable``d, so every compiled block breaks
    into pieces at each Linear and LayerNorm, and dynamo recompiles DeepSpeed's own hooks
    until it hits its recompile limit (measured on CPU, DeepSpeed 0.19.8): correct but
    slower than eager, the opposite of the option's purpose."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if mcfg.compile != "off" and stage == 3:
        raise ConfigError(f"model.compile={mcfg.compile!r} does not work with ZeRO-3 (its "
                          "parameter hooks break every compiled region): use ZeRO 0-2 "
                          "(train.deepspeed_config) or model.compile='off'")
    if mcfg.compile == "model" and sp > 1:
        raise ConfigError("model.compile='model' compiles the single-device forward; with "
                          f"sequence parallelism (sp={sp}) use model.compile='blocks'")


# ---------------------------------------------------------------------------------------------
# distributed setup
# ---------------------------------------------------------------------------------------------

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cuda: bool, timeout_min: float):
    """Start torch.distributed through DeepSpeed: env:// under torchrun and the deepspeed
    launcher; under mpirun DeepSpeed's MPI discovery (mpi4py) supplies rank, world size
    and the master address; a plain ``python`` run becomes a world of one."""
    import deepspeed
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched and not any(v in os.environ for v in _MPI_VARS):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if cuda:    # bind the GPU before NCCL starts (LOCAL_RANK is set by every launcher)
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK",
                                                                  os.environ.get("MPI_LOCALRANKID", 0))))
        torch.cuda.set_device(local % torch.cuda.device_count())
    # under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to distributed_port: pass the
    # caller's, or two jobs on one host would both take 29500
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(minutes=timeout_min))
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def load_tokens(tcfg: TrainConfig):
    if tcfg.data == "stdlib":
        return stdlib_corpus(tcfg.max_bytes)
    path = _find(tcfg.data)
    if not os.path.exists(path):
        raise ConfigError(f"train.data: no file {tcfg.data!r} (use 'stdlib', a text file or a .bin)")
    if path.endswith(".bin"):
        return load_bin(path)
    return load_text(path, tcfg.max_bytes)


def _generator(*key) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (stable across runs and processes)."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def train_batch(data: TokenData, tcfg: TrainConfig, step: int, micro: int, dp_rank: int):
    """Micro-batch ``micro`` of optimizer step ``step`` for data-parallel rank ``dp_rank``:
    x, y (micro_batch, seq_len) int64 on the CPU, the same on every rank of an SP group."""
    g = _generator(tcfg.seed, 1, step, micro, dp_rank)
    x, y = data.batch("train", tcfg.seq_len, tcfg.micro_batch, generator=g)
    if tcfg.retrieval_mix > 0:
        swap = torch.rand(tcfg.micro_batch, generator=g) < tcfg.retrieval_mix
        if swap.any():
            r, _, _ = retrieval_batch(int(swap.sum()), tcfg.seq_len + 1, generator=g)
            x[swap], y[swap] = r[:, :-1], r[:, 1:]
    return x, y


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup to lr, cosine decay to min_lr at the last step."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    frac = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
    return tcfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * (tcfg.lr - tcfg.min_lr)


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Trainer:

    def __init__(self, mcfg: GPTConfig, tcfg: TrainConfig, layout: dict, ds_config: dict,
                 cuda: bool, resume: str | None):
        import deepspeed
        self.mcfg, self.tcfg, self.cuda = mcfg, tcfg, cuda
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sp, self.dp = layout["sp"], layout["dp"]
        self.sp_rank, self.dp_rank = self.rank % self.sp, self.rank // self.sp
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.data = TokenData(load_tokens(tcfg), tcfg.val_fraction)
        if len(self.data.splits["val"]) < tcfg.seq_len + 1:
            raise ConfigError(f"the validation split has {len(self.data.splits['val'])} tokens, "
                              f"fewer than seq_len + 1 = {tcfg.seq_len + 1}: use more data "
                              "(train.max_bytes) or a shorter seq_len")
        torch.manual_seed(tcfg.seed)          # identical initial weights on every rank
        model = GPT(mcfg)
        self.n_params = model.get_num_params()
        optimizer = model.configure_optimizers(tcfg.weight_decay, tcfg.lr, tcfg.betas,
                                               device_type=self.device.type)
        mpu = SequenceParallelMPU(self.sp) if self.sp > 1 else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
        self.sp_group = None
        if self.sp > 1:
            from .integrations.deepspeed import deepspeed_sequence_parallel_group
            self.sp_group = deepspeed_sequence_parallel_group(self.engine)
            if self.sp_group is None or dist.get_world_size(self.sp_group) != self.sp:
                raise RuntimeError("DeepSpeed did not set up the sequence-parallel group")
            self.sp_rank = dist.get_rank(self.sp_group)
            self.dp_rank = mpu.get_data_parallel_rank()
        self.lo, self.hi = shard_bounds(tcfg.seq_len, self.sp_rank, self.sp)
        # one device: None = the model's default arange(N), which lets the block-local
        # heads use the counting sort (a promise the model cannot check for given positions)
        self.positions = (torch.arange(self.lo, self.hi, device=self.device)
                          if self.sp > 1 else None)
        # DeepSpeed 0.19.8's ZeRO-3 averages the gradients of replicated parameters over the
        # whole dp x sp grid (ZeRO 0-2 sum them and divide by dp): scale the loss given to
        # backward by sp so every stage makes the single-device update (tests/test_train.py
        # checks the losses against a one-process run).
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.backward_scale = float(self.sp) if zero == 3 and self.sp > 1 else 1.0
        self.ckpt_dir = os.path.join(tcfg.out_dir, "checkpoints")
        self.step, self.history = 0, []
        if resume:
            self._resume(resume)

    # -- one step ---------------------------------------------------------------------------

    def _loss(self, x, y):
        """This rank's share of the mean loss: CE sum over its shard / all tokens of the
        micro-batch (see the module docstring); also the local sum for logging."""
        xs = x[:, self.lo:self.hi].to(self.device, non_blocking=True)
        ys = y[:, self.lo:self.hi].to(self.device, non_blocking=True)
        logits, _ = self.engine(xs, positions=self.positions, sp_group=self.sp_group,
                                sp_strategy=self.tcfg.sp_strategy)
        total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ys.reshape(-1),
                                reduction="sum")
        return total / y.numel()

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
            g = _generator(self.tcfg.seed, 2, i, self.dp_rank)
            x, y = self.data.batch("val", self.tcfg.seq_len, self.tcfg.micro_batch, generator=g)
            acc += self._loss(x, y) / self.tcfg.eval_iters
        self.engine.train()
        return self._mean_over_world(acc)

    @torch.no_grad()
    def evaluate_retrieval(self) -> float:
        """Accuracy on the planted-key retrieval task; the answer is read from the
        last position, which the last rank of each SP group holds. Every data-parallel
        group runs the same batches (counted once per group, hence / dp): ZeRO-3 gathers
        parameters over all ranks, so every rank must run the same number of forwards."""
        n = self.tcfg.retrieval_samples
        L = self.tcfg.retrieval_seq_len or self.tcfg.seq_len
        lo, hi = shard_bounds(L, self.sp_rank, self.sp)
        pos = torch.arange(lo, hi, device=self.device) if self.sp > 1 else None
        self.engine.eval()
        correct = torch.zeros((), device=self.device)
        for i in range(0, n, self.tcfg.micro_batch):
            b = min(self.tcfg.micro_batch, n - i)
            x, value, _ = retrieval_batch(b, L, generator=_generator(self.tcfg.seed, 3, i))
            logits, _ = self.engine(x[:, lo:hi].to(self.device), positions=pos,
                                    sp_group=self.sp_group, sp_strategy=self.tcfg.sp_strategy)
            if self.sp_rank == self.sp - 1:
                correct += (logits[:, -1].argmax(-1).cpu() == value).sum().to(correct)
        self.engine.train()
        dist.all_reduce(correct)
        return float(correct) / self.dp / n

    # -- checkpoints --------------------------------------------------------------------------

    def save(self):
        if not self.tcfg.save_checkpoint:
            return
        self.engine.save_checkpoint(self.ckpt_dir, tag=f"step{self.step:07d}",
                                    client_state={"step": self.step, "history": self.history})

    def _resume(self, tag):
        if tag == "latest":
            if not os.path.exists(os.path.join(self.ckpt_dir, "latest")):
                raise ConfigError(f"--resume: no checkpoint in {self.ckpt_dir} (no 'latest' file)")
            tag = None
        elif not os.path.isdir(os.path.join(self.ckpt_dir, tag)):
            have = sorted(os.listdir(self.ckpt_dir)) if os.path.isdir(self.ckpt_dir) else []
            raise ConfigError(f"--resume {tag}: no such checkpoint in {self.ckpt_dir} "
                              f"(have: {', '.join(d for d in have if d != 'latest') or 'none'})")
        path, state = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load a checkpoint from {self.ckpt_dir}")
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        if self.rank == 0:     # the metrics file restarts from the checkpoint's history
            with open(os.path.join(self.tcfg.out_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            print(f"[train] resumed from {path} at step {self.step}", flush=True)

    # -- the loop -----------------------------------------------------------------------------

    def log(self, record: dict):
        self.history.append(record)
        if self.rank == 0:
            with open(os.path.join(self.tcfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def run(self) -> dict:
        clock = _GcClock()      # time in Python's cyclic GC per step (metrics, summary)
        gc.callbacks.append(clock)
        try:
            return self._run(clock)
        finally:
            gc.callbacks.remove(clock)

    def _run(self, clock: "_GcClock") -> dict:
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
            if t.profile and self.step == first + t.warmup_steps_excluded:
                loss = self._profiled_step()
            else:
                loss = self.train_step()    # the all_reduce inside synchronises the ranks
            dt = time.perf_counter() - t0
            gc_ms, _ = clock.take()
            if self.step - first > t.warmup_steps_excluded:
                step_times.append(dt)
                gc_times.append(gc_ms)
            last_loss = loss
            since_log.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            recent = step_times[-20:] or [dt]
            mean_dt = statistics.fmean(recent)
            if self.step % t.log_interval == 0 or self.step == t.steps or self.step == first + 1:
                avg = statistics.fmean(since_log)
                since_log = []
                rec = {"step": self.step, "loss": loss, "loss_avg": avg, "lr": lr_at(self.step - 1, t),
                       "step_ms": dt * 1e3, "gc_ms": gc_ms, "tokens_per_s": tokens_per_step / mean_dt}
                self.log(rec)
                if self.rank == 0:
                    done = self.step / t.steps
                    bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
                    print(f"[train] step {self.step:>6}/{t.steps} [{bar}] loss {avg:.4f} | "
                          f"{_fmt_rate(tokens_per_step / mean_dt)} tok/s | {mean_dt * 1e3:.0f} ms/step"
                          f" | ETA {_fmt_time((t.steps - self.step) * mean_dt)}", flush=True)
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
        retrieval = self.evaluate_retrieval() if t.retrieval_samples else None
        if eval_loss is None:
            eval_loss = self.evaluate()
        wall = time.perf_counter() - t_start
        mem = None
        if self.cuda:
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mem = float(peak)
        med = statistics.median(step_times) if step_times else None
        summary = {
            "steps": self.step, "steps_this_run": self.step - first,
            "final_train_loss": last_loss, "final_eval_loss": eval_loss,
            "retrieval_accuracy": retrieval, "wall_s": wall,
            "median_step_ms": med * 1e3 if med else None,
            "mean_step_ms": statistics.fmean(step_times) * 1e3 if step_times else None,
            "gc_ms_per_step": statistics.fmean(gc_times) if gc_times else None,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / med if med else None,
            "peak_mem_gib_per_gpu": mem, "n_params": self.n_params,
            "world": self.world, "sp": self.sp, "dp": self.dp,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
            "attention": self.mcfg.attention, "seq_len": t.seq_len,
        }
        if self.rank == 0:
            with open(os.path.join(t.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_history(os.path.join(t.out_dir, "metrics.jsonl"),
                         os.path.join(t.out_dir, "loss.png"))
            ret = "" if retrieval is None else f", retrieval accuracy {retrieval:.2f}"
            tps = summary["tokens_per_s"]
            print(f"[train] done: {self.step} steps in {_fmt_time(wall)}, train loss {last_loss:.4f}, "
                  f"eval loss {eval_loss:.4f}{ret}"
                  + (f", {_fmt_rate(tps)} tok/s, median step {summary['median_step_ms']:.1f} ms"
                     if tps else "")
                  + (f", peak memory {mem:.2f} GiB/GPU" if mem else "")
                  + f"; outputs in {t.out_dir}", flush=True)
        return summary


class _GcClock:
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
            (train if "loss" in r else evals).append(r)
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


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dist_sparse_attn.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.toml", help="TOML preset ([model], [train])")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=V",
                   help="override a preset field, e.g. --set model.attention=qk (repeatable)")
    p.add_argument("--out", default=None, help="output directory (overrides train.out_dir)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="TAG",
                   help="continue from a checkpoint in OUT/checkpoints: the latest, or TAG "
                        "(e.g. step0000100)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the configuration and world size, print the plan, do not train")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)     # passed by the deepspeed launcher
    return p.parse_args(argv)


def _plan_text(mcfg, tcfg, layout, ds, world, cuda, n_params=None) -> str:
    sp, dp = layout["sp"], layout["dp"]
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
    ]
    if mcfg.compile == "blocks":
        lines.append(f"torch.compile (backend {_model.COMPILE_BACKEND!r}, default mode, static "
                     f"shapes): each block's ln_1+qkv+RoPE and out-proj+residual+ln_2+MLP, "
                     f"2 graphs shared by the {mcfg.n_layer} blocks; attention, embedding, "
                     f"ln_f, head and loss stay eager")
    if mcfg.compile == "model":
        lines.append(f"torch.compile (backend {_model.COMPILE_BACKEND!r}, default mode, static "
                     f"shapes): the whole forward as one graph, attention as the library's "
                     f"custom ops")
    return "\n".join("[train] " + s for s in lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        mcfg, tcfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"[train] configuration error: {e}", file=sys.stderr)
        return 2
    if args.out:
        tcfg.out_dir = args.out
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("[train] configuration error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.dry_run:
        # validate before starting any process group: world size from the launcher's env
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE",
                                                                 os.environ.get("PMI_SIZE", 1))))
        try:
            layout = check_config(mcfg, tcfg, world)
            ds = deepspeed_config(tcfg, layout, cuda)
            check_compile(mcfg, ds, layout['sp'])
            if tcfg.data != "stdlib" and not os.path.exists(_find(tcfg.data)):
                raise ConfigError(f"train.data: no file {tcfg.data!r}")
        except ConfigError as e:
            print(f"[train] configuration error: {e}", file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK",
                                                     os.environ.get("PMI_RANK", 0)))) == 0:
            print(_plan_text(mcfg, tcfg, layout, ds, world, cuda), flush=True)
            print("[train] dry run: configuration is valid; not training", flush=True)
        return 0

    init_distributed(cuda, tcfg.timeout_min)
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        layout = check_config(mcfg, tcfg, world)
        ds = deepspeed_config(tcfg, layout, cuda)
        check_compile(mcfg, ds, layout['sp'])
        if rank == 0:
            os.makedirs(tcfg.out_dir, exist_ok=True)
            if not args.resume and os.path.exists(os.path.join(tcfg.out_dir, "metrics.jsonl")):
                os.remove(os.path.join(tcfg.out_dir, "metrics.jsonl"))
            with open(os.path.join(tcfg.out_dir, "config.json"), "w") as f:
                json.dump({"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
                           "deepspeed": ds, "world": world}, f, indent=1)
        dist.barrier()
        trainer = Trainer(mcfg, tcfg, layout, ds, cuda, args.resume)
        if rank == 0:
            print(_plan_text(mcfg, tcfg, layout, ds, world, cuda, trainer.n_params), flush=True)
        trainer.run()
    except ConfigError as e:
        if rank == 0:
            print(f"[train] configuration error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

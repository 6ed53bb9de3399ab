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
``checkpoints/`` (DeepSpeed's format plus :data:`CHECKPOINT_META` per checkpoint;
``latest`` names the newest complete one).

Errors: a configuration, data file, output directory or checkpoint that cannot work is a
:class:`~dist_sparse_attn.config.ConfigError`: exit code 2 and one line on rank 0's
stderr, on every rank together (checks that may differ between ranks are agreed on with
a collective, :func:`_agree`). The configuration itself (types, ranges, presets, the
DeepSpeed JSON) lives in :mod:`dist_sparse_attn.config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from . import model as _model
from .config import (REPO, ConfigError, TrainConfig, check_compile, check_config,  # noqa: F401
                     deepspeed_config, find_file, load_config)
from .config import find_file as _find
from .data import TokenData, load_bin, load_text, retrieval_batch, shard_bounds, stdlib_corpus
from .integrations.ds_groups import SequenceParallelMPU
from .model import ATTENTIONS, GPT, SP_STRATEGIES, GPTConfig  # noqa: F401

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
    if os.path.isdir(path):
        raise ConfigError(f"train.data {tcfg.data!r} is a directory (use 'stdlib', a text file "
                          "or a .bin)")
    try:
        if path.endswith(".bin"):
            if os.path.getsize(path) % 2:
                raise ConfigError(f"train.data {tcfg.data!r}: a .bin holds uint16 token ids, "
                                  f"but its size ({os.path.getsize(path)} bytes) is odd")
            return load_bin(path)
        return load_text(path, tcfg.max_bytes)
    except OSError as e:
        raise ConfigError(f"train.data {tcfg.data!r}: cannot read it ({e.strerror})") from None


def load_data(tcfg: TrainConfig) -> TokenData:
    """The corpus split into train and val; ConfigError when a split cannot hold one
    sequence (the same result on every rank: the same files)."""
    tokens = load_tokens(tcfg)
    if len(tokens) < 2:
        raise ConfigError(f"train.data {tcfg.data!r} has {len(tokens)} tokens")
    data = TokenData(tokens, tcfg.val_fraction)
    for split in ("train", "val"):
        n = len(data.splits[split])
        if n < tcfg.seq_len + 1:
            raise ConfigError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = "
                              f"{tcfg.seq_len + 1}: use more data (train.max_bytes), a shorter "
                              "train.seq_len or another train.val_fraction")
    return data


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


# ---------------------------------------------------------------------------------------------
# checkpoints: layout, integrity, agreement between ranks
# ---------------------------------------------------------------------------------------------

CHECKPOINT_META = "dsa_checkpoint.json"
"""Written into each checkpoint directory after every rank's files: the parallel layout,
the parameter shapes, the step, and each file's size and SHA-256."""
_SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "bias")
_TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def checkpoint_layout(mcfg: GPTConfig, layout: dict, ds: dict) -> dict:
    """What a checkpoint must share with the run that loads it: the parallel layout
    (DeepSpeed's files are per rank), ZeRO stage and precision (the optimizer state's
    format), and the parameter shapes. ``layout`` may hold None for an unknown world."""
    sp, dp = layout["sp"], layout["dp"]
    return {"world": None if sp is None or dp is None else sp * dp, "sp": sp, "dp": dp,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
            "bf16": bool(ds.get("bf16", {}).get("enabled", False)),
            "model": {f: getattr(mcfg, f) for f in _SHAPE_FIELDS}}


def _checkpoint_files(tag_dir: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(tag_dir):
        dirnames.sort()
        out += [os.path.relpath(os.path.join(dirpath, f), tag_dir) for f in sorted(filenames)]
    return out


def _file_record(path: str) -> list:
    """[size in bytes, SHA-256 hex] of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return [os.path.getsize(path), h.hexdigest()]


def _write_atomic(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tags(ckpt_dir: str) -> str:
    have = sorted(d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d)))
    return ", ".join(have) or "none"


def resolve_checkpoint(ckpt_dir: str, tag: str, expect: dict, share=(0, 1)) -> tuple[str, dict]:
    """Check the checkpoint ``tag`` ("latest" or a tag) of ``ckpt_dir`` before loading it.

    ``expect``: :func:`checkpoint_layout` of this run (None values are not compared).
    Every file's size is checked; the SHA-256 of the files ``i`` with ``i % world ==
    rank`` (``share = (rank, world)``; all of them for ``(0, 1)``), so the ranks of a
    job verify a checkpoint together (:func:`_agree`). Returns (tag, the saved metadata);
    raises :class:`ConfigError` (one line) for a missing or corrupt checkpoint or one
    saved with another layout."""
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (no such directory)")
    if tag == "latest":
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.exists(latest):
            raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file; "
                              f"have: {_tags(ckpt_dir)})")
        try:
            with open(latest, "rb") as f:
                tag = f.read(256).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--resume: {latest} is unreadable ({e})") from None
        if not tag or not set(tag) <= _TAG_CHARS or tag in (".", ".."):
            raise ConfigError(f"--resume: {latest} does not name a checkpoint ({tag[:40]!r})")
        missing = f"--resume: {latest} names {tag!r}, which does not exist"
    else:
        if not set(tag) <= _TAG_CHARS or tag in (".", ".."):
            raise ConfigError(f"--resume TAG must be a checkpoint name such as step0000100, "
                              f"got {tag!r}")
        missing = f"--resume {tag}: no such checkpoint in {ckpt_dir}"
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ConfigError(f"{missing} (have: {_tags(ckpt_dir)})")
    meta_path = os.path.join(tag_dir, CHECKPOINT_META)
    if not os.path.exists(meta_path):
        raise ConfigError(f"--resume: checkpoint {tag} in {ckpt_dir} is incomplete (no "
                          f"{CHECKPOINT_META}: its save did not finish, or another program "
                          "wrote it)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
        step, files = int(meta["step"]), dict(meta["files"])
        saved = {k: meta[k] for k in ("world", "sp", "dp", "zero_stage", "bf16", "model")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: {meta_path} is corrupt ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    if expect.get("world") is not None and (saved["world"], saved["sp"]) != (expect["world"],
                                                                             expect["sp"]):
        raise ConfigError(f"--resume: checkpoint {tag} was saved by world {saved['world']} "
                          f"(dp {saved['dp']} x sp {saved['sp']}), this run is world "
                          f"{expect['world']} (dp {expect['dp']} x sp {expect['sp']}): resume "
                          "with the same number of processes and train.sequence_parallel")
    for key, what in (("zero_stage", "ZeRO stage (train.deepspeed_config)"),
                      ("bf16", "bf16 (train.precision)")):
        if expect.get(key) is not None and saved[key] != expect[key]:
            raise ConfigError(f"--resume: checkpoint {tag} was saved with {what} = "
                              f"{saved[key]}, this run has {expect[key]}")
    for name, value in (expect.get("model") or {}).items():
        if saved["model"].get(name) != value:
            raise ConfigError(f"--resume: checkpoint {tag} was saved with model.{name}="
                              f"{saved['model'].get(name)}, this run has model.{name}={value}")
    rank, world = share
    for i, (name, record) in enumerate(sorted(files.items())):
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: checkpoint {tag} is missing its file {name}")
        size = os.path.getsize(path)
        if size != record[0]:
            raise ConfigError(f"--resume: {tag}/{name} is truncated or changed ({size} bytes, "
                              f"saved with {record[0]})")
        if i % world == rank and _file_record(path)[1] != record[1]:
            raise ConfigError(f"--resume: {tag}/{name} is corrupt (its SHA-256 differs from "
                              "the one saved with it)")
    return tag, {**meta, "step": step}


def _raise_if_any(message: str | None):
    """Collective: every rank passes its error (or None); if any rank has one, every rank
    raises :class:`ConfigError` with the first one (so no rank waits for the others in a
    later collective)."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise ConfigError(first)


def _agree(fn, *args):
    """``fn(*args)`` on every rank; a ConfigError or OSError on any rank becomes a
    ConfigError on all of them (:func:`_raise_if_any`). Returns this rank's result."""
    out, err = None, None
    try:
        out = fn(*args)
    except ConfigError as e:
        err = str(e)
    except OSError as e:
        err = f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")
    _raise_if_any(err)
    return out


def check_out_dir(path: str, create: bool):
    """The output directory can be written. ``create``: made (with its parents) and
    probed with a file. Else (a dry run, which creates nothing that stays): a file is
    created and removed in it, or in its nearest existing parent directory. Raises
    :class:`ConfigError` naming train.out_dir."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"train.out_dir {path!r} exists and is not a directory")
    where = os.path.abspath(path)
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.out_dir {path!r} cannot be created ({e.strerror})") from None
    else:
        while not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            raise ConfigError(f"train.out_dir {path!r} cannot be created: {where!r} is not a "
                              "directory")
    try:        # permission bits do not tell (root, read-only mounts): try it
        fd, probe = tempfile.mkstemp(prefix=".dsa_write_test", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"train.out_dir {path!r} cannot be written ({e.strerror} in "
                          f"{where!r})") from None


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
        return _model.parallelize(model, group, strategy)
    from .integrations.transformers import parallelize as parallelize_hf
    return parallelize_hf(model, group, strategy)


class Trainer:
    """One training run on an initialised process group: the DeepSpeed engine, the
    sequence-parallel groups, the loop, evaluation and checkpoints.

    ``resume``: a checkpoint tag already checked by :func:`resolve_checkpoint` (on every
    rank), or None. ``data``: the :func:`load_data` corpus (loaded here when None)."""

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
        optimizer = model.configure_optimizers(tcfg.weight_decay, tcfg.lr, tcfg.betas,
                                               device_type=self.device.type)
        # Every group gets the run's collective timeout: torch gives a new group its own
        # default (30 min for gloo, 10 for NCCL), so a stalled rank would hang the others
        # in an all-to-all. The mpu is passed with sp = 1 too: without one, DeepSpeed
        # clones the world group for the gradient all-reduce, with that default.
        mpu = SequenceParallelMPU(self.sp, timeout=datetime.timedelta(minutes=tcfg.timeout_min))
        self.sp_group = mpu.get_sequence_parallel_group() if self.sp > 1 else None
        parallelize(model, self.sp_group, tcfg.sp_strategy)     # attention over the sp group
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
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
        # backward by sp so every stage makes the single-device update (tests/test_train.py
        # checks the losses against a one-process run).
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.backward_scale = float(self.sp) if zero == 3 and self.sp > 1 else 1.0
        self.ckpt_dir = os.path.join(tcfg.out_dir, "checkpoints")
        self.layout = checkpoint_layout(mcfg, layout, ds_config)
        self.step, self.history = 0, []
        if resume:
            self._resume(resume)

    # -- one step ---------------------------------------------------------------------------

    def _loss(self, x, y):
        """This rank's share of the mean loss: CE sum over its shard / all tokens of the
        micro-batch (see the module docstring); also the local sum for logging."""
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
        L = self.tcfg.retrieval_len
        lo, hi = shard_bounds(L, self.sp_rank, self.sp)
        pos = torch.arange(lo, hi, device=self.device) if self.sp > 1 else None
        self.engine.eval()
        correct = torch.zeros((), device=self.device)
        for i in range(0, n, self.tcfg.micro_batch):
            b = min(self.tcfg.micro_batch, n - i)
            x, value, _ = retrieval_batch(b, L, generator=_generator(self.tcfg.seed, 3, i))
            logits, _ = self.engine(x[:, lo:hi].to(self.device), positions=pos)
            if self.sp_rank == self.sp - 1:
                correct += (logits[:, -1].argmax(-1).cpu() == value).sum().to(correct)
        self.engine.train()
        dist.all_reduce(correct)
        return float(correct) / self.dp / n

    # -- checkpoints --------------------------------------------------------------------------

    def save(self):
        """A DeepSpeed checkpoint (every rank writes its part), then, once all parts are
        on disk, :data:`CHECKPOINT_META` (the layout and every file's size and SHA-256,
        hashed by the ranks in turn) and only then ``latest``: a checkpoint that
        ``latest`` names is complete and can be verified before loading."""
        if not self.tcfg.save_checkpoint:
            return
        tag = f"step{self.step:07d}"
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, save_latest=False,
                                    client_state={"step": self.step, "history": self.history})
        tag_dir = os.path.join(self.ckpt_dir, tag)
        dist.barrier()
        names = [n for n in _checkpoint_files(tag_dir) if n != CHECKPOINT_META]
        mine = {n: _file_record(os.path.join(tag_dir, n))
                for i, n in enumerate(names) if i % self.world == self.rank}
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank == 0:
            files = {k: v for part in parts for k, v in part.items()}
            meta = {**self.layout, "step": self.step, "tag": tag, "files": files}
            _write_atomic(os.path.join(tag_dir, CHECKPOINT_META), json.dumps(meta, indent=1))
            _write_atomic(os.path.join(self.ckpt_dir, "latest"), tag)
        dist.barrier()

    def _resume(self, tag: str):
        """Load a checkpoint that :func:`resolve_checkpoint` accepted. Should DeepSpeed
        still fail on some rank, every rank stops with that rank's message."""
        err, state, path = None, None, None
        try:
            path, state = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
            if path is None or not isinstance(state, dict) or "step" not in state:
                err = "DeepSpeed found nothing to load"
        except Exception as e:      # noqa: BLE001 - any failure, on any rank: stop all ranks
            err = f"{type(e).__name__}: {e}"
        _raise_if_any(None if err is None else
                      f"--resume: rank {self.rank} could not load checkpoint {tag} from "
                      f"{self.ckpt_dir}: {err}")
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
            # the ETA and rates come from timed steps only: the first steps (compilation,
            # allocator warmup, train.warmup_steps_excluded) would inflate the ETA
            timed = bool(step_times)
            mean_dt = statistics.fmean(step_times[-20:]) if timed else dt
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
                          f" | ETA {_fmt_time((t.steps - self.step) * mean_dt) if timed else '--'}",
                          flush=True)
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
                   help="validate the configuration (and with --resume the checkpoint), print "
                        "the plan, do not train")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: check the layout for N processes (default: the "
                        "launcher's world size; without a launcher the world-size rules are "
                        "not checked, and the plan says so)")
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
        "retrieval eval: " + (f"{tcfg.retrieval_samples} sequences of {tcfg.retrieval_len} tokens "
                              f"at the end (train.retrieval_mix {tcfg.retrieval_mix:g})"
                              if tcfg.retrieval_evaluated else
                              "off (train.retrieval_mix = 0: the model is not trained on it)"
                              if tcfg.retrieval_mix == 0 else "off (train.retrieval_samples = 0)"),
    ]
    if mcfg.compile == "blocks":
        lines.append(f"torch.compile (backend {mcfg.compile_backend!r}, default mode, static "
                     f"shapes): each block's ln_1+qkv+RoPE and out-proj+residual+ln_2+MLP, "
                     f"2 graphs shared by the {mcfg.n_layer} blocks; attention, embedding, "
                     f"ln_f, head and loss stay eager")
    if mcfg.compile == "model":
        lines.append(f"torch.compile (backend {mcfg.compile_backend!r}, default mode, static "
                     f"shapes): the whole forward as one graph, attention as the library's "
                     f"custom ops")
    return "\n".join("[train] " + s for s in lines)


def _env_int(*names):
    """The first of the launcher variables ``names`` that is set, as an int (else None)."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _launch_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher): known before
    any process group exists, so that only rank 0 reports a configuration error."""
    return _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0


def _launch_world():
    return _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _error_line(e) -> str:
    return "[train] configuration error: " + " ".join(str(e).split())


def _dry_run(args, mcfg: GPTConfig, tcfg: TrainConfig, cuda: bool, rank0: bool) -> int:
    """Every check of a real start that needs no process group (configuration, world size,
    DeepSpeed JSON, data, output directory, the checkpoint to resume), then the plan."""
    world = args.world_size if args.world_size is not None else _launch_world()
    known = world is not None
    if not known:       # the smallest world the preset allows
        world = tcfg.sequence_parallel or 1
    layout = check_config(mcfg, tcfg, world)
    ds = deepspeed_config(tcfg, layout, cuda)
    check_compile(mcfg, ds, layout["sp"])
    load_data(tcfg)
    check_out_dir(tcfg.out_dir, create=False)
    resumed = None
    if args.resume:
        expect = checkpoint_layout(mcfg, layout if known else {"sp": None, "dp": None}, ds)
        resumed = resolve_checkpoint(os.path.join(tcfg.out_dir, "checkpoints"), args.resume,
                                     expect)
    if not rank0:
        return 0
    print(_plan_text(mcfg, tcfg, layout, ds, world, cuda), flush=True)
    if not known:
        rule = (f"train.sequence_parallel={tcfg.sequence_parallel} needs a world size that "
                f"is a multiple of {tcfg.sequence_parallel}" if tcfg.sequence_parallel else
                "train.sequence_parallel=0 makes every rank one sequence-parallel group "
                "(sp = the world size)")
        print(f"[train] world size NOT checked (no launcher environment, no --world-size): "
              f"planned as world {world}; {rule}; pass --world-size N to check the layout "
              "you will launch", flush=True)
    if resumed:
        tag, meta = resumed
        print(f"[train] resume: checkpoint {tag} at step {meta['step']} (verified)"
              + ("" if meta["step"] < tcfg.steps else
                 f"; nothing to do: run already at step {meta['step']} of {tcfg.steps}"),
              flush=True)
    print("[train] dry run: configuration is valid; not training", flush=True)
    return 0


def _prepare_out_dir(mcfg, tcfg, ds, world, resume: bool):
    """Rank 0: the output directory exists and is writable, a fresh run's old
    metrics.jsonl is gone, config.json holds the resolved configuration."""
    check_out_dir(tcfg.out_dir, create=True)
    metrics = os.path.join(tcfg.out_dir, "metrics.jsonl")
    if not resume and os.path.exists(metrics):
        os.remove(metrics)
    with open(os.path.join(tcfg.out_dir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
                   "deepspeed": ds, "world": world}, f, indent=1)


def _peer_failure(e: BaseException) -> str | None:
    """What a collective's error says about the other ranks, or None if it is not that."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return "a collective did not complete in time: another rank stalled or died"
    if "connection closed by peer" in text or "connection reset" in text \
            or "broken pipe" in text:
        return "another rank closed its connection (it died or stopped)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = _launch_rank() == 0

    def config_error(e) -> int:
        if rank0:
            print(_error_line(e), file=sys.stderr, flush=True)
        return 2

    try:
        mcfg, tcfg = load_config(args.config, args.overrides)
        if args.out is not None:
            if not args.out.strip():
                raise ConfigError("--out must name a directory, got an empty string")
            tcfg.out_dir = args.out
        if args.world_size is not None and (not args.dry_run or args.world_size < 1):
            raise ConfigError("--world-size N (N >= 1) goes with --dry-run; a launched run "
                              "takes its world size from the launcher")
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda but CUDA is not available")
        if args.dry_run:
            return _dry_run(args, mcfg, tcfg, cuda, rank0)
    except ConfigError as e:
        return config_error(e)

    init_distributed(cuda, tcfg.timeout_min)
    world, rank = dist.get_world_size(), dist.get_rank()
    rank0 = rank == 0
    try:
        # the same inputs on every rank: these fail on all ranks or on none
        layout = check_config(mcfg, tcfg, world)
        ds = deepspeed_config(tcfg, layout, cuda)
        check_compile(mcfg, ds, layout['sp'])
        data = load_data(tcfg)
        # from here on a check may fail on some ranks only: _agree makes all of them stop
        tag = None
        if args.resume:
            tag, meta = _agree(resolve_checkpoint, os.path.join(tcfg.out_dir, "checkpoints"),
                               args.resume, checkpoint_layout(mcfg, layout, ds), (rank, world))
            if meta["step"] >= tcfg.steps:      # a finished run: leave its outputs alone
                if rank0:
                    print(f"[train] nothing to do: run already at step {meta['step']} of "
                          f"{tcfg.steps} (checkpoint {tag}; raise train.steps to continue)",
                          flush=True)
                dist.barrier()
                dist.destroy_process_group()
                return 0
        _agree(lambda: _prepare_out_dir(mcfg, tcfg, ds, world, bool(args.resume))
               if rank0 else None)
        trainer = Trainer(mcfg, tcfg, layout, ds, cuda, tag, data)
        if rank0:
            print(_plan_text(mcfg, tcfg, layout, ds, world, cuda, trainer.n_params), flush=True)
        trainer.run()
    except ConfigError as e:
        config_error(e)
        dist.destroy_process_group()
        return 2
    except RuntimeError as e:     # torch.distributed's errors (DistError) included
        why = _peer_failure(e)
        if why is None:
            raise
        first = " ".join(str(e).split())[:300]
        print(f"[train] rank {rank}: {why} (train.timeout_min={tcfg.timeout_min:g}); "
              f"stopping: {first}", file=sys.stderr, flush=True)
        return 1
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

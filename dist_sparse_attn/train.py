"""Train the GPT of :mod:`dist_sparse_attn.model` with DeepSpeed: the library's main job.

    dsa-train --config configs/tiny.toml                                         # 1 process
    python -m dist_sparse_attn.train --config configs/tiny.toml                 # the same
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config configs/ds/zero1.json
    torchrun --nproc_per_node 2 -m dist_sparse_attn.train --config ...          # or torchrun
    mpirun -n 2 python -m dist_sparse_attn.train --config ...                   # or MPI
    launch/train.sh [config] [--set key=value ...]                             # picks one

A run is described by a TOML preset (``configs/*.toml``: a ``[model]`` table of
:class:`~dist_sparse_attn.model.GPTConfig` fields and a ``[train]`` table of
:class:`~dist_sparse_attn.config.TrainConfig` fields) plus a DeepSpeed JSON
(``configs/ds/*.json``: ZeRO stage, precision, clipping, optimizer, monitors), named by
``train.deepspeed_config`` or DeepSpeed's own ``--deepspeed_config``. ``--set
section.field=value`` overrides a preset field. Preset names resolve in the current
directory, then among the presets shipped with the package. The DeepSpeed JSON is
authoritative: what it sets must agree with the preset, what it leaves out is filled in
from it (:func:`dist_sparse_attn.config.deepspeed_config`):

    world W = data-parallel dp  x  sequence-parallel sp
    train_batch_size = micro_batch * grad_accum * dp
    tokens per optimizer step = train_batch_size * seq_len

Outputs in ``out_dir``: ``metrics.jsonl`` (one JSON per log/eval line; also written to
the monitors the DeepSpeed JSON enables: TensorBoard, CSV, W&B), ``summary.json``,
``loss.png``, ``config.json`` (the resolved configuration; after a resume also the
checkpoint it continues, what changed since, and every earlier segment's configuration)
and ``checkpoints/`` (:mod:`dist_sparse_attn.checkpoint`).

Resume: ``--resume`` compares the configuration the checkpoint recorded with this run's
(every rank): a model that computes something else
(:data:`~dist_sparse_attn.config.MODEL_SEMANTICS`) is a ConfigError unless
``--allow-model-change``; any other change (the schedule, ``[train]``, the DeepSpeed
JSON, how the model is computed) is listed once by rank 0 as ``old -> new``
(:func:`resume_notice`). The progress line shows the loss, tokens/s, MFU
(:mod:`dist_sparse_attn.metrics`) and, on CUDA, allocated memory.

Errors: a configuration, data file, output directory or checkpoint that cannot work is a
:class:`~dist_sparse_attn.config.ConfigError`: exit code 2 and one line on rank 0's
stderr, on every rank together (checks that may differ between ranks are agreed on with
a collective, :func:`dist_sparse_attn.distributed.agree`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from .checkpoint import checkpoint_layout, resolve_checkpoint, write_atomic
from .config import (ABSENT, ConfigError, TrainConfig, check_compile, check_config,
                     check_fresh_out_dir, check_out_dir, config_changes, deepspeed_config,
                     describe_change, find_file, is_model_change, load_config, run_config,
                     sequence_parallel_from_json)
from .data import check_vocab, data_fingerprint, load_data
from .distributed import agree, init_distributed, launch_rank, launch_world, peer_failure
from .model import GPTConfig
from .trainer import Trainer, describe_run, lr_at

NEEDS_DEEPSPEED = "training needs DeepSpeed: pip install 'dist_sparse_attn[train]'"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dsa-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.toml", help="TOML preset ([model], [train])")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=V",
                   help="override a preset field, e.g. --set model.attention=qk (repeatable)")
    p.add_argument("--out", default=None, help="output directory (overrides train.out_dir)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="TAG",
                   help="continue from a checkpoint in OUT/checkpoints: the latest, or TAG "
                        "(e.g. step0000100)")
    p.add_argument("--allow-model-change", action="store_true",
                   help="with --resume: accept a model that computes something else than the "
                        "checkpoint's (model.attention, n_buckets, hash_seed, dropout, ...: "
                        "config.MODEL_SEMANTICS); without it such a change is an error. "
                        "Parameter shapes can never change")
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
    # DeepSpeed's own flags, as deepspeed.add_config_arguments declares them (declared
    # here: importing DeepSpeed takes seconds and logs to stdout, before any check)
    g = p.add_argument_group("DeepSpeed", "the flags of deepspeed.add_config_arguments")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for DeepSpeed's convention (training always uses DeepSpeed)")
    g.add_argument("--deepspeed_config", default=None, metavar="JSON",
                   help="the DeepSpeed JSON: sets train.deepspeed_config (an error if the "
                        "preset or --set names another)")
    g.add_argument("--deepscale", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--deepscale_config", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configure(args) -> tuple[GPTConfig, TrainConfig, str | None]:
    """The preset, its overrides and the command line's flags, merged and checked (no
    world size needed); raises ConfigError. The third value: the DeepSpeed JSON that set
    train.sequence_parallel, or None."""
    sources = {}
    mcfg, tcfg = load_config(args.config, args.overrides, sources=sources)
    if args.out is not None:
        if not args.out.strip():
            raise ConfigError("--out must name a directory, got an empty string")
        tcfg.out_dir = args.out
    if args.allow_model_change and not args.resume:
        raise ConfigError("--allow-model-change goes with --resume (a fresh run has no "
                          "earlier model to compare with)")
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size N goes with --dry-run; a launched run takes its "
                          "world size from the launcher")
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    given = [(f"{flag} {path}", path) for flag, path in (
        ("--deepspeed_config", args.deepspeed_config),
        ("--deepscale_config", args.deepscale_config)) if path is not None]
    for what, path in given:
        if not path.strip():
            raise ConfigError(f"{what.split()[0]} must name a DeepSpeed JSON, got an empty string")
    if given:
        named = sources["train"].get("deepspeed_config")
        if named:       # the preset or --set chose one too
            given.append((f"train.deepspeed_config={tcfg.deepspeed_config!r} ({named})",
                          tcfg.deepspeed_config))
        first = os.path.realpath(find_file(given[0][1]))
        for what, path in given[1:]:
            if os.path.realpath(find_file(path)) != first:
                raise ConfigError(f"{given[0][0]} and {what} name different DeepSpeed "
                                  "configs: give one of them")
        tcfg.deepspeed_config = given[0][1]
    return mcfg, tcfg, sequence_parallel_from_json(tcfg)


def _layout(mcfg, tcfg, world: int, sp_json: str | None) -> dict:
    """check_config, its errors saying where train.sequence_parallel came from."""
    try:
        return check_config(mcfg, tcfg, world)
    except ConfigError as e:
        if sp_json and "sequence_parallel" in str(e):
            raise ConfigError(f"{e} (train.sequence_parallel is the sequence_parallel_size of "
                              f"{sp_json})") from None
        raise


def _dry_run(args, mcfg: GPTConfig, tcfg: TrainConfig, sp_json, cuda: bool, rank0: bool) -> int:
    """Every check of a real start that needs no process group (configuration, world size,
    DeepSpeed JSON, data, output directory, the checkpoint to resume), then the plan."""
    world = args.world_size if args.world_size is not None else launch_world()
    known = world is not None
    if not known:       # the smallest world the preset allows
        world = tcfg.sequence_parallel or 1
    layout = _layout(mcfg, tcfg, world, sp_json)
    ds = deepspeed_config(tcfg, layout, cuda, world_known=known)
    check_compile(mcfg, ds, layout["sp"], cuda)
    load_data(tcfg)
    check_out_dir(tcfg.out_dir, create=False)
    check_fresh_out_dir(tcfg, bool(args.resume), remove=False)
    resumed = None
    config = run_config(mcfg, tcfg, ds, world if known else None)
    if args.resume:
        expect = checkpoint_layout(mcfg, layout if known else {"sp": None, "dp": None}, ds)
        resumed = resolve_checkpoint(os.path.join(tcfg.out_dir, "checkpoints"), args.resume,
                                     expect, (0, 1), config, args.allow_model_change)
    if not rank0:
        return 0
    print(describe_run(mcfg, tcfg, layout, ds, world, cuda), flush=True)
    if not known:
        rule = (f"train.sequence_parallel={tcfg.sequence_parallel} needs a world size that "
                f"is a multiple of {tcfg.sequence_parallel}" if tcfg.sequence_parallel else
                "train.sequence_parallel=0 makes every rank one sequence-parallel group "
                "(sp = the world size)")
        print(f"[train] world size NOT checked (no launcher environment, no --world-size): "
              f"planned as world {world}; {rule}; the JSON's train_batch_size is checked "
              "against it at launch; pass --world-size N to check the layout you will launch",
              flush=True)
    if resumed:
        tag, meta = resumed
        for line in resume_notice(tag, meta, config):
            print(line, flush=True)
        print(f"[train] resume: checkpoint {tag} at step {meta['step']} (verified)"
              + ("" if meta["step"] < tcfg.steps else
                 f"; nothing to do: run already at step {meta['step']} of {tcfg.steps}"),
              flush=True)
    print("[train] dry run: configuration is valid; not training", flush=True)
    return 0


_LR_FIELDS = ("lr", "min_lr", "warmup", "steps")


def resume_changes(meta: dict, config: dict) -> list | None:
    """The differences between the configuration a checkpoint was saved with (its
    record's ``"config"``) and this run's :func:`~dist_sparse_attn.config.run_config`, as
    :func:`~dist_sparse_attn.config.config_changes`; None when the checkpoint records none
    (saved by an older version of this package)."""
    saved = meta.get("config")
    return config_changes(saved, config) if isinstance(saved, dict) else None


def resume_notice(tag: str, meta: dict, config: dict) -> list[str]:
    """The lines a resume prints (rank 0, once) about what changed since checkpoint
    ``tag`` was saved: ``key: old -> new`` for each field, the model changes that
    ``--allow-model-change`` let through marked as such, and the learning rate of the
    next step when its schedule changed. Empty when nothing changed."""
    changes = resume_changes(meta, config)
    step = meta["step"]
    if changes is None:
        return [f"[train] resume: checkpoint {tag} records no configuration (saved by an "
                "older version): only its layout and parameter shapes were compared with "
                "this run's"]
    if not changes:
        return []
    lines = [f"[train] resume: configuration changed since checkpoint {tag} (step {step}) "
             f"was saved ({len(changes)} field{'s' if len(changes) > 1 else ''}):"]
    for key, old, new in changes:
        lines.append("[train]   " + describe_change(key, old, new)
                     + (" (a model change, allowed by --allow-model-change)"
                        if is_model_change(key) else ""))
    if any(key in (f"train.{f}" for f in _LR_FIELDS) for key, _, _ in changes):
        saved = meta["config"]["train"]
        try:
            before = lr_at(step, argparse.Namespace(**{f: saved[f] for f in _LR_FIELDS}))
            after = lr_at(step, argparse.Namespace(**{f: config["train"][f]
                                                      for f in _LR_FIELDS}))
            lines.append(f"[train]   learning rate of step {step + 1}: {before:.6g} -> "
                         f"{after:.6g} (warmup, then cosine decay from train.lr to "
                         "train.min_lr at train.steps)")
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass        # a record without these fields: the lines above say what changed
    return lines


def _earlier_segments(path: str) -> list:
    """The configurations of the earlier segments of the run in config.json ``path``
    (oldest first, each as its config.json held it): its own list of them, then itself.
    A file that is not a JSON object is kept as its text."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        prev = json.loads(text)
    except ValueError:
        prev = None
    if not isinstance(prev, dict):
        return [{"unparsed_config_json": text}]
    earlier = prev.pop("earlier_segments", [])
    return (earlier if isinstance(earlier, list) else [earlier]) + [prev]


def _prepare_out_dir(config: dict, tcfg, resumed: dict | None):
    """Rank 0: the output directory exists and is writable, holds no earlier run when
    this one is fresh (or ``train.overwrite`` deleted it), config.json holds the
    resolved configuration of this segment of the run (``resumed``: None for a fresh
    run, else the checkpoint it continues and what changed since it was saved), and,
    on a resume, those of the earlier segments under ``"earlier_segments"``."""
    check_out_dir(tcfg.out_dir, create=True)
    check_fresh_out_dir(tcfg, resumed is not None, remove=True)
    path = os.path.join(tcfg.out_dir, "config.json")
    earlier = _earlier_segments(path) if resumed is not None else []
    write_atomic(path, json.dumps({**config, "resumed_from": resumed,
                                   "earlier_segments": earlier}, indent=1))


def _error_line(e) -> str:
    return "[train] configuration error: " + " ".join(str(e).split())


def _train(args, mcfg: GPTConfig, tcfg: TrainConfig, sp_json, cuda: bool) -> int:
    """The launched job: process group, checks that need it, the Trainer. Exit code."""
    init_distributed(cuda, tcfg.timeout_min)
    world, rank = dist.get_world_size(), dist.get_rank()
    rank0 = rank == 0
    try:
        # the same inputs on every rank: these fail on all ranks or on none
        layout = _layout(mcfg, tcfg, world, sp_json)
        ds = deepspeed_config(tcfg, layout, cuda)
        check_compile(mcfg, ds, layout["sp"], cuda)
        # from here on a check may fail on some ranks only: agree makes all of them stop.
        # Every rank reads the data itself (on several nodes, each its own copy): the
        # ranks of a sequence-parallel group shard the same sequences, so the corpora
        # must be the same
        data = agree(load_data, tcfg, error=ConfigError)
        prints = [None] * world
        dist.all_gather_object(prints, data_fingerprint(data))
        if any(p != prints[0] for p in prints):
            raise ConfigError(f"train.data {tcfg.data!r} differs between ranks (train/val "
                              f"tokens per rank: {[(p[0], p[2]) for p in prints]}, or their "
                              "contents): every rank must read the same corpus (the same "
                              "file on every node; 'stdlib' needs the same Python version)")
        check_vocab(data, mcfg.vocab_size, tcfg.data)       # the same data on every rank
        tag, resumed = None, None
        config = run_config(mcfg, tcfg, ds, world)
        if args.resume:
            tag, meta = agree(resolve_checkpoint, os.path.join(tcfg.out_dir, "checkpoints"),
                              args.resume, checkpoint_layout(mcfg, layout, ds), (rank, world),
                              config, args.allow_model_change, error=ConfigError)
            if rank0:
                for line in resume_notice(tag, meta, config):
                    print(line, flush=True)
            changes = resume_changes(meta, config)
            resumed = {"checkpoint": tag, "step": meta["step"],
                       "changes": None if changes is None else [
                           {"field": k, **({} if a is ABSENT else {"old": a}),
                            **({} if b is ABSENT else {"new": b})} for k, a, b in changes],
                       "model_change_allowed": bool(args.allow_model_change)}
            if meta["step"] >= tcfg.steps:      # a finished run: leave its outputs alone
                if rank0:
                    print(f"[train] nothing to do: run already at step {meta['step']} of "
                          f"{tcfg.steps} (checkpoint {tag}; raise train.steps to continue)",
                          flush=True)
                dist.barrier()
                dist.destroy_process_group()
                return 0
        agree(lambda: _prepare_out_dir(config, tcfg, resumed) if rank0 else None,
              error=ConfigError)
        trainer = Trainer(mcfg, tcfg, layout, ds, cuda, tag, data)
        if rank0:
            print(describe_run(mcfg, tcfg, layout, ds, world, cuda, trainer), flush=True)
        trainer.run()
    except ConfigError as e:
        if rank0:
            print(_error_line(e), file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return 2
    except RuntimeError as e:     # torch.distributed's errors (DistError) included
        why = peer_failure(e)
        if why is None:
            raise
        first = " ".join(str(e).split())[:300]
        print(f"[train] rank {rank}: {why} (train.timeout_min={tcfg.timeout_min:g}); "
              f"stopping: {first}", file=sys.stderr, flush=True)
        # exit now: a normal exit tears down the process group and (under mpirun) runs
        # MPI_Finalize, both of which wait for the rank that stalled -- forever
        sys.stdout.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


PEER_REPORT_DELAY_S = 20.0
"""How long a rank other than 0 waits before it reports an error met before any process
group exists (:func:`_report_early`)."""


def _report_early(line: str) -> int:
    """Report an error met before any process group exists, and return the exit code 2.

    Every rank of a launched job meets the same configuration error, and only rank 0
    prints it at once. The others wait :data:`PEER_REPORT_DELAY_S` first: launchers
    (torchrun, the deepspeed launcher, mpirun) stop the whole job when the first rank
    exits, and a rank that exited at once could have rank 0 killed before its line was
    out. A rank still alive after the wait met an error rank 0 did not (e.g. its node
    lacks DeepSpeed): it prints its own line, marked with its rank."""
    rank = launch_rank()
    if rank:
        time.sleep(PEER_REPORT_DELAY_S)
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = launch_rank() == 0      # before any process group: rank 0 reports (see below)
    try:
        mcfg, tcfg, sp_json = configure(args)
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda but CUDA is not available")
        if importlib.util.find_spec("deepspeed") is None:
            return _report_early(f"[train] {NEEDS_DEEPSPEED}")
        if args.dry_run:
            return _dry_run(args, mcfg, tcfg, sp_json, cuda, rank0)
    except ConfigError as e:
        return _report_early(_error_line(e))
    return _train(args, mcfg, tcfg, sp_json, cuda)


if __name__ == "__main__":
    sys.exit(main())

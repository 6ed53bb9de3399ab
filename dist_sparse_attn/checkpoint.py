"""Training checkpoints: DeepSpeed's files plus a record that lets a resume check them.

A checkpoint ``OUT/checkpoints/<tag>/`` holds DeepSpeed's per-rank files and
:data:`CHECKPOINT_META`, written after every rank's files are on disk: the parallel
layout, ZeRO stage, precision and parameter shapes of the run that saved it, its whole
resolved configuration, the step, and every file's size and SHA-256.
``OUT/checkpoints/latest`` names the newest complete checkpoint and is written last. :func:`resolve_checkpoint` verifies a
checkpoint against the run about to load it, with every rank hashing a share of the
files, and raises :class:`~dist_sparse_attn.config.ConfigError` (one line) for a missing,
incomplete, corrupt or incompatible one, or one whose model computed something else
than the run about to load it (unless that run allows it).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

from .config import MODEL_SHAPES, ConfigError, check_model_changes
from .distributed import raise_if_any

CHECKPOINT_META = "dsa_checkpoint.json"
"""Written into each checkpoint directory after every rank's files: the parallel layout,
the parameter shapes, the step, each file's size and SHA-256, and (key ``"config"``) the
resolved configuration of the run that saved it."""
_TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def checkpoint_layout(mcfg, layout: dict, ds: dict) -> dict:
    """What a checkpoint must share with the run that loads it: the parallel layout
    (DeepSpeed's files are per rank), ZeRO stage and precision (the optimizer state's
    format), and the parameter shapes. ``layout`` may hold None for an unknown world."""
    sp, dp = layout["sp"], layout["dp"]
    return {"world": None if sp is None or dp is None else sp * dp, "sp": sp, "dp": dp,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
            "bf16": bool(ds.get("bf16", {}).get("enabled", False)),
            "model": {f: getattr(mcfg, f) for f in MODEL_SHAPES}}


def checkpoint_files(tag_dir: str) -> list:
    """Every file under ``tag_dir``, relative to it, in a fixed order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tag_dir):
        dirnames.sort()
        out += [os.path.relpath(os.path.join(dirpath, f), tag_dir) for f in sorted(filenames)]
    return out


def file_record(path: str) -> list:
    """[size in bytes, SHA-256 hex] of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return [os.path.getsize(path), h.hexdigest()]


def write_atomic(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tags(ckpt_dir: str) -> str:
    have = sorted(d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d)))
    return ", ".join(have) or "none"


def resolve_checkpoint(ckpt_dir: str, tag: str, expect: dict, share=(0, 1), config=None,
                       allow_model_change: bool = False) -> tuple[str, dict]:
    """Check the checkpoint ``tag`` ("latest" or a tag) of ``ckpt_dir`` before loading it.

    ``expect``: :func:`checkpoint_layout` of this run (None values are not compared).
    ``config``: this run's :func:`~dist_sparse_attn.config.run_config`; when given and the
    checkpoint records the configuration it was saved with (key ``"config"``), a model
    that computes something else is refused unless ``allow_model_change``
    (:func:`~dist_sparse_attn.config.check_model_changes`).
    Every file's size is checked; the SHA-256 of the files ``i`` with ``i % world ==
    rank`` (``share = (rank, world)``; all of them for ``(0, 1)``), so the ranks of a
    job verify a checkpoint together (:func:`~dist_sparse_attn.distributed.agree`).
    Returns (tag, the saved metadata); raises :class:`ConfigError` (one line) for a
    missing or corrupt checkpoint or one saved with another layout."""
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
    if config is not None and isinstance(meta.get("config"), dict):
        check_model_changes(meta["config"], config, allow_model_change, f"checkpoint {tag}")
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
        if i % world == rank and file_record(path)[1] != record[1]:
            raise ConfigError(f"--resume: {tag}/{name} is corrupt (its SHA-256 differs from "
                              "the one saved with it)")
    return tag, {**meta, "step": step}


def save_checkpoint(engine, ckpt_dir: str, tag: str, layout: dict, step: int,
                    client_state: dict):
    """Collective: a DeepSpeed checkpoint (every rank writes its part), then, once all
    parts are on disk, :data:`CHECKPOINT_META` (``layout``: :func:`checkpoint_layout`,
    with the run's configuration under ``"config"``; the step and every file's size and
    SHA-256, hashed by the ranks in turn) and only then ``latest``: a checkpoint that
    ``latest`` names is complete and can be verified before loading."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag_dir = os.path.join(ckpt_dir, tag)
    # saving over an existing tag (a run resumed from an older checkpoint): its record
    # goes first, so that a save cut short reads as incomplete, not as files that
    # differ from their record
    if rank == 0 and os.path.exists(os.path.join(tag_dir, CHECKPOINT_META)):
        os.remove(os.path.join(tag_dir, CHECKPOINT_META))
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False, client_state=client_state)
    dist.barrier()
    names = [n for n in checkpoint_files(tag_dir) if n != CHECKPOINT_META]
    mine = {n: file_record(os.path.join(tag_dir, n))
            for i, n in enumerate(names) if i % world == rank}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    if rank == 0:
        files = {k: v for part in parts for k, v in part.items()}
        meta = {**layout, "step": step, "tag": tag, "files": files}
        write_atomic(os.path.join(tag_dir, CHECKPOINT_META), json.dumps(meta, indent=1))
        write_atomic(os.path.join(ckpt_dir, "latest"), tag)
    dist.barrier()


def load_checkpoint(engine, ckpt_dir: str, tag: str) -> tuple[str, dict]:
    """Collective: load a checkpoint that :func:`resolve_checkpoint` accepted; returns
    (its path, the client state). Should DeepSpeed still fail on some rank, every rank
    raises :class:`ConfigError` with that rank's message."""
    err, state, path = None, None, None
    try:
        path, state = engine.load_checkpoint(ckpt_dir, tag=tag)
        if path is None or not isinstance(state, dict) or "step" not in state:
            err = "DeepSpeed found nothing to load"
    except Exception as e:      # noqa: BLE001 - any failure, on any rank: stop all ranks
        err = f"{type(e).__name__}: {e}"
    raise_if_any(None if err is None else
                 f"--resume: rank {dist.get_rank()} could not load checkpoint {tag} from "
                 f"{ckpt_dir}: {err}", ConfigError)
    return path, state


__all__ = ["CHECKPOINT_META", "checkpoint_layout", "resolve_checkpoint", "save_checkpoint",
           "load_checkpoint", "checkpoint_files", "file_record"]

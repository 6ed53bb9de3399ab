"""The training configuration: :class:`TrainConfig`, TOML presets with ``--set`` overrides,
validation, and the DeepSpeed JSON built from them.

A preset has a ``[model]`` table of :class:`~dist_sparse_attn.model.GPTConfig` fields and a
``[train]`` table of :class:`TrainConfig` fields. Both dataclasses declare every field's
type and range next to it (:func:`dist_sparse_attn.schema.setting`); :func:`load_config`
checks every value against them in one place (:func:`dist_sparse_attn.schema.validate`),
then the relations between fields, so a bad preset or override stops with one
:class:`ConfigError` naming the field, what it accepts and where the value came from:

    model.n_layer must be an int >= 1, got 0 (--set model.n_layer=0)

:func:`check_config` adds the rules that depend on the world size, :func:`deepspeed_config`
reads and checks the DeepSpeed JSON and fills in the batch arithmetic and precision.
Nothing here starts a process group or imports DeepSpeed at import time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .model import ATTENTIONS, SP_STRATEGIES, GPTConfig
from .schema import parse_text, setting, validate, validate_instance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A configuration that cannot run (message says what and how to fix it)."""


@dataclass
class TrainConfig:
    """Everything about a run but the model. Types and ranges are declared with each
    field and checked on construction (ValueError naming the field)."""
    data: str = setting("stdlib", nonempty=True)
    """"stdlib" (this Python's standard library sources, byte-level: exists on every
    machine), a text file (bytes), or a nanoGPT-style token ``.bin`` (uint16)."""
    max_bytes: int = setting(4_000_000, ge=1)
    """For "stdlib" and text files: read at most this many bytes."""
    val_fraction: float = setting(0.1, gt=0.0, lt=1.0)
    """The last fraction of the tokens is the validation split."""
    seq_len: int = setting(1024, ge=1)
    """Tokens per training sequence (the whole sequence, before sequence-parallel sharding)."""
    micro_batch: int = setting(1, ge=1)
    """Sequences per data-parallel rank per micro-step (DeepSpeed's micro batch)."""
    grad_accum: int = setting(1, ge=1)
    """Micro-steps per optimizer step."""
    steps: int = setting(200, ge=1)
    """Optimizer steps."""
    lr: float = setting(3e-3, gt=0.0)
    min_lr: float = setting(3e-4, ge=0.0)
    """At most lr."""
    warmup: int = setting(20, ge=0)
    """Linear warmup steps, then cosine decay from lr to min_lr at ``steps``."""
    weight_decay: float = setting(0.1, ge=0.0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0.0, lt=1.0)
    """AdamW's (beta1, beta2)."""
    sequence_parallel: int = setting(0, ge=0)
    """Ranks per sequence-parallel group sp (must divide the world size); 0 = all ranks."""
    sp_strategy: str = setting("bucket", choices=SP_STRATEGIES)
    """"bucket", "ulysses", "allgather" or "ds-ulysses" (see :mod:`dist_sparse_attn.model`)."""
    deepspeed_config: str = setting("configs/ds/zero1.json", nonempty=True)
    """DeepSpeed JSON (relative paths: to the current directory, then the repository)."""
    precision: str = setting("auto", choices=PRECISIONS)
    """"auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"; written into the DeepSpeed config."""
    eval_interval: int = setting(50, ge=0)
    """Evaluate the validation loss every this many steps (and at the end); 0 = only at the end."""
    eval_iters: int = setting(4, ge=1)
    """Validation batches per evaluation (the same batches every time)."""
    retrieval_mix: float = setting(0.0, ge=0.0, lt=1.0)
    """Fraction of training sequences replaced by the synthetic retrieval task
    (:func:`dist_sparse_attn.data.retrieval_batch`), so the model can learn it."""
    retrieval_samples: int = setting(32, ge=0)
    """Retrieval-eval sequences at the end, when ``retrieval_mix`` > 0 (a model never
    trained on the task is not evaluated on it); 0 = skip. Accuracy of the planted digit."""
    retrieval_seq_len: int = setting(0, ge=0)
    """Length of retrieval-eval sequences; 0 = seq_len."""
    log_interval: int = setting(10, ge=1)
    """Print and record a progress line every this many steps (and at the first and last)."""
    checkpoint_interval: int = setting(0, ge=0)
    """Save a DeepSpeed checkpoint every this many steps (and at the end); 0 = only at the end."""
    save_checkpoint: bool = setting(True)
    seed: int = setting(1337, ge=0)
    out_dir: str = setting("runs/default", nonempty=True)
    timeout_min: float = setting(10.0, gt=0.0)
    """Collective timeout of every process group (minutes): a rank that dies or stalls
    makes the others fail after this."""
    warmup_steps_excluded: int = setting(2, ge=0)
    """Steps left out of the step-time statistics and the ETA (compilation, allocator warmup)."""
    profile: bool = setting(False)
    """Profile one step after the excluded warmup steps (torch.profiler) and write the
    top operators by device time, then by allocated memory, and the step's peak memory
    to ``out_dir/profile_rank<r>.txt`` (where the step and the memory go)."""

    def __post_init__(self):
        validate_instance(self, "train.")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr:g} must be <= train.lr={self.lr:g} "
                              "(the cosine schedule decays from lr to min_lr)")
        if self.retrieval_mix > 0 and self.seq_len < RETRIEVAL_MIN_LEN - 1:
            raise ConfigError(f"train.retrieval_mix > 0 needs train.seq_len >= "
                              f"{RETRIEVAL_MIN_LEN - 1} (a retrieval sequence), got {self.seq_len}")
        if self.retrieval_evaluated and self.retrieval_len < RETRIEVAL_MIN_LEN:
            raise ConfigError(f"retrieval-eval sequences must have >= {RETRIEVAL_MIN_LEN} tokens: "
                              f"train.retrieval_seq_len={self.retrieval_seq_len} (0 = seq_len "
                              f"{self.seq_len})")
        if self.profile and self.steps <= self.warmup_steps_excluded:
            raise ConfigError(f"train.profile profiles step {self.warmup_steps_excluded + 1} "
                              f"(after train.warmup_steps_excluded): train.steps={self.steps} "
                              "is too few")

    @property
    def retrieval_evaluated(self) -> bool:
        """Whether the run ends with a retrieval eval (only a model trained on the task)."""
        return self.retrieval_mix > 0 and self.retrieval_samples > 0

    @property
    def retrieval_len(self) -> int:
        return self.retrieval_seq_len or self.seq_len


RETRIEVAL_MIN_LEN = 12
"""The shortest :func:`~dist_sparse_attn.data.retrieval_batch` sequence (3-letter keys)."""


# ---------------------------------------------------------------------------------------------
# presets and overrides
# ---------------------------------------------------------------------------------------------

def find_file(path: str) -> str:
    """``path`` as given if it exists (or is absolute), else relative to the repository."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(REPO, path)
    return alt if os.path.exists(alt) else path


def _toml():
    try:
        import tomllib
        return tomllib
    except ImportError:
        pass
    try:
        import tomli
        return tomli
    except ImportError:
        raise ConfigError("reading a TOML preset on Python < 3.11 needs the tomli package "
                          "(pip install tomli)") from None


def read_preset(path: str) -> dict:
    """The tables of a TOML preset: {"model": {...}, "train": {...}}."""
    toml = _toml()
    real = find_file(path)
    try:
        with open(real, "rb") as f:
            loaded = toml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no file {path!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path!r} is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"--config {path!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text: {e.reason})") from None
    except toml.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    tables = {"model": {}, "train": {}}
    for sec, table in loaded.items():
        if sec not in tables:
            raise ConfigError(f"{path}: unknown section [{sec}] (expected [model], [train])")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {sec} must be a table ([{sec}] with fields under it), "
                              f"got {table!r}")
        tables[sec] = dict(table)
    return tables


def _classes() -> dict:
    return {"model": GPTConfig, "train": TrainConfig}


def load_config(path: str | None, overrides=()) -> tuple[GPTConfig, TrainConfig]:
    """Read a TOML preset and apply ``section.field=value`` overrides; check every field's
    type and range, then the relations between fields.

    Raises :class:`ConfigError` (one line) naming the file, section or field."""
    classes = _classes()
    raw = read_preset(path) if path else {"model": {}, "train": {}}
    origin = {sec: {k: f"in {path}" for k in raw[sec]} for sec in raw}
    for sec in raw:
        unknown = sorted(set(raw[sec]) - {f.name for f in dataclasses.fields(classes[sec])})
        if unknown:
            raise ConfigError(f"{path}: [{sec}] has unknown field(s) {unknown}; fields: "
                              f"{', '.join(f.name for f in dataclasses.fields(classes[sec]))}")
    for item in overrides:
        key, sep, value = item.partition("=")
        sec, dot, name = key.strip().partition(".")
        if not sep or not dot or sec not in raw:
            raise ConfigError(f"--set expects section.field=value with section model or train, "
                              f"got {item!r}")
        names = [f.name for f in dataclasses.fields(classes[sec])]
        if name not in names:
            raise ConfigError(f"--set {item!r}: [{sec}] has no field {name!r}; fields: "
                              f"{', '.join(names)}")
        raw[sec][name] = parse_text(classes[sec], name, value)
        origin[sec][name] = f"--set {item}"
    checked = {}
    for sec in ("model", "train"):
        checked[sec] = {}
        for name, value in raw[sec].items():     # one at a time: the error names the source
            try:
                checked[sec].update(validate(classes[sec], {name: value}, f"{sec}."))
            except ValueError as e:
                raise ConfigError(f"{e} ({origin[sec][name]})") from None
    train = TrainConfig(**checked["train"])
    mseq = checked["model"].get("seq_len")
    if mseq is not None and mseq != train.seq_len:
        raise ConfigError(f"model.seq_len={mseq} differs from train.seq_len={train.seq_len}: "
                          "set train.seq_len (the model's is filled in from it)")
    checked["model"]["seq_len"] = train.seq_len
    try:
        model = GPTConfig(**checked["model"])
    except ValueError as e:
        raise ConfigError(f"[model] {e}") from None
    check_model_and_train(model, train)
    return model, train


def check_model_and_train(mcfg: GPTConfig, tcfg: TrainConfig):
    """The rules that involve both tables (no world size needed)."""
    byte_data = tcfg.data == "stdlib" or not tcfg.data.endswith(".bin")
    if byte_data and mcfg.vocab_size < 256:
        raise ConfigError(f"train.data={tcfg.data!r} is byte-level: model.vocab_size must be "
                          f">= 256, got {mcfg.vocab_size}")
    if (tcfg.retrieval_mix > 0 or tcfg.retrieval_evaluated) and mcfg.vocab_size < 128:
        raise ConfigError(f"the retrieval task is ASCII text: model.vocab_size must be >= 128 "
                          f"with train.retrieval_mix > 0, got {mcfg.vocab_size}")
    if tcfg.sp_strategy == "ds-ulysses" and mcfg.attention != "dense":
        raise ConfigError("sp_strategy='ds-ulysses' is the dense baseline (DeepSpeed-Ulysses "
                          "over SDPA): use it with model.attention='dense'")


# ---------------------------------------------------------------------------------------------
# world size
# ---------------------------------------------------------------------------------------------

def check_config(mcfg: GPTConfig, tcfg: TrainConfig, world: int) -> dict:
    """Validate against the world size; returns the parallel layout {sp, dp}."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"the world size must be an int >= 1, got {world!r}")
    if mcfg.family == "hf":
        try:
            import transformers  # noqa: F401 -- availability check
        except ImportError:
            raise ConfigError("model.family='hf' needs Hugging Face transformers: "
                              "pip install 'dist_sparse_attn[hf]'") from None
        if tcfg.sp_strategy == "ds-ulysses":
            raise ConfigError("model.family='hf' runs the library's strategies; "
                              "train.sp_strategy='ds-ulysses' is the GPT's dense baseline")
    sp = tcfg.sequence_parallel or world
    if world % sp:
        raise ConfigError(f"train.sequence_parallel={tcfg.sequence_parallel} must divide the "
                          f"world size {world} (0 = all {world} ranks)")
    if tcfg.seq_len < sp:
        raise ConfigError(f"train.seq_len={tcfg.seq_len} is shorter than the sequence-parallel "
                          f"size {sp}: every rank needs at least one token")
    if tcfg.retrieval_evaluated and tcfg.retrieval_len < sp:
        raise ConfigError(f"retrieval-eval sequences of {tcfg.retrieval_len} tokens "
                          f"(train.retrieval_seq_len) are shorter than the sequence-parallel "
                          f"size {sp}")
    if sp > 1 and tcfg.sp_strategy in ("ulysses", "ds-ulysses"):
        if mcfg.n_kv_head % sp or mcfg.n_head % sp:
            raise ConfigError(f"sp_strategy={tcfg.sp_strategy!r} splits heads over the "
                              f"{sp} ranks: n_head={mcfg.n_head} and n_kv_head={mcfg.n_kv_head} "
                              f"must be multiples of {sp} (strategy 'bucket' has no such rule)")
        if tcfg.seq_len % sp:
            raise ConfigError(f"sp_strategy={tcfg.sp_strategy!r} needs equal shards: "
                              f"seq_len={tcfg.seq_len} must be a multiple of {sp}")
        if tcfg.retrieval_evaluated and tcfg.retrieval_len % sp:
            raise ConfigError(f"sp_strategy={tcfg.sp_strategy!r} needs equal shards: the "
                              f"retrieval-eval length {tcfg.retrieval_len} "
                              f"(train.retrieval_seq_len) must be a multiple of {sp}")
    return {"sp": sp, "dp": world // sp}


# ---------------------------------------------------------------------------------------------
# the DeepSpeed JSON
# ---------------------------------------------------------------------------------------------

def _read_json(tcfg: TrainConfig) -> tuple[str, dict]:
    path = find_file(tcfg.deepspeed_config)
    try:
        with open(path, "rb") as f:
            ds = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: no file {tcfg.deepspeed_config!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"train.deepspeed_config {tcfg.deepspeed_config!r} is a directory, "
                          "not a JSON file") from None
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config {tcfg.deepspeed_config!r}: cannot read it "
                          f"({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object {{...}}, "
                          f"got {type(ds).__name__}")
    return path, ds


def deepspeed_config(tcfg: TrainConfig, layout: dict, cuda: bool) -> dict:
    """The DeepSpeed JSON with the batch arithmetic, precision and SP mesh filled in."""
    path, ds = _read_json(tcfg)
    sp, dp = layout["sp"], layout["dp"]
    ds["train_micro_batch_size_per_gpu"] = tcfg.micro_batch
    ds["gradient_accumulation_steps"] = tcfg.grad_accum
    ds["train_batch_size"] = tcfg.micro_batch * tcfg.grad_accum * dp
    for key in ("bf16", "fp16", "zero_optimization"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{path}: {key!r} must be an object {{...}}, got {ds[key]!r}")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; train.precision chooses bf16 or fp32")
    bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and cuda)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    # the SP/DP groups come from an mpu (integrations.ds_groups), not from DeepSpeed's
    # "sequence_parallel_size" mesh, which does not reduce gradients across SP ranks
    for key in ("sequence_parallel_size", "data_parallel_size"):
        if key in ds and ds.pop(key) not in (None, sp if key[0] == "s" else dp):
            raise ConfigError(f"{path}: {key} disagrees with train.sequence_parallel={sp} on "
                              f"this world (dp={dp}); set train.sequence_parallel instead")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}: the trainer builds AdamW and its "
                              "schedule from [train] (lr, min_lr, warmup, betas, weight_decay)")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    check_deepspeed_json(ds, path)
    return ds


def check_deepspeed_json(ds: dict, path: str):
    """Let DeepSpeed's own config classes check the JSON (types, ZeRO stage, unknown
    ZeRO keys, ...) before any process starts, as a :class:`ConfigError` naming the file.
    Also checks what the trainer reads itself (``gradient_clipping``)."""
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise ConfigError(f"{path}: gradient_clipping must be a number >= 0, got {clip!r}")
    import logging
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.utils import logger
    except ImportError:         # the trainer itself needs DeepSpeed and says so
        return
    level = logger.level
    logger.setLevel(logging.WARNING)    # its INFO lines are for the real engine
    try:
        # DeepSpeed checks train_batch_size against its idea of the data-parallel size
        # (the world without a process group or mpu): check the batch of one
        # data-parallel rank, under an mpu that says so (train_batch_size is ours anyway)
        DeepSpeedConfig({**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"]
                         * ds["gradient_accumulation_steps"]}, mpu=_OneDataParallelRank())
    except (ValueError, TypeError, AssertionError, KeyError) as e:
        first = " ".join(str(e).split("\n")[:3]).strip() or type(e).__name__
        raise ConfigError(f"{path}: DeepSpeed rejects it: {' '.join(first.split())}") from None
    finally:
        logger.setLevel(level)


class _OneDataParallelRank:
    def get_data_parallel_world_size(self):
        return 1


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


__all__ = ["ConfigError", "TrainConfig", "load_config", "read_preset", "check_config",
           "check_model_and_train", "deepspeed_config", "check_deepspeed_json",
           "check_compile", "find_file", "PRECISIONS", "ATTENTIONS", "SP_STRATEGIES"]

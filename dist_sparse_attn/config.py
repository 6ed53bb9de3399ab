"""The training configuration: :class:`TrainConfig`, TOML presets with ``--set`` overrides,
validation, and the DeepSpeed JSON checked against them and completed from them.

A preset has a ``[model]`` table of :class:`~dist_sparse_attn.model.GPTConfig` fields and a
``[train]`` table of :class:`TrainConfig` fields. Both dataclasses declare every field's
type and range next to it (:func:`dist_sparse_attn.schema.setting`); :func:`load_config`
checks every value against them in one place (:func:`dist_sparse_attn.schema.validate`),
then the relations between fields, so a bad preset or override stops with one
:class:`ConfigError` naming the field, what it accepts and where the value came from:

    model.n_layer must be an int >= 1, got 0 (--set model.n_layer=0)

:func:`check_config` adds the rules that depend on the world size, :func:`deepspeed_config`
reads the DeepSpeed JSON, checks it against the preset and fills in what it leaves out
(the rules are in its docstring). Preset names such as ``configs/tiny.toml`` resolve in
the current directory, then among the presets shipped inside the package
(``dist_sparse_attn/configs/``), so they work from a source checkout and from an installed
wheel alike (:func:`find_file`). Nothing here starts a process group or imports DeepSpeed
at import time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from .model import ATTENTIONS, GPTConfig
from .model import SP_STRATEGIES as _LIBRARY_STRATEGIES
from .schema import parse_text, setting, validate, validate_instance

PACKAGE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PACKAGE)
"""The source checkout holding the package (for an installed wheel: site-packages)."""
PRESETS = os.path.join(PACKAGE, "configs")
"""The shipped presets (``*.toml``) and DeepSpeed configs (``ds/*.json``)."""
PRECISIONS = ("auto", "bf16", "fp32")
SP_STRATEGIES = _LIBRARY_STRATEGIES + ("ds-ulysses",)
"""``train.sp_strategy``: the library's strategies
(:data:`dist_sparse_attn.model.SP_STRATEGIES`) or "ds-ulysses", DeepSpeed-Ulysses over dense SDPA, the baseline the benchmarks compare
with (:func:`dist_sparse_attn.integrations.deepspeed.ulysses_dense_attention`)."""
DEEPSPEED_GRADIENT_CLIPPING = 1.0
"""The gradient-norm clip DeepSpeed applies when the JSON has no "gradient_clipping"
(its ``GRADIENT_CLIPPING_DEFAULT``, 1.0 in DeepSpeed 0.19.8); 0 turns clipping off."""


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
    """Ranks per sequence-parallel group sp (must divide the world size); 0 = the DeepSpeed
    JSON's ``sequence_parallel_size`` if it has one, else all ranks."""
    sp_strategy: str = setting("bucket", choices=SP_STRATEGIES)
    """"bucket", "ulysses", "allgather" or "ds-ulysses" (see :mod:`dist_sparse_attn.model`)."""
    deepspeed_config: str = setting("configs/ds/zero1.json", nonempty=True)
    """DeepSpeed JSON (``--deepspeed_config`` on the command line); relative paths: to the
    current directory, then the shipped ``configs/`` (:func:`find_file`). What it sets
    must agree with this table: :func:`deepspeed_config`."""
    precision: str = setting("auto", choices=PRECISIONS)
    """"auto" (the DeepSpeed JSON's ``bf16.enabled`` if it sets it, else bf16 on CUDA and
    fp32 on CPU), "bf16" or "fp32"."""
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
    """False: save no checkpoint at all (then checkpoint_interval must be 0)."""
    seed: int = setting(1337, ge=0)
    out_dir: str = setting("runs/default", nonempty=True)
    overwrite: bool = setting(False)
    """A fresh run (no ``--resume``) into an out_dir that holds an earlier run's
    checkpoints or metrics.jsonl: False refuses it (exit 2, nothing touched); True
    deletes them first."""
    timeout_min: float = setting(10.0, gt=0.0)
    """Collective timeout of every process group (minutes): a rank that dies or stalls
    makes the others fail after this."""
    warmup_steps_excluded: int = setting(2, ge=0)
    """Steps left out of the step-time statistics and the ETA (compilation, allocator warmup)."""
    peak_tflops: float = setting(0.0, ge=0.0)
    """Peak dense bf16 TFLOP/s of one device, for the MFU in the progress line and
    summary; 0 = by device name (H100, H200, A100:
    :data:`dist_sparse_attn.metrics.PEAK_BF16_TFLOPS`), and no MFU on other devices."""
    profile: bool = setting(False)
    """Profile one step after the excluded warmup steps (torch.profiler) and write the
    top operators by device time, then by allocated memory, and the step's peak memory
    to ``out_dir/profile_rank<r>.txt`` (where the step and the memory go)."""

    def __post_init__(self):
        validate_instance(self, "train.")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr:g} must be <= train.lr={self.lr:g} "
                              "(the cosine schedule decays from lr to min_lr)")
        if self.checkpoint_interval and not self.save_checkpoint:
            raise ConfigError(f"train.checkpoint_interval={self.checkpoint_interval} saves "
                              "nothing with train.save_checkpoint=false: set one of them")
        if self.retrieval_mix > 0 and self.seq_len < RETRIEVAL_MIN_LEN:
            raise ConfigError(f"train.retrieval_mix > 0 needs train.seq_len >= "
                              f"{RETRIEVAL_MIN_LEN} (a retrieval sequence), got {self.seq_len}")
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
    """``path`` as given if it exists (or is absolute); else a shipped file when it starts
    with ``configs/`` (``configs/tiny.toml`` is ``dist_sparse_attn/configs/tiny.toml``,
    in a checkout and in an installed wheel); else relative to the source checkout;
    else ``path`` unchanged (the caller reports it missing)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    head, sep, rest = path.replace(os.sep, "/").partition("/")
    if sep and head == "configs" and os.path.exists(os.path.join(PRESETS, rest)):
        return os.path.join(PRESETS, rest)
    if os.path.isfile(os.path.join(REPO, "pyproject.toml")):       # a source checkout
        alt = os.path.join(REPO, path)
        if os.path.exists(alt):
            return alt
    return path


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


def load_config(path: str | None, overrides=(), *,
                sources: dict | None = None) -> tuple[GPTConfig, TrainConfig]:
    """Read a TOML preset and apply ``section.field=value`` overrides; check every field's
    type and range, then the relations between fields.

    ``sources``: a dict to fill with where each field that was set came from,
    ``{"model": {field: "in FILE" or "--set ..."}, "train": {...}}`` (fields left at
    their defaults are absent). Raises :class:`ConfigError` (one line) naming the file,
    section or field."""
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
    if sources is not None:
        sources.update(origin)
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
    if sp > 1 and mcfg.sdpa_backend != "auto" and tcfg.sp_strategy != "ds-ulysses":
        raise ConfigError(f"model.sdpa_backend={mcfg.sdpa_backend!r} is not used by "
                          f"train.sp_strategy={tcfg.sp_strategy!r} (sp={sp}): the library's "
                          "strategies run dense attention on their own kernels; use "
                          "train.sp_strategy='ds-ulysses' (DeepSpeed-Ulysses over SDPA) or "
                          "model.sdpa_backend='auto'")
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

def read_deepspeed_json(tcfg: TrainConfig) -> tuple[str, dict]:
    """(the resolved path, the parsed object) of ``train.deepspeed_config``."""
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


def _unset(value) -> bool:
    """A JSON value that leaves the choice to the preset: absent (None) or "auto"."""
    return value is None or value == "auto"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sequence_parallel_from_json(tcfg: TrainConfig) -> str | None:
    """The DeepSpeed JSON's ``sequence_parallel_size``, if it has one, becomes
    ``train.sequence_parallel`` (before the layout is checked against the world size):
    a ConfigError if both are set and differ. Returns the JSON's path when it set sp,
    else None. The groups are built by
    :class:`~dist_sparse_attn.integrations.ds_groups.SequenceParallelMPU` either way
    (DeepSpeed's own mesh does not reduce gradients across sequence-parallel ranks)."""
    path, ds = read_deepspeed_json(tcfg)
    sp = ds.get("sequence_parallel_size")
    if _unset(sp):
        return None
    if not _is_int(sp) or sp < 1:
        raise ConfigError(f"{path}: sequence_parallel_size must be an int >= 1, got {sp!r}")
    if tcfg.sequence_parallel and tcfg.sequence_parallel != sp:
        raise ConfigError(f"{path}: sequence_parallel_size={sp} disagrees with "
                          f"train.sequence_parallel={tcfg.sequence_parallel}: set one of them "
                          "(train.sequence_parallel=0 takes the JSON's)")
    tcfg.sequence_parallel = sp
    return path


def _agree_or_fill(ds: dict, key: str, want: int, path: str, preset: str):
    have = ds.get(key)
    if _unset(have):
        ds[key] = want
    elif not _is_int(have) or have != want:
        raise ConfigError(f"{path}: {key}={have!r} disagrees with {preset}: set one of them "
                          "(what the JSON leaves out is taken from the preset)")


def _close(a, b) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)))


def _optimizer_params(tcfg: TrainConfig, opt, path: str) -> dict:
    """The JSON's "optimizer", checked against [train] and completed from it."""
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise ConfigError(f"{path}: 'optimizer' must be an object with a \"type\", got {opt!r}")
    if opt["type"].lower() not in ("adam", "adamw"):
        raise ConfigError(f"{path}: optimizer type {opt['type']!r} is not supported: the "
                          "[train] settings (lr, betas, weight_decay, the warmup + cosine "
                          "schedule) are AdamW's; use \"AdamW\" or \"Adam\", or remove "
                          "'optimizer' (the trainer then builds torch's AdamW)")
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: optimizer.params must be an object {{...}}, got {params!r}")
    if params.get("adam_w_mode", True) is not True:
        raise ConfigError(f"{path}: optimizer.params.adam_w_mode={params['adam_w_mode']!r}: "
                          "train.weight_decay is decoupled (AdamW) weight decay; remove it")
    for key, want in (("lr", tcfg.lr), ("betas", list(tcfg.betas)),
                      ("weight_decay", tcfg.weight_decay)):
        have = params.get(key)
        if _unset(have):
            params[key] = want
            continue
        if key == "betas":
            ok = isinstance(have, list) and len(have) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and _close(b, w)
                for b, w in zip(have, want))
        else:
            ok = isinstance(have, (int, float)) and not isinstance(have, bool) \
                and _close(have, want)
        if not ok:
            shown = tuple(want) if key == "betas" else want
            raise ConfigError(f"{path}: optimizer.params.{key}={have!r} disagrees with "
                              f"train.{key}={shown!r}: set one of them (what the JSON leaves "
                              "out is taken from [train])")
    return opt


def deepspeed_config(tcfg: TrainConfig, layout: dict, cuda: bool, *,
                     world_known: bool = True) -> dict:
    """The DeepSpeed JSON of ``train.deepspeed_config``, checked against the preset and
    completed from it: what the JSON sets is kept, and a preset value that contradicts
    it is a :class:`ConfigError` naming both; what it leaves out (or sets to "auto") is
    filled in from the preset.

    * ``train_micro_batch_size_per_gpu`` = train.micro_batch, ``gradient_accumulation_steps``
      = train.grad_accum, ``train_batch_size`` = micro_batch * grad_accum * dp (not
      compared when ``world_known`` is False: a dry run without a world size);
    * ``bf16.enabled``: train.precision "bf16" / "fp32" must agree with it; "auto" takes
      it (bf16 on CUDA, fp32 on CPU where the JSON does not say); fp16 is refused;
    * ``optimizer``: "Adam" or "AdamW" only; DeepSpeed builds it (fused Adam on GPUs,
      its CPU Adam under ZeRO-Offload, torch's AdamW with ``"torch_adam": true``) over
      the model's weight-decay groups; its ``lr``, ``betas`` and ``weight_decay`` must
      agree with [train] (filled in from there). Without one the trainer builds torch's
      AdamW. Either way the trainer sets the learning rate of every step itself
      (linear warmup, cosine decay: train.lr, min_lr, warmup, steps);
    * ``scheduler`` is refused: the schedule is [train]'s (above);
    * ``sequence_parallel_size`` / ``data_parallel_size`` must equal the layout's sp / dp
      (:func:`sequence_parallel_from_json` makes the first train.sequence_parallel) and
      are removed: the groups come from
      :class:`~dist_sparse_attn.integrations.ds_groups.SequenceParallelMPU`;
    * ``gradient_clipping``: DeepSpeed's default (:data:`DEEPSPEED_GRADIENT_CLIPPING`)
      written in where absent, so the resolved config says what applies;
    * ``tensorboard`` / ``csv_monitor`` without an ``output_path`` write to train.out_dir.
    """
    path, ds = read_deepspeed_json(tcfg)
    sp, dp = layout["sp"], layout["dp"]
    for key in ("bf16", "bfloat16", "fp16", "zero_optimization", "tensorboard", "csv_monitor"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{path}: {key!r} must be an object {{...}}, got {ds[key]!r}")
    _agree_or_fill(ds, "train_micro_batch_size_per_gpu", tcfg.micro_batch, path,
                   f"train.micro_batch={tcfg.micro_batch}")
    _agree_or_fill(ds, "gradient_accumulation_steps", tcfg.grad_accum, path,
                   f"train.grad_accum={tcfg.grad_accum}")
    batch = tcfg.micro_batch * tcfg.grad_accum * dp
    if world_known:
        _agree_or_fill(ds, "train_batch_size", batch, path,
                       f"train.micro_batch * train.grad_accum * dp = {tcfg.micro_batch} * "
                       f"{tcfg.grad_accum} * {dp} = {batch}")
    else:
        ds["train_batch_size"] = batch
    if "bfloat16" in ds:        # DeepSpeed's older name of the block
        if "bf16" in ds:
            raise ConfigError(f"{path}: has both 'bf16' and 'bfloat16' (the same setting): "
                              "keep 'bf16'")
        ds["bf16"] = ds.pop("bfloat16")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is not supported; train.precision chooses bf16 or fp32")
    ds.pop("fp16", None)
    json_bf16 = ds.get("bf16", {}).get("enabled")
    if not _unset(json_bf16) and not isinstance(json_bf16, bool):
        raise ConfigError(f"{path}: bf16.enabled must be true or false, got {json_bf16!r}")
    if tcfg.precision == "auto":
        bf16 = cuda if _unset(json_bf16) else json_bf16
    else:
        bf16 = tcfg.precision == "bf16"
        if not _unset(json_bf16) and json_bf16 != bf16:
            raise ConfigError(f"{path}: bf16.enabled={str(json_bf16).lower()} disagrees with "
                              f"train.precision={tcfg.precision!r}: set one of them "
                              "(train.precision='auto' follows the JSON)")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    for key, value, field in (("sequence_parallel_size", sp, "train.sequence_parallel"),
                              ("data_parallel_size", dp, "the world size")):
        have = ds.pop(key, None)
        if _unset(have) or (key == "data_parallel_size" and not world_known):
            continue
        if have != value:
            raise ConfigError(f"{path}: {key}={have!r} disagrees with the layout of this run "
                              f"(dp {dp} x sp {sp}, from {field})")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the trainer sets the learning rate of "
                          "every step (linear warmup, cosine decay) from [train] (lr, min_lr, "
                          "warmup, steps)")
    if "optimizer" in ds:
        _optimizer_params(tcfg, ds["optimizer"], path)
    ds.setdefault("gradient_clipping", DEEPSPEED_GRADIENT_CLIPPING)
    for key in ("tensorboard", "csv_monitor"):
        if ds.get(key, {}).get("enabled") and not ds[key].get("output_path"):
            ds[key]["output_path"] = tcfg.out_dir
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    check_deepspeed_json(ds, path)
    return ds


def check_deepspeed_json(ds: dict, path: str):
    """Let DeepSpeed's own config classes check the JSON (types, ZeRO stage, unknown
    ZeRO keys, ...) before any process starts, as a :class:`ConfigError` naming the file.
    Also checks what the trainer reads itself (``gradient_clipping``)."""
    clip = ds.get("gradient_clipping", DEEPSPEED_GRADIENT_CLIPPING)
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


def check_compile(mcfg: GPTConfig, ds: dict, sp: int = 1, cuda: bool = True):
    """model.compile="blocks" needs ZeRO 0-2: ZeRO-3 gathers each submodule's parameters
    in forward hooks that are ``torch.compiler.disable``d, so every compiled block breaks
    into pieces at each Linear and LayerNorm, and dynamo recompiles DeepSpeed's own hooks
    until it hits its recompile limit (measured on CPU, DeepSpeed 0.19.8): correct but
    slower than eager, the opposite of the option's purpose.

    model.cuda_graph needs a CUDA device, one rank per sequence (sp = 1) and ZeRO 0-2:
    ZeRO-3 gathers and frees the parameters in hooks around every submodule, host work
    that a graph replay would skip. model.sdpa_backend "cudnn" and "efficient" need a
    CUDA device (PyTorch has no CPU kernel for them)."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not cuda and mcfg.attention == "dense" and mcfg.sdpa_backend in ("cudnn", "efficient"):
        raise ConfigError(f"model.sdpa_backend={mcfg.sdpa_backend!r} needs a CUDA device (this "
                          "run is on the CPU): use 'auto', 'flash' or 'math'")
    if mcfg.cuda_graph:
        why = ("a CUDA device (this run is on the CPU)" if not cuda else
               f"one rank per sequence (sp={sp} shards it)" if sp > 1 else
               "ZeRO 0-2 (ZeRO-3's parameter hooks are host work a replay would skip)"
               if stage == 3 else None)
        if why:
            raise ConfigError(f"model.cuda_graph=true needs {why}: set model.cuda_graph=false")
    if mcfg.compile != "off" and stage == 3:
        raise ConfigError(f"model.compile={mcfg.compile!r} does not work with ZeRO-3 (its "
                          "parameter hooks break every compiled region): use ZeRO 0-2 "
                          "(train.deepspeed_config) or model.compile='off'")
    if mcfg.compile == "model" and sp > 1:
        raise ConfigError("model.compile='model' compiles the single-device forward; with "
                          f"sequence parallelism (sp={sp}) use model.compile='blocks'")


# ---------------------------------------------------------------------------------------------
# resuming with another configuration
# ---------------------------------------------------------------------------------------------

MODEL_SEMANTICS = ("family", "intermediate_size", "vocab_size", "n_layer", "n_head",
                   "n_kv_head", "n_embd", "bias", "dropout", "attention", "n_buckets",
                   "hash_seed", "local_heads", "local_window", "bucket_cap", "qk_keep_rate",
                   "rope_base")
"""The :class:`~dist_sparse_attn.model.GPTConfig` fields that change what the model
computes (its parameters, its attention pattern, its hashing, its dropout). A
``--resume`` whose value differs from the checkpoint's is a :class:`ConfigError` naming
every such field with both values, unless ``--allow-model-change`` is given
(:func:`check_model_changes`); those that set the parameter shapes cannot be changed
even then (the checkpoint would not load)."""
MODEL_SHAPES = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "bias")
"""The model fields every checkpoint records and a resume must match, with or without
``--allow-model-change`` (:func:`dist_sparse_attn.checkpoint.checkpoint_layout`): the
parameters' shapes and the attention's head split."""
MODEL_EXECUTION = ("seq_len", "activation_checkpointing", "offload_checkpoints",
                   "loss_chunk", "mlp_chunk", "sdpa_backend", "compile", "cuda_graph",
                   "compile_backend")
"""The other GPTConfig fields: how the same function is computed (memory, kernels,
compilation), and ``seq_len``, which only mirrors ``train.seq_len`` (no part of the model
depends on it). Like every ``[train]`` field and the DeepSpeed JSON, they may change on
resume; the changes are listed in a notice (:func:`config_changes`)."""
ABSENT = type("Absent", (), {"__repr__": lambda self: "(absent)"})()
"""In :func:`config_changes`: the key is not in that record."""


def run_config(mcfg: GPTConfig, tcfg: TrainConfig, ds: dict, world) -> dict:
    """The resolved configuration of a run, as ``config.json`` and each checkpoint's
    record hold it (JSON values: a tuple is a list)."""
    return json.loads(json.dumps({"model": dataclasses.asdict(mcfg),
                                  "train": dataclasses.asdict(tcfg),
                                  "deepspeed": ds, "world": world}))


def _flat(prefix: str, value, out: dict):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, old value, new value)`` for every field of the sections ``model``, ``train``
    and ``deepspeed`` (nested keys joined by dots) that differs between two
    :func:`run_config` records, in their order. A [model] or [train] field that ``old``
    lacks (a field added since it was saved) counts as its default; a key only one side
    has is :data:`ABSENT` on the other. ``deepspeed.train_batch_size`` is left out (it is
    micro_batch x grad_accum x dp, each compared on its own)."""
    defaults = {sec: {f.name: f.default for f in dataclasses.fields(cls)}
                for sec, cls in _classes().items()}
    changes = []
    for sec in ("model", "train", "deepspeed"):
        a, b = {}, {}
        _flat(sec, dict(old.get(sec) or {}), a)
        _flat(sec, dict(new.get(sec) or {}), b)
        for name, value in defaults.get(sec, {}).items():
            a.setdefault(f"{sec}.{name}", json.loads(json.dumps(value)))
        a.pop("deepspeed.train_batch_size", None)
        b.pop("deepspeed.train_batch_size", None)
        for key in list(a) + [k for k in b if k not in a]:
            va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
            if va != vb:
                changes.append((key, va, vb))
    return changes


def describe_change(key: str, old, new) -> str:
    """``key: old -> new``, the values as Python literals ("(absent)": not in that record)."""
    return f"{key}: {old!r} -> {new!r}"


def is_model_change(key: str) -> bool:
    """Whether a :func:`config_changes` key names a :data:`MODEL_SEMANTICS` field."""
    return key.startswith("model.") and key[len("model."):] in MODEL_SEMANTICS


def check_model_changes(old: dict, new: dict, allow: bool, what: str):
    """Raise :class:`ConfigError` if the model of the :func:`run_config` record ``new``
    computes something else than that of ``old`` (a :data:`MODEL_SEMANTICS` field differs),
    naming every such field with both values; ``allow`` (``--allow-model-change``)
    accepts them, except those that set the parameter shapes. ``what`` names the
    checkpoint in the message."""
    changed = [(k, a, b) for k, a, b in config_changes(old, new) if is_model_change(k)]
    listed = "; ".join(describe_change(*c) for c in changed)
    shapes = [k for k, _, _ in changed if k[len("model."):] in MODEL_SHAPES]
    if shapes:
        raise ConfigError(f"--resume: {what} holds parameters of another shape ("
                          f"{', '.join(shapes)}): {listed}. They cannot be loaded into this "
                          "model, with or without --allow-model-change: resume with the "
                          "checkpoint's values")
    if changed and not allow:
        raise ConfigError(f"--resume: this run's model computes something else than the one "
                          f"{what} was trained as: {listed}. Resume with the checkpoint's "
                          "values, start a new run (another train.out_dir), or pass "
                          "--allow-model-change to go on training these weights as the "
                          "changed model")


def earlier_run(path: str) -> list[str]:
    """The outputs of an earlier run in out_dir ``path`` that a fresh run would replace
    or mix with: its checkpoints directory (when not empty) and its metrics.jsonl."""
    found = []
    ckpt = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        found.append(ckpt)
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        found.append(os.path.join(path, "metrics.jsonl"))
    return found


def check_fresh_out_dir(tcfg, resume: bool, remove: bool):
    """A fresh run (``resume`` False) may start in ``tcfg.out_dir`` only if it holds no
    earlier run (:func:`earlier_run`) or ``train.overwrite`` is set; ``remove``: delete
    what ``overwrite`` allows (else only check). Raises :class:`ConfigError`."""
    found = [] if resume else earlier_run(tcfg.out_dir)
    if not found:
        return
    if not tcfg.overwrite:
        raise ConfigError(f"train.out_dir {tcfg.out_dir!r} holds an earlier run "
                          f"({', '.join(os.path.basename(f) for f in found)}): continue it with "
                          f"--resume latest, choose another train.out_dir, or set "
                          f"train.overwrite=true to delete it")
    if remove:
        for f in found:
            shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)


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


__all__ = ["ConfigError", "TrainConfig", "load_config", "read_preset", "check_config",
           "check_model_and_train", "read_deepspeed_json", "sequence_parallel_from_json",
           "deepspeed_config", "check_deepspeed_json", "check_compile", "check_out_dir",
           "check_fresh_out_dir", "earlier_run", "run_config", "config_changes",
           "describe_change", "is_model_change", "check_model_changes", "MODEL_SEMANTICS",
           "MODEL_SHAPES", "ABSENT",
           "MODEL_EXECUTION",
           "find_file", "PRESETS", "PRECISIONS", "DEEPSPEED_GRADIENT_CLIPPING", "ATTENTIONS",
           "SP_STRATEGIES"]

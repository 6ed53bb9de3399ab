"""The training configuration (:mod:`dist_sparse_attn.config`, :mod:`dist_sparse_attn.schema`):
every bad preset, override, DeepSpeed JSON or output directory stops the entry point with
exit code 2 and ONE line on stderr naming the field or file, before anything trains.

Most cases run ``train.main([... "--dry-run"])`` in this process (no process group, no
launcher: the world size comes from ``--world-size`` or ``WORLD_SIZE``); the same checks
run in a launched job (tests/test_train.py and tests/test_launch.py start real ones).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from dist_sparse_attn import train
from dist_sparse_attn.config import ConfigError, TrainConfig, load_config
from dist_sparse_attn.model import GPTConfig
from dist_sparse_attn.schema import fields_of
from helpers import REPO, clear_launch_vars


SMALL = """\
[model]
n_layer = 2
n_head = 4
n_embd = 64
attention = "hash"
n_buckets = 4

[train]
seq_len = 256
micro_batch = 2
max_bytes = 300000
steps = 5
eval_iters = 1
deepspeed_config = "configs/ds/zero1.json"
"""


@pytest.fixture
def clean_env(monkeypatch):
    clear_launch_vars(monkeypatch)
    return monkeypatch


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def dry_run(capsys, config, *extra, out=None, sets=()):
    argv = ["--config", str(config), "--dry-run", "--device", "cpu"]
    if out is not None:
        argv += ["--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    rc = train.main(argv + list(extra))
    return rc, capsys.readouterr()


def assert_one_line_error(rc, cap, *texts):
    """Exit code 2, exactly one line on stderr, the configuration-error prefix, ``texts``."""
    lines = cap.err.splitlines()
    assert rc == 2, f"exit {rc}; stdout:\n{cap.out}\nstderr:\n{cap.err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{cap.err}"
    assert lines[0].startswith("[train] configuration error: "), lines[0]
    for t in texts:
        assert t in lines[0], f"{t!r} not in {lines[0]!r}"
    assert "Traceback" not in cap.err and "dry run" not in cap.out, (cap.out, cap.err)


# ---------------------------------------------------------------------------------------------
# the schema: every field typed and bounded
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [GPTConfig, TrainConfig], ids=["GPTConfig", "TrainConfig"])
def test_every_field_has_a_type_and_range(cls):
    """Numbers have a lower bound, strings a set of choices or must be non-empty."""
    loose = []
    for name, (tp, c) in fields_of(cls).items():
        base = tp.__args__[0] if getattr(tp, "__args__", None) and type(None) in tp.__args__ \
            else tp
        if base in (int, float) or getattr(base, "__origin__", None) is tuple:
            if c.ge is None and c.gt is None:
                loose.append(name)
        elif base is str:
            if c.choices is None and not c.nonempty:
                loose.append(name)
        else:
            assert base is bool, f"{cls.__name__}.{name}: unexpected type {tp!r}"
    assert not loose, f"{cls.__name__} fields without a range or choices: {loose}"


def _bad_values(tp, c):
    """Values outside a field's declared type or range (one per way of being wrong)."""
    base = tp.__args__[0] if getattr(tp, "__args__", None) and type(None) in tp.__args__ \
        else tp
    if c.choices is not None:
        return ["no-such-choice", 3]
    if base is bool:
        return ["maybe", 1]
    if base is str:
        return [5, ""] if c.nonempty else [5]
    if getattr(base, "__origin__", None) is tuple:
        n = len(base.__args__)
        lo = c.ge if c.ge is not None else c.gt
        return [[0.5] * (n + 1), ["a"] * n, [lo - 1] * n] + \
            ([[c.lt if c.lt is not None else c.le + 1] * n] if (c.lt, c.le) != (None, None) else [])
    out = ["abc", True, float("nan") if base is float else 1.5]
    if c.ge is not None:
        out.append(c.ge - 1)
    if c.gt is not None:
        out.append(c.gt)
    if c.lt is not None:
        out.append(c.lt)
    if c.le is not None:
        out.append(c.le + 1)
    return out


def _toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    return repr(v)


_GENERATED = [(sec, name, bad) for sec, cls in (("model", GPTConfig), ("train", TrainConfig))
              for name, (tp, c) in fields_of(cls).items() for bad in _bad_values(tp, c)]


@pytest.mark.parametrize("sec,name,bad", _GENERATED,
                         ids=[f"{s}.{n}={b!r}" for s, n, b in _GENERATED])
def test_every_field_rejects_bad_values_in_toml(sec, name, bad, tmp_path, capsys, clean_env):
    """For every field, each value outside its type or range, written into the preset,
    stops the dry run with one line naming the field and the file."""
    text = SMALL.replace(f"[{sec}]\n", f"[{sec}]\n{name} = {_toml_literal(bad)}\n", 1)
    # a field the preset sets already: drop the preset's line
    lines, seen = [], set()
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        key = line.split("=")[0].strip()
        if current == sec and key == name:
            if key in seen:
                continue
            seen.add(key)
        lines.append(line)
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    rc, cap = dry_run(capsys, path, out=tmp_path / "out")
    assert_one_line_error(rc, cap, f"{sec}.{name}", str(path))
    assert not (tmp_path / "out").exists()


# invalid values given through --set, with their exact messages
SET_ERRORS = {
    "model.n_layer=0": "model.n_layer must be an int >= 1, got 0",
    "model.n_layer=-2": "model.n_layer must be an int >= 1, got -2",
    "model.n_embd=-128": "model.n_embd must be an int >= 2, got -128",
    "model.n_head=0": "model.n_head must be an int >= 1, got 0",
    "model.n_kv_head=0": "model.n_kv_head must be None or an int >= 1, got 0",
    "model.vocab_size=0": "model.vocab_size must be an int >= 1, got 0",
    "model.dropout=1.0": "model.dropout must be a number in [0, 1), got 1.0",
    "model.local_window=0": "model.local_window must be an int >= 1, got 0",
    "model.qk_keep_rate=1.5": "model.qk_keep_rate must be a number in (0, 1], got 1.5",
    "model.n_layer=four": "model.n_layer must be an int >= 1, got 'four'",
    "model.bias=maybe": "model.bias must be a bool (true or false), got 'maybe'",
    "train.lr=-1": "train.lr must be a number > 0, got -1.0",
    "train.lr=0": "train.lr must be a number > 0, got 0.0",
    "train.lr=nan": "train.lr must be a number > 0, got nan",
    "train.min_lr=-1e-4": "train.min_lr must be a number >= 0, got -0.0001",
    "train.timeout_min=-1": "train.timeout_min must be a number > 0, got -1.0",
    "train.timeout_min=0": "train.timeout_min must be a number > 0, got 0.0",
    "train.warmup=-1": "train.warmup must be an int >= 0, got -1",
    "train.eval_iters=0": "train.eval_iters must be an int >= 1, got 0",
    "train.log_interval=0": "train.log_interval must be an int >= 1, got 0",
    "train.eval_interval=-5": "train.eval_interval must be an int >= 0, got -5",
    "train.checkpoint_interval=-1": "train.checkpoint_interval must be an int >= 0, got -1",
    "train.max_bytes=0": "train.max_bytes must be an int >= 1, got 0",
    "train.val_fraction=0": "train.val_fraction must be a number in (0, 1), got 0.0",
    "train.val_fraction=1": "train.val_fraction must be a number in (0, 1), got 1.0",
    "train.betas=0.9,1.0": "train.betas must be a list of 2 numbers, each in [0, 1)",
    "train.betas=0.9": "train.betas must be a list of 2 numbers",
    "train.seq_len=0": "train.seq_len must be an int >= 1, got 0",
    "train.steps=0": "train.steps must be an int >= 1, got 0",
    "train.micro_batch=-1": "train.micro_batch must be an int >= 1, got -1",
    "train.weight_decay=-0.1": "train.weight_decay must be a number >= 0, got -0.1",
    "train.sequence_parallel=-1": "train.sequence_parallel must be an int >= 0, got -1",
    "train.retrieval_mix=1": "train.retrieval_mix must be a number in [0, 1), got 1.0",
    "train.seed=-3": "train.seed must be an int >= 0, got -3",
    "train.sp_strategy=ring": "train.sp_strategy must be one of",
    "train.out_dir=": "train.out_dir must be a non-empty string, got ''",
    # relations between fields
    "train.min_lr=0.1": "train.min_lr=0.1 must be <= train.lr=0.003",
    "train.checkpoint_interval=2 train.save_checkpoint=false":
        "train.checkpoint_interval=2 saves nothing with train.save_checkpoint=false",
    "model.seq_len=128": "model.seq_len=128 differs from train.seq_len=256",
    "model.vocab_size=100": "model.vocab_size must be >= 256",
}


@pytest.mark.parametrize("item", sorted(SET_ERRORS))
def test_bad_override(item, config, tmp_path, capsys, clean_env):
    rc, cap = dry_run(capsys, config, out=tmp_path / "out", sets=item.split(" "))
    assert_one_line_error(rc, cap, SET_ERRORS[item])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# preset files
# ---------------------------------------------------------------------------------------------

TOML_ERRORS = {
    # name: (file content or bytes, expected texts)
    "malformed": ("[model\nn_layer = 2\n", ["not valid TOML"]),
    "string_for_int": (SMALL.replace("n_layer = 2", 'n_layer = "four"'),
                       ["model.n_layer must be an int >= 1, got 'four'"]),
    "float_for_int": (SMALL.replace("n_layer = 2", "n_layer = 2.0"),
                      ["model.n_layer must be an int >= 1, got 2.0"]),
    "bool_for_float": (SMALL.replace("steps = 5", "steps = 5\nlr = true"),
                       ["train.lr must be a number > 0, got True"]),
    "date_for_int": (SMALL.replace("steps = 5", "steps = 2024-01-01"),
                     ["train.steps must be an int >= 1"]),
    "section_not_a_table": ("model = 3\n", ["model must be a table"]),
    "unknown_section": (SMALL + "\n[optim]\nlr = 1\n", ["unknown section [optim]"]),
    "unknown_field": (SMALL.replace("steps = 5", "stepz = 5"),
                      ["[train] has unknown field(s) ['stepz']"]),
    "not_utf8": (b"[model]\nn_layer = \xff\xfe\n", ["not valid TOML"]),
    "betas_one_item": (SMALL.replace("steps = 5", "steps = 5\nbetas = [0.9]"),
                       ["train.betas must be a list of 2 numbers"]),
}


@pytest.mark.parametrize("case", sorted(TOML_ERRORS))
def test_bad_preset_file(case, tmp_path, capsys, clean_env):
    content, texts = TOML_ERRORS[case]
    path = tmp_path / "bad.toml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    rc, cap = dry_run(capsys, path, out=tmp_path / "out")
    assert_one_line_error(rc, cap, *texts)


def test_missing_or_directory_preset(tmp_path, capsys, clean_env):
    rc, cap = dry_run(capsys, tmp_path / "nope.toml")
    assert_one_line_error(rc, cap, "--config: no file", "nope.toml")
    rc, cap = dry_run(capsys, tmp_path)
    assert_one_line_error(rc, cap, "is a directory")


def test_tomllib_missing_gives_a_clear_error(config, monkeypatch):
    """Python 3.10 has no tomllib: without tomli too, a ConfigError that says what to install."""
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="needs the tomli package"):
        load_config(str(config))


# ---------------------------------------------------------------------------------------------
# the Python API
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,text", [
    (dict(n_layer=0), "n_layer must be an int >= 1, got 0"),
    (dict(n_layer=-2), "n_layer must be an int >= 1, got -2"),
    (dict(n_embd=-128), "n_embd must be an int >= 2, got -128"),
    (dict(n_head="4"), "n_head must be an int >= 1, got '4'"),
    (dict(dropout=-0.1), "dropout must be a number in [0, 1), got -0.1"),
    (dict(rope_base=0.5), "rope_base must be a number > 1, got 0.5"),
    (dict(vocab_size=0), "vocab_size must be an int >= 1, got 0"),
])
def test_gptconfig_rejects(kw, text):
    with pytest.raises(ValueError) as e:
        GPTConfig(**kw)
    assert str(e.value) == text


def test_sdpa_backend_where_it_would_be_ignored(config, tmp_path, capsys, clean_env):
    """model.sdpa_backend picks the SDPA kernel of dense attention on one device and of
    sp_strategy='ds-ulysses'; a choice that nothing would read is an error, not a silent
    no-op: with attention 'hash' (or family 'hf'), and with dense attention sharded by a
    library strategy (which runs the library's kernels)."""
    with pytest.raises(ValueError, match="sdpa_backend='math' applies to attention='dense'"):
        GPTConfig(attention="hash", sdpa_backend="math")
    with pytest.raises(ValueError, match="sdpa_backend='math'"):
        GPTConfig(family="hf", attention="dense", sdpa_backend="math")
    dense = ["model.attention=dense", "model.sdpa_backend=math"]
    rc, cap = dry_run(capsys, config, "--world-size", "2", out=tmp_path / "o", sets=dense)
    assert_one_line_error(rc, cap, "model.sdpa_backend='math' is not used by "
                                   "train.sp_strategy='bucket'")
    for ok in (["--world-size", "1"], ["--world-size", "2"]):
        sets = dense + (["train.sp_strategy=ds-ulysses"] if ok[1] == "2" else [])
        rc, cap = dry_run(capsys, config, *ok, out=tmp_path / "o", sets=sets)
        assert rc == 0, cap.err
    rc, cap = dry_run(capsys, config, "--world-size", "2", out=tmp_path / "o",
                      sets=["model.attention=dense"])
    assert rc == 0, cap.err


@pytest.mark.parametrize("kw,text", [
    (dict(lr=-1.0), "train.lr must be a number > 0, got -1.0"),
    (dict(timeout_min=0), "train.timeout_min must be a number > 0, got 0"),
    (dict(betas=(0.9, 1.5)), "train.betas must be a list of 2 numbers, each in [0, 1)"),
    (dict(eval_iters=0), "train.eval_iters must be an int >= 1, got 0"),
    (dict(steps=2.5), "train.steps must be an int >= 1, got 2.5"),
])
def test_trainconfig_rejects(kw, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        TrainConfig(**kw)


def test_valid_configs_load_unchanged():
    """Every shipped preset passes, and defaults are what the dataclasses say."""
    for name in ("tiny", "gpt2_small_16k", "gpt2_small_128k_sp4"):
        m, t = load_config(os.path.join(REPO, "configs", f"{name}.toml"))
        assert m.seq_len == t.seq_len and isinstance(t.betas, tuple)
    m, t = load_config(None, ["train.betas=0.8,0.99", "model.n_kv_head=none"])
    assert t.betas == (0.8, 0.99) and m.n_kv_head == m.n_head
    assert dataclasses.asdict(TrainConfig())["lr"] == 3e-3


# ---------------------------------------------------------------------------------------------
# the DeepSpeed JSON, the output directory, the world size
# ---------------------------------------------------------------------------------------------

DS_ERRORS = {
    "not_an_object": ("[1, 2]", "must be a JSON object"),
    "not_json": ("{zero: 1}", "not valid JSON"),
    "stage_7": ('{"zero_optimization": {"stage": 7}}', "DeepSpeed rejects it"),
    "zero_not_object": ('{"zero_optimization": 5}', "'zero_optimization' must be an object"),
    "unknown_zero_key": ('{"zero_optimization": {"stage": 1, "stagee": 2}}',
                         "DeepSpeed rejects it"),
    "clipping_string": ('{"gradient_clipping": "a"}', "gradient_clipping must be a number"),
    "optimizer_section": ('{"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}',
                          "optimizer.params.lr=0.1 disagrees with train.lr=0.003"),
    "fp16": ('{"fp16": {"enabled": true}}', "fp16 is not supported"),
}


@pytest.mark.parametrize("case", sorted(DS_ERRORS))
def test_bad_deepspeed_json(case, config, tmp_path, capsys, clean_env):
    pytest.importorskip("deepspeed")
    content, text = DS_ERRORS[case]
    path = tmp_path / "ds.json"
    path.write_text(content)
    rc, cap = dry_run(capsys, config, out=tmp_path / "out",
                      sets=[f"train.deepspeed_config={path}"])
    assert_one_line_error(rc, cap, text)
    assert str(path) in cap.err or "train.deepspeed_config" in cap.err


def test_out_dir_is_a_file(config, tmp_path, capsys, clean_env):
    f = tmp_path / "file"
    f.write_text("x")
    rc, cap = dry_run(capsys, config, out=f)
    assert_one_line_error(rc, cap, "train.out_dir", "exists and is not a directory")
    rc, cap = dry_run(capsys, config, out=f / "sub")
    assert_one_line_error(rc, cap, "train.out_dir", "is not a directory")


def _unwritable(tmp_path):
    """A directory this process cannot create entries in (root ignores permission bits:
    sysfs refuses new entries even to root)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d / "out"
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root without /sys: no unwritable directory to test with")
    return "/sys/kernel/dsa_test_out"


def test_out_dir_unwritable(config, tmp_path, capsys, clean_env):
    rc, cap = dry_run(capsys, config, out=_unwritable(tmp_path))
    assert_one_line_error(rc, cap, "train.out_dir", "cannot be")


def test_world_size_option(config, tmp_path, capsys, clean_env):
    rc, cap = dry_run(capsys, config, "--world-size", "3", out=tmp_path / "o",
                      sets=["train.sequence_parallel=2"])
    assert_one_line_error(rc, cap, "train.sequence_parallel=2 must divide the world size 3")
    rc, cap = dry_run(capsys, config, "--world-size", "4", out=tmp_path / "o",
                      sets=["train.sequence_parallel=2"])
    assert rc == 0, cap.err
    assert "world 4 = dp 2 x sp 2" in cap.out and "NOT checked" not in cap.out, cap.out
    rc, cap = dry_run(capsys, config, "--world-size", "0", out=tmp_path / "o")
    assert_one_line_error(rc, cap, "--world-size must be >= 1, got 0")


def test_dry_run_says_when_world_size_is_unknown(tmp_path, capsys, clean_env):
    """The 4-GPU preset under plain python: the plan says the world-size rules were not
    checked and what sequence_parallel means; given --world-size 4 it checks them."""
    preset = os.path.join(REPO, "configs", "gpt2_small_128k_sp4.toml")
    rc, cap = dry_run(capsys, preset, out=tmp_path / "o")
    assert rc == 0, cap.err
    assert "world size NOT checked" in cap.out and "--world-size N" in cap.out, cap.out
    assert "train.sequence_parallel=0" in cap.out, cap.out
    rc, cap = dry_run(capsys, preset, "--world-size", "4", out=tmp_path / "o")
    assert rc == 0, cap.err
    assert "world 4 = dp 1 x sp 4" in cap.out and "NOT checked" not in cap.out, cap.out
    rc, cap = dry_run(capsys, preset, out=tmp_path / "o", sets=["train.sequence_parallel=4"])
    assert rc == 0 and "needs a world size that is a multiple of 4" in cap.out, cap.out


def test_world_size_needs_dry_run(config, tmp_path, capsys, clean_env):
    rc = train.main(["--config", str(config), "--world-size", "2", "--device", "cpu"])
    assert_one_line_error(rc, capsys.readouterr(), "--world-size")


def test_only_rank_0_reports(config, tmp_path, capsys, clean_env, monkeypatch):
    """Inside a launched job (RANK set) rank 0 prints the error at once; every rank exits
    2. The others first wait (a launcher stops the job at the first exit: it must not stop
    rank 0 before its line is out), and print their own line, marked with their rank,
    only if still alive (rank 0 then did not meet the error)."""
    import time
    monkeypatch.setattr(train, "PEER_REPORT_DELAY_S", 0.3)
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    t0 = time.monotonic()
    rc = train.main(["--config", str(config), "--set", "model.n_layer=0", "--device", "cpu"])
    waited = time.monotonic() - t0
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "" and waited >= 0.3, (rc, cap, waited)
    assert cap.err.startswith("[rank 1] [train] configuration error") \
        and cap.err.count("\n") == 1, cap.err
    clean_env.setenv("RANK", "0")
    rc = train.main(["--config", str(config), "--set", "model.n_layer=0", "--device", "cpu"])
    assert_one_line_error(rc, capsys.readouterr(), "model.n_layer")


# ---------------------------------------------------------------------------------------------
# the DeepSpeed JSON is authoritative: what it sets must agree with the preset, what it
# leaves out is filled in from the preset
# ---------------------------------------------------------------------------------------------

NO_JSON = SMALL.replace('deepspeed_config = "configs/ds/zero1.json"\n', "")


def _resolve(tmp_path, ds_json: str, sets=(), world=1, cuda=False):
    """(train config, resolved DeepSpeed dict) of SMALL with ``ds_json`` as its JSON."""
    from dist_sparse_attn.config import check_config, deepspeed_config, sequence_parallel_from_json
    path = tmp_path / "ds.json"
    path.write_text(ds_json)
    mcfg, tcfg = load_config(None, [*SMALL_SETS, f"train.deepspeed_config={path}", *sets])
    sequence_parallel_from_json(tcfg)
    return tcfg, deepspeed_config(tcfg, check_config(mcfg, tcfg, world), cuda)


SMALL_SETS = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "train.seq_len=256",
              "train.micro_batch=2"]


def test_json_values_absent_or_auto_are_filled_from_the_preset(tmp_path):
    tcfg, ds = _resolve(tmp_path, '{"zero_optimization": {"stage": 2}}', ["train.grad_accum=3"],
                        world=4, cuda=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 3, 2 * 3 * 1), ds      # world 4 = sp 4, dp 1
    assert ds["bf16"] == {"enabled": True}          # precision auto on CUDA
    tcfg, ds = _resolve(tmp_path, '{"train_micro_batch_size_per_gpu": "auto", '
                        '"gradient_accumulation_steps": "auto", "train_batch_size": "auto", '
                        '"bf16": {"enabled": "auto"}}', ["train.sequence_parallel=1"], world=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"], ds["bf16"]["enabled"]) == (2, 1, 4, False), ds


def test_json_values_that_agree_are_kept(tmp_path):
    tcfg, ds = _resolve(tmp_path, '{"train_micro_batch_size_per_gpu": 2, '
                        '"gradient_accumulation_steps": 2, "train_batch_size": 8, '
                        '"bf16": {"enabled": true}}',
                        ["train.grad_accum=2", "train.sequence_parallel=1"], world=2)
    assert (ds["train_batch_size"], ds["bf16"]["enabled"]) == (8, True)


def test_precision_auto_follows_the_json(tmp_path):
    """train.precision="auto" takes the JSON's bf16.enabled where it sets one (here on the
    CPU, where auto alone would give fp32, and on CUDA the other way round)."""
    assert _resolve(tmp_path, '{"bf16": {"enabled": true}}')[1]["bf16"]["enabled"] is True
    assert _resolve(tmp_path, '{"bf16": {"enabled": false}}', cuda=True)[1]["bf16"]["enabled"] \
        is False
    # DeepSpeed's older name of the block
    assert _resolve(tmp_path, '{"bfloat16": {"enabled": true}}')[1]["bf16"]["enabled"] is True


def test_gradient_clipping_default_is_deepspeeds(tmp_path):
    """Without "gradient_clipping" DeepSpeed clips at its own default; the resolved config
    writes that value in, so config.json says what applies."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT
    from dist_sparse_attn.config import DEEPSPEED_GRADIENT_CLIPPING
    assert DEEPSPEED_GRADIENT_CLIPPING == GRADIENT_CLIPPING_DEFAULT, deepspeed.__version__
    assert _resolve(tmp_path, "{}")[1]["gradient_clipping"] == GRADIENT_CLIPPING_DEFAULT
    assert _resolve(tmp_path, '{"gradient_clipping": 0}')[1]["gradient_clipping"] == 0


def test_optimizer_block_is_completed_from_train(tmp_path):
    """An "optimizer" is DeepSpeed's to build; its lr, betas and weight_decay come from
    [train] where it leaves them out, and must equal them where it sets them."""
    tcfg, ds = _resolve(tmp_path, '{"optimizer": {"type": "AdamW", "params": '
                        '{"torch_adam": true, "lr": 0.003}}}', ["train.weight_decay=0.05"])
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "torch_adam": True, "lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.05}}, ds
    _, ds = _resolve(tmp_path, '{"optimizer": {"type": "Adam"}}')
    assert ds["optimizer"]["params"]["lr"] == 3e-3


def test_monitor_output_goes_to_out_dir(tmp_path):
    _, ds = _resolve(tmp_path, '{"csv_monitor": {"enabled": true, "job_name": "j"}, '
                     '"tensorboard": {"enabled": true, "output_path": "/elsewhere"}}',
                     ["train.out_dir=runs/x"])
    assert ds["csv_monitor"]["output_path"] == "runs/x"
    assert ds["tensorboard"]["output_path"] == "/elsewhere"


# name: (JSON, --set overrides, --world-size, expected texts)
JSON_CONFLICTS = {
    "micro_batch": ('{"train_micro_batch_size_per_gpu": 4}', [], 1,
                    ["train_micro_batch_size_per_gpu=4 disagrees with train.micro_batch=2"]),
    "grad_accum": ('{"gradient_accumulation_steps": 2}', [], 1,
                   ["gradient_accumulation_steps=2 disagrees with train.grad_accum=1"]),
    "train_batch_size": ('{"train_batch_size": 2}', ["train.sequence_parallel=1"], 2,
                         ["train_batch_size=2 disagrees with train.micro_batch * "
                          "train.grad_accum * dp = 2 * 1 * 2 = 4"]),
    "batch_not_int": ('{"train_batch_size": 2.0}', [], 1, ["train_batch_size=2.0 disagrees"]),
    "precision": ('{"bf16": {"enabled": false}}', ["train.precision=bf16"], 1,
                  ["bf16.enabled=false disagrees with train.precision='bf16'"]),
    "bf16_not_bool": ('{"bf16": {"enabled": 1}}', [], 1, ["bf16.enabled must be true or false"]),
    "scheduler": ('{"scheduler": {"type": "WarmupLR"}}', [], 1,
                  ["remove 'scheduler'", "from [train] (lr, min_lr, warmup, steps)"]),
    "optimizer_betas": ('{"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}',
                        [], 1, ["optimizer.params.betas=[0.9, 0.999] disagrees with "
                                "train.betas=(0.9, 0.95)"]),
    "optimizer_weight_decay": ('{"optimizer": {"type": "AdamW", "params": '
                               '{"weight_decay": 0.0}}}', [], 1,
                               ["optimizer.params.weight_decay=0.0 disagrees with "
                                "train.weight_decay=0.1"]),
    "optimizer_type": ('{"optimizer": {"type": "Lion"}}', [], 1,
                       ["optimizer type 'Lion' is not supported"]),
    "optimizer_no_type": ('{"optimizer": {"params": {}}}', [], 1,
                          ["'optimizer' must be an object with a \"type\""]),
    "adam_l2": ('{"optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}', [], 1,
                ["adam_w_mode=False", "decoupled"]),
    "json_sp_vs_train": ('{"sequence_parallel_size": 2}', ["train.sequence_parallel=4"], 4,
                         ["sequence_parallel_size=2 disagrees with train.sequence_parallel=4"]),
    "json_sp_not_divisor": ('{"sequence_parallel_size": 2}', [], 3,
                            ["train.sequence_parallel=2 must divide the world size 3"]),
    "json_sp_bad": ('{"sequence_parallel_size": 0}', [], 1,
                    ["sequence_parallel_size must be an int >= 1, got 0"]),
    "json_dp": ('{"data_parallel_size": 3}', ["train.sequence_parallel=2"], 4,
                ["data_parallel_size=3 disagrees with the layout of this run (dp 2 x sp 2"]),
}


@pytest.mark.parametrize("case", sorted(JSON_CONFLICTS))
def test_json_contradicting_the_preset_is_an_error(case, config, tmp_path, capsys, clean_env):
    pytest.importorskip("deepspeed")
    content, sets, world, texts = JSON_CONFLICTS[case]
    path = tmp_path / "ds.json"
    path.write_text(content)
    rc, cap = dry_run(capsys, config, "--world-size", str(world), out=tmp_path / "out",
                      sets=[f"train.deepspeed_config={path}", *sets])
    assert_one_line_error(rc, cap, str(path), *texts)


def test_json_sequence_parallel_size_sets_sp(config, tmp_path, capsys, clean_env):
    """sequence_parallel_size in the JSON is used (train.sequence_parallel=0 takes it;
    equal values agree), and the groups still come from the trainer's mpu."""
    path = tmp_path / "ds.json"
    path.write_text('{"sequence_parallel_size": 2, "data_parallel_size": 2}')
    for sets in ([], ["train.sequence_parallel=2"]):
        rc, cap = dry_run(capsys, config, "--world-size", "4", out=tmp_path / "o",
                          sets=[f"train.deepspeed_config={path}", *sets])
        assert rc == 0, cap.err
        assert "world 4 = dp 2 x sp 2" in cap.out, cap.out
    from dist_sparse_attn.config import check_config, deepspeed_config, sequence_parallel_from_json
    mcfg, tcfg = load_config(str(config), [f"train.deepspeed_config={path}"])
    sequence_parallel_from_json(tcfg)
    assert tcfg.sequence_parallel == 2
    ds = deepspeed_config(tcfg, check_config(mcfg, tcfg, 4), False)
    assert "sequence_parallel_size" not in ds and "data_parallel_size" not in ds


def test_dry_run_without_world_size_does_not_check_the_json_batch(config, tmp_path, capsys,
                                                                  clean_env):
    """train_batch_size depends on the world size: a dry run that does not know it plans
    with the preset's and says the JSON's is checked at launch."""
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 16}')
    rc, cap = dry_run(capsys, config, out=tmp_path / "o",
                      sets=[f"train.deepspeed_config={path}", "train.sequence_parallel=1"])
    assert rc == 0, cap.err
    assert "train_batch_size is checked against it at launch" in cap.out, cap.out
    rc, cap = dry_run(capsys, config, "--world-size", "8", out=tmp_path / "o",
                      sets=[f"train.deepspeed_config={path}", "train.sequence_parallel=1"])
    assert rc == 0 and "= 16 sequences" in cap.out, (cap.out, cap.err)


# ---------------------------------------------------------------------------------------------
# DeepSpeed's command-line flags
# ---------------------------------------------------------------------------------------------

def test_deepspeed_flags_are_accepted(tmp_path, capsys, clean_env):
    """--deepspeed_config names the JSON (DeepSpeed's convention) where the preset names
    none; --deepspeed is accepted."""
    preset = tmp_path / "p.toml"
    preset.write_text(NO_JSON)
    rc, cap = dry_run(capsys, preset, "--deepspeed", "--deepspeed_config",
                      "configs/ds/zero3.json", out=tmp_path / "o")
    assert rc == 0, cap.err
    assert "DeepSpeed: ZeRO 3," in cap.out, cap.out


def test_deepspeed_config_flag_conflicts(config, tmp_path, capsys, clean_env):
    """The preset (SMALL names configs/ds/zero1.json) and the flag must name the same file;
    the same file under another name is fine."""
    rc, cap = dry_run(capsys, config, "--deepspeed_config", "configs/ds/zero3.json",
                      out=tmp_path / "o")
    assert_one_line_error(rc, cap, "--deepspeed_config configs/ds/zero3.json and "
                          "train.deepspeed_config='configs/ds/zero1.json'", "give one of them")
    rc, cap = dry_run(capsys, config, "--deepspeed_config", "configs/ds/zero1.json",
                      out=tmp_path / "o")
    assert rc == 0 and "ZeRO 1," in cap.out, cap.err
    rc, cap = dry_run(capsys, config, "--deepspeed_config", "configs/ds/zero1.json",
                      out=tmp_path / "o", sets=["train.deepspeed_config=configs/ds/zero2.json"])
    assert_one_line_error(rc, cap, "(--set train.deepspeed_config=configs/ds/zero2.json)")
    rc, cap = dry_run(capsys, config, "--deepspeed_config", "", out=tmp_path / "o")
    assert_one_line_error(rc, cap, "--deepspeed_config must name a DeepSpeed JSON")


def test_deepspeed_flags_match_add_config_arguments():
    """Every option deepspeed.add_config_arguments declares is accepted, with the same
    kind (flag or value)."""
    import argparse
    deepspeed = pytest.importorskip("deepspeed")
    ours = {a.option_strings[0]: a.nargs for a in _parser_actions() if a.option_strings}
    theirs = argparse.ArgumentParser()
    deepspeed.add_config_arguments(theirs)
    for action in theirs._actions:
        if action.option_strings and action.option_strings[0] != "-h":
            assert action.option_strings[0] in ours, action.option_strings
            assert ours[action.option_strings[0]] == action.nargs, action.option_strings


def _parser_actions():
    """The entry point's argparse actions (parse_args builds the parser)."""
    import argparse
    seen = []
    real = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        seen.extend(self._actions)
        return real(self, [], namespace)
    argparse.ArgumentParser.parse_args = grab
    try:
        train.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen


def test_missing_deepspeed_is_one_line(config, tmp_path, capsys, clean_env):
    """Without DeepSpeed the entry point says what to install: exit 2, one line."""
    clean_env.setitem(sys.modules, "deepspeed", None)
    rc = train.main(["--config", str(config), "--out", str(tmp_path / "o"), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 2, cap
    assert cap.err.splitlines() == ["[train] training needs DeepSpeed: pip install "
                                    "'dist_sparse_attn[train]'"], cap.err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# presets by name, from any directory
# ---------------------------------------------------------------------------------------------

def test_preset_names_resolve_from_any_directory(tmp_path, capsys, clean_env):
    """configs/... names the presets and DeepSpeed configs shipped inside the package, so
    they work outside the repository (as from an installed wheel)."""
    from dist_sparse_attn.config import PRESETS, find_file
    clean_env.chdir(tmp_path)
    assert find_file("configs/tiny.toml") == os.path.join(PRESETS, "tiny.toml")
    assert os.path.isfile(os.path.join(PRESETS, "ds", "zero1.json"))
    m, t = load_config("configs/tiny.toml")
    assert t.deepspeed_config == "configs/ds/zero1.json"
    rc, cap = dry_run(capsys, "configs/tiny.toml", out=tmp_path / "o")
    assert rc == 0 and "ZeRO 1," in cap.out, cap.err
    # a file of that name in the current directory comes first
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.toml").write_text(SMALL)
    assert find_file("configs/tiny.toml") == "configs/tiny.toml"


# ---------------------------------------------------------------------------------------------
# resuming with another configuration (the end-to-end cases are in test_train.py)
# ---------------------------------------------------------------------------------------------

def test_every_model_field_is_classified_for_resume():
    """Every GPTConfig field either changes what the model computes (a resume refuses a
    change unless --allow-model-change) or only how it is computed (a notice): a field
    added to GPTConfig without a decision fails here."""
    from dist_sparse_attn.config import MODEL_EXECUTION, MODEL_SEMANTICS, MODEL_SHAPES
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    both = set(MODEL_SEMANTICS) & set(MODEL_EXECUTION)
    assert not both, both
    assert sorted(MODEL_SEMANTICS + MODEL_EXECUTION) == sorted(names)
    assert set(MODEL_SHAPES) <= set(MODEL_SEMANTICS)


def _run_config(**model):
    from dist_sparse_attn.config import run_config
    base = dict(n_layer=2, n_head=4, n_embd=64, attention="hash", n_buckets=4)
    return run_config(GPTConfig(**{**base, **model}), TrainConfig(), {"zero_optimization":
                                                                     {"stage": 1}}, 2)


@pytest.mark.parametrize("field,value", [
    ("attention", "qk"), ("n_buckets", 8), ("hash_seed", 7), ("local_heads", 2),
    ("local_window", 64), ("bucket_cap", 2.0), ("dropout", 0.1), ("rope_base", 500.0)])
def test_model_change_on_resume_is_refused(field, value):
    from dist_sparse_attn.config import check_model_changes
    old, new = _run_config(), _run_config(**{field: value})
    with pytest.raises(ConfigError) as e:
        check_model_changes(old, new, False, "checkpoint step0000002")
    msg = str(e.value)
    assert f"model.{field}: {old['model'][field]!r} -> {value!r}" in msg, msg
    assert "--allow-model-change" in msg and "step0000002" in msg, msg
    check_model_changes(old, new, True, "checkpoint step0000002")       # allowed


def test_model_change_names_every_field_and_shapes_stay_refused():
    from dist_sparse_attn.config import check_model_changes
    old = _run_config()
    with pytest.raises(ConfigError) as e:
        check_model_changes(old, _run_config(attention="qk", qk_keep_rate=0.3), False, "x")
    assert "model.attention: 'hash' -> 'qk'" in str(e.value), str(e.value)
    assert "model.qk_keep_rate: 0.5 -> 0.3" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:       # parameter shapes: never, flag or not
        check_model_changes(old, _run_config(n_layer=3, attention="qk"), True, "x")
    assert "model.n_layer: 2 -> 3" in str(e.value) and "'hash' -> 'qk'" in str(e.value)
    # how the model is computed may change
    check_model_changes(old, _run_config(loss_chunk=64, activation_checkpointing=True),
                        False, "x")


def test_config_changes_lists_train_model_and_deepspeed_fields():
    from dist_sparse_attn.config import ABSENT, config_changes, run_config
    m = GPTConfig(n_layer=2, n_head=4, n_embd=64)
    old = run_config(m, TrainConfig(steps=100, lr=3e-3), {"gradient_clipping": 1.0,
                                                           "train_batch_size": 2}, 1)
    new = run_config(GPTConfig(n_layer=2, n_head=4, n_embd=64, mlp_chunk=32),
                     TrainConfig(steps=300, lr=1e-3),
                     {"gradient_clipping": 0.5, "train_batch_size": 4, "wandb": {"on": 1}}, 2)
    assert config_changes(old, new) == [
        ("model.mlp_chunk", 0, 32), ("train.steps", 100, 300), ("train.lr", 3e-3, 1e-3),
        ("deepspeed.gradient_clipping", 1.0, 0.5), ("deepspeed.wandb.on", ABSENT, 1)]
    assert config_changes(old, old) == []
    # a field the old record lacks (added since) counts as its default
    del old["model"]["mlp_chunk"]
    assert [c[0] for c in config_changes(old, new)][0] == "model.mlp_chunk"
    # one the new record lacks (removed since) is shown as absent
    del new["model"]["mlp_chunk"]
    assert ("model.mlp_chunk", 0, ABSENT) in config_changes(old, new)


def test_allow_model_change_needs_resume(config, tmp_path, capsys, clean_env):
    rc = train.main(["--config", str(config), "--out", str(tmp_path / "o"), "--dry-run",
                     "--allow-model-change"])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-model-change goes with --resume" in err, err

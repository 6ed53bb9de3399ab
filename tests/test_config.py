"""The training configuration (:mod:`dist_sparse_attn.config`, :mod:`dist_sparse_attn.schema`):
every bad preset, override, DeepSpeed JSON or output directory stops the entry point with
exit code 2 and ONE line on stderr naming the field or file, before anything trains.

Most cases run ``train.main([... "--dry-run"])`` in this process (no process group, no
launcher: the world size comes from ``--world-size`` or ``WORLD_SIZE``); the same checks
run in a launched job (tests/test_train.py and tests/test_launch.py start real ones).
"""
from __future__ import annotations

import configparser
import dataclasses
import os
import sys

import pytest

from dist_sparse_attn import train
from dist_sparse_attn.config import ConfigError, TrainConfig, load_config
from dist_sparse_attn.model import GPTConfig
from dist_sparse_attn.schema import fields_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
                "PMIX_RANK")

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
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
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


# the cases of the bug report, and more of the same kind, through --set (exact messages)
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
    "model.seq_len=128": "model.seq_len=128 differs from train.seq_len=256",
    "model.vocab_size=100": "model.vocab_size must be >= 256",
}


@pytest.mark.parametrize("item", sorted(SET_ERRORS))
def test_bad_override(item, config, tmp_path, capsys, clean_env):
    rc, cap = dry_run(capsys, config, out=tmp_path / "out", sets=[item])
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


def test_setup_cfg_matches_the_tomllib_fallback():
    """python_requires allows 3.10, so tomli is a dependency there (and only there)."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    assert cfg["options"]["python_requires"].strip() == ">=3.10"
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    assert any(r.replace(" ", "") == 'tomli>=1.1;python_version<"3.11"' for r in reqs), reqs


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
    "optimizer_section": ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
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


def test_only_rank_0_reports(config, tmp_path, capsys, clean_env):
    """Inside a launched job (RANK set) only rank 0 prints the error; every rank exits 2."""
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    rc = train.main(["--config", str(config), "--set", "model.n_layer=0", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.err == "" and cap.out == "", (rc, cap)
    clean_env.setenv("RANK", "0")
    rc = train.main(["--config", str(config), "--set", "model.n_layer=0", "--device", "cpu"])
    assert_one_line_error(rc, capsys.readouterr(), "model.n_layer")

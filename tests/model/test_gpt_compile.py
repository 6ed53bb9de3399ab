"""``GPTConfig.compile="blocks"`` (torch.compile of each block's work around the
attention call), on CPU with the real inductor backend (needs a C++ compiler):

* forward and backward of a tiny GPT (3 layers, d=64, 4 heads, 128 tokens) with
  compile on equal compile off -- loss, logits and every parameter gradient -- over
  two AdamW steps, for dense, hash and qk attention and with activation
  checkpointing; dynamo made exactly 2 graphs (pre- and post-attention) shared by
  the 3 blocks, with no graph break, and eval mode / a new length add 2 each
  (that one under backend "aot_eager", ``GPTConfig.compile_backend``);
* the training entry point accepts ``--set model.compile=blocks``: 3 steps of a
  real job log the same losses as compile off (rel 1e-4) and the startup line
  saying what is compiled; a bad value, or compile with ZeRO-3, exits with code 2.

The first inductor compile of a process takes ~10 s on 2 CPU cores (less when the
on-disk inductor cache has the graphs); the file took ~50 s on a 2-core machine.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from dist_sparse_attn.model import GPT, GPTConfig
from helpers import REPO, clear_launch_vars, job_env

RTOL, ATOL = 1e-4, 1e-6         # fp32; measured differences ~1e-7


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _tiny(**kw) -> GPTConfig:
    return GPTConfig(n_layer=3, n_head=4, n_embd=64, seq_len=128, n_buckets=4, **kw)


def _steps(model, idx, tgt, n=2):
    """n AdamW steps: the losses, and the first step's logits and gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for i in range(n):
        logits, loss = model(idx, tgt)
        loss.backward()
        if i == 0:
            first = (logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first


def _assert_same(got, got_logits, got_grads, want, want_logits, want_grads):
    """Losses, first-step logits and every parameter gradient equal (fp32 tolerances)."""
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=0)
    torch.testing.assert_close(got_logits, want_logits, rtol=RTOL, atol=ATOL)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attention,ckpt", [("dense", False), ("hash", False), ("hash", True),
                                            ("qk", False)])
def test_compiled_blocks_match_eager(attention, ckpt):
    cfg = _tiny(attention=attention, activation_checkpointing=ckpt)
    eager = GPT(cfg)
    compiled = GPT(_tiny(attention=attention, activation_checkpointing=ckpt, compile="blocks"))
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    idx = torch.randint(0, cfg.vocab_size, (2, 128))
    tgt = torch.randint(0, cfg.vocab_size, (2, 128))

    want, (want_logits, want_grads) = _steps(eager, idx, tgt)
    assert counters["stats"]["unique_graphs"] == 0, "compile='off' must not compile"
    got, (got_logits, got_grads) = _steps(compiled, idx, tgt)

    _assert_same(got, got_logits, got_grads, want, want_logits, want_grads)
    # really compiled: one graph before and one after attention, shared by the 3 blocks
    # (a per-layer recompile would make 6), and nothing broken out of them
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.timeout(300)
def test_eval_and_new_length_recompile_once_each():
    """Eval (no_grad) and another sequence length: 2 more graphs each, not per block.
    Dynamo's guards and recompiles do not depend on the backend: "aot_eager" here
    (``compile_backend``) saves inductor's compile time of 4 more graphs."""
    model = GPT(_tiny(attention="hash", compile="blocks", compile_backend="aot_eager"))
    idx = torch.randint(0, 256, (2, 128))
    model(idx, idx)[1].backward()
    assert counters["stats"]["unique_graphs"] == 2
    model.eval()
    with torch.no_grad():
        want = GPT(_tiny(attention="hash"))
        want.load_state_dict(model.state_dict())
        want.eval()
        torch.testing.assert_close(model(idx)[0], want(idx)[0], rtol=RTOL, atol=ATOL)
        assert counters["stats"]["unique_graphs"] == 4
        model(idx[:, :64])
    assert counters["stats"]["unique_graphs"] == 6, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("attention,local", [("dense", 0), ("hash", 0), ("hash", 2), ("qk", 0)])
def test_compiled_model_matches_eager(attention, local, device):
    """compile="model": the whole forward is ONE graph (attention inside as the library's
    custom ops, no graph break); losses, logits and gradients equal eager. On CUDA
    inductor writes Triton kernels, whose integer arithmetic on positions (stream keys,
    the keep rule) must stay int64."""
    kw = dict(attention=attention, local_heads=local, local_window=32)
    eager = GPT(_tiny(**kw)).to(device)
    compiled = GPT(_tiny(compile="model", **kw)).to(device)
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    idx = torch.randint(0, 256, (2, 128), device=device)
    tgt = torch.randint(0, 256, (2, 128), device=device)
    want, (want_logits, want_grads) = _steps(eager, idx, tgt)
    got, (got_logits, got_grads) = _steps(compiled, idx, tgt)
    _assert_same(got, got_logits, got_grads, want, want_logits, want_grads)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_config_rejects_bad_mode():
    with pytest.raises(ValueError, match="compile must be one of"):
        GPTConfig(compile="full")
    assert GPTConfig().compile == "off"
    with pytest.raises(ValueError, match="compile_backend must be one of"):
        GPTConfig(compile="blocks", compile_backend="inductr")
    assert GPTConfig().compile_backend == "inductor"


# ---------------------------------------------------------------------------------------------
# the training entry point
# ---------------------------------------------------------------------------------------------

SMALL_TOML = """\
[model]
n_layer = 2
n_head = 4
n_embd = 64
attention = "hash"
n_buckets = 4

[train]
seq_len = 128
micro_batch = 2
max_bytes = 100000
steps = 3
warmup = 1
eval_interval = 0
eval_iters = 1
retrieval_samples = 0
log_interval = 1
save_checkpoint = false
deepspeed_config = "configs/ds/zero1.json"
"""



@pytest.fixture
def config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_TOML)
    return path


def _losses(out):
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.timeout(300)
def test_train_compile_matches_off(config, tmp_path):
    """Two real 3-step jobs (one process each, run at once): the same losses."""
    env = job_env()
    procs = {}
    for mode in ("off", "blocks"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "dist_sparse_attn.train", "--config", str(config),
               "--out", str(out), "--device", "cpu", "--set", f"model.compile={mode}"]
        procs[mode] = (out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True,
                                             start_new_session=True))
    logs = {}
    try:
        for mode, (out, p) in procs.items():
            logs[mode] = p.communicate(timeout=240)[0]
            assert p.returncode == 0, f"compile={mode} exited {p.returncode}:\n{logs[mode][-3000:]}"
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "torch.compile (backend 'inductor'" in logs["blocks"], logs["blocks"][-3000:]
    assert "torch.compile" not in logs["off"], logs["off"][-3000:]
    want, got = _losses(tmp_path / "off"), _losses(tmp_path / "blocks")
    assert sorted(want) == [1, 2, 3] and sorted(got) == [1, 2, 3], (want, got)
    for s in want:
        assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (s, got, want)


def _dry_run(config, tmp_path, capsys, monkeypatch, *overrides):
    from dist_sparse_attn import train
    clear_launch_vars(monkeypatch)
    argv = ["--config", str(config), "--out", str(tmp_path / "out"), "--dry-run",
            "--device", "cpu"]
    for o in overrides:
        argv += ["--set", o]
    return train.main(argv), capsys.readouterr()


def test_train_dry_run_accepts_compile(config, tmp_path, capsys, monkeypatch):
    rc, cap = _dry_run(config, tmp_path, capsys, monkeypatch, "model.compile=blocks")
    assert rc == 0, cap.err
    assert "torch.compile (backend" in cap.out and "2 graphs shared by the 2 blocks" in cap.out, \
        cap.out


@pytest.mark.parametrize("overrides,text", [
    (["model.compile=full"], "compile must be one of ('off', 'blocks', 'model'), got 'full'"),
    (["model.compile=true"], "compile must be one of"),
    (["model.compile=blocks", "train.deepspeed_config=configs/ds/zero3.json"],
     "does not work with ZeRO-3"),
])
def test_train_rejects_bad_compile(config, tmp_path, capsys, monkeypatch, overrides, text):
    rc, cap = _dry_run(config, tmp_path, capsys, monkeypatch, *overrides)
    assert rc == 2, f"exit {rc}; stdout:\n{cap.out}\nstderr:\n{cap.err}"
    assert "[train] configuration error:" in cap.err and text in cap.err, cap.err
    assert not (tmp_path / "out").exists()


def test_compile_model_needs_one_device():
    from dist_sparse_attn import train
    train.check_compile(GPTConfig(compile="model"), {}, 1)
    with pytest.raises(train.ConfigError, match="use model.compile='blocks'"):
        train.check_compile(GPTConfig(compile="model"), {}, 2)

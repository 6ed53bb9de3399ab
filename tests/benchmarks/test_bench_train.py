"""benchmarks/bench_train.py: config names -> training overrides, and one real CPU run of
the speed1 suite (two tiny configs, 3 steps each, ~40 s) whose JSON, table and the
entry point's own config.json must agree with the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_train as BT  # noqa: E402


def test_parse_and_format_lengths():
    assert BT.parse_n("16k") == 16384 and BT.parse_n("2M") == 2 ** 21 and BT.parse_n("300") == 300
    assert BT.fmt_n(16384) == "16k" and BT.fmt_n(2 ** 22) == "4M" and BT.fmt_n(1000) == "1000"


@pytest.mark.parametrize("name,world,want,info", [
    ("dense-cudnn", 1, ["model.attention=dense", "model.sdpa_backend=cudnn"],
     dict(kind="dense", baseline=True)),
    ("dsu-flash", 4, ["model.attention=dense", "model.sdpa_backend=flash",
                      "train.sp_strategy=ds-ulysses"], dict(sp_strategy="ds-ulysses")),
    ("hash16", 1, ["model.attention=hash", "model.n_buckets=16"], dict(n_buckets=16)),
    ("hash16-loc4", 1, ["model.attention=hash", "model.n_buckets=16", "model.local_heads=4"],
     dict(local_heads=4)),
    ("ulysses-hash64", 4, ["model.n_buckets=64", "train.sp_strategy=ulysses"],
     dict(sp_strategy="ulysses")),
    ("qk-drop30", 1, ["model.attention=qk", "model.qk_keep_rate=0.7000"],
     dict(qk_keep_rate=0.7)),
    ("floor", 1, ["model.attention=none"], dict(kind="floor")),
    ("floor-off", 1, ["model.attention=none", "model.offload_checkpoints=true"],
     dict(kind="floor", offload=True)),
    ("hash-b512-cap4-off", 1, ["model.n_buckets=256", "model.bucket_cap=4.0",
                               "model.offload_checkpoints=true"],
     dict(kind="hash", bucket_cap=4.0, offload=True)),
    ("hash16-loc4-graph", 1, ["model.n_buckets=16", "model.local_heads=4",
                              "model.cuda_graph=true"], dict(kind="hash", cuda_graph=True)),
    ("dense-cudnn-graph", 1, ["model.sdpa_backend=cudnn", "model.cuda_graph=true"],
     dict(kind="dense", baseline=True, cuda_graph=True)),
])
def test_config_sets(name, world, want, info):
    sets, got = BT.config_sets(name, 131072, world, cpu=False)
    for s in want:
        assert s in sets, (s, sets)
    for k, v in info.items():
        assert got[k] == v, (k, got)
    assert "model.local_heads=4" not in sets or "-loc4" in name
    assert ("model.cuda_graph=true" in sets) == name.endswith("-graph")


def test_config_sets_fixed_bucket_size_and_errors():
    sets, info = BT.config_sets("hash-b512", 2 ** 21, 4, cpu=False)
    assert info["n_buckets"] == 4096 and "model.n_buckets=4096" in sets
    _, capped = BT.config_sets("hash-b512", 2 ** 21, 4, cpu=False, max_buckets=1000)
    assert capped["n_buckets"] == 1000
    for bad in ("sparse16", "dense-fast", "qk-drop100", "hash16-local4", "floor-cap", "off"):
        with pytest.raises(ValueError):
            BT.config_sets(bad, 4096, 1, cpu=False)


def test_floor_ratio_pairs_offload_settings():
    runs = [dict(kind="floor", seq_len=8, status="ok", median_step_ms=10.0),
            dict(kind="floor", offload=True, seq_len=8, status="ok", median_step_ms=20.0),
            dict(kind="hash", seq_len=8, status="ok", median_step_ms=15.0),
            dict(kind="hash", offload=True, seq_len=8, status="ok", median_step_ms=30.0),
            dict(kind="hash", seq_len=16, status="ok", median_step_ms=30.0)]
    assert BT.floor_ratio(runs[2], runs) == 1.5 and BT.floor_ratio(runs[3], runs) == 1.5
    assert BT.floor_ratio(runs[4], runs) is None


@pytest.mark.timeout(400)
def test_speed1_cpu_smoke(tmp_path):
    out = tmp_path / "bt"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_train.py"), "--suite", "speed1",
           "--device", "cpu", "--seqlens", "256", "--steps", "3",
           "--configs", "dense-auto,hash8-loc2", "--extra-set", "model.n_layer=2",
           "--extra-set", "model.n_embd=64", "--extra-set", "model.n_head=4", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=380)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "train_speed1.json").read_text())
    runs = {x["config"]: x for x in doc["runs"]}
    assert set(runs) == {"dense-auto", "hash8-loc2"}
    for x in runs.values():
        assert x["status"] == "ok" and x["median_step_ms"] > 0 and x["tokens_per_step"] == 256
    cfg = json.loads((out / "speed1" / "hash8-loc2_N256" / "config.json").read_text())["model"]
    assert (cfg["attention"], cfg["n_buckets"], cfg["local_heads"], cfg["n_layer"]) == \
        ("hash", 8, 2, 2)
    table = (out / "train_speed1.md").read_text()
    assert "| 256 | hash8-loc2 | ok |" in table and "| 256 | dense-auto | ok |" in table


def test_longest4_uses_expandable_segments_unless_set(monkeypatch):
    """longest4's runs get the allocator's expandable segments (measured: 4M tokens went
    from an OOM in step 1 to a trained step 1); an explicit setting is kept; other
    suites are left alone."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    args = BT.parse_args(["--suite", "longest4,speed1", "--seqlens", "longest4=256k",
                          "--seqlens", "speed1=8k", "--configs", "speed1=hash16"])
    jobs = BT.plan("longest4", args, cpu=False)
    assert jobs and all(j["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
                        for j in jobs)
    assert all("PYTORCH_CUDA_ALLOC_CONF" not in j["env"] for j in BT.plan("speed1", args, cpu=False))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert all(j["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
               for j in BT.plan("longest4", args, cpu=False))


def _quality_runs():
    def run(config, n, loss, baseline=False, steps=200):
        return dict(suite="quality1", config=config, seq_len=n, steps=steps, status="ok",
                    baseline=baseline, kind="dense" if baseline else "hash",
                    final_eval_loss=loss, final_train_loss=loss, tokens_per_s=1.0,
                    median_step_ms=1.0, world=1, wall_s=1.0, id=f"{config}_N{n}")
    return [run("dense-cudnn", 16384, 1.5, True), run("hash16-loc4", 16384, 1.5),
            run("dense-cudnn", 32768, 2.0, True), run("hash16-loc4", 32768, 2.2),
            run("dense-cudnn", 32768, 1.0, True, steps=600),
            run("hash16-loc4", 32768, 1.1, steps=600)]


def test_quality_reference_is_the_dense_run_of_the_same_length_and_steps():
    """quality1 at several lengths (or with earlier runs kept): each run's eval loss is
    compared with the dense run of its own N and step count, never with another N's."""
    runs = _quality_runs()
    res = {"suite": "quality1", "runs": runs,
           "settings": {"configs": ["dense-cudnn", "hash16-loc4"], "world": 1, "steps": 200}}
    got = {t["target"]: t["value"] for t in BT.targets(res)}
    want = {(16384, 200): 0.0, (32768, 200): 0.1, (32768, 600): 0.1}
    assert len(got) == 3
    for (n, steps), rel in want.items():
        key = [k for k in got if k.startswith("hash16-loc4 eval loss vs dense-cudnn")
               and f"at {steps} steps, N={BT.fmt_n(n)}" in k]
        assert len(key) == 1 and abs(got[key[0]] - rel) < 1e-9, (n, steps, got)
    table = BT.table(res)
    assert "| 32k | hash16-loc4 | ok | 200 |" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| 32k | hash16-loc4 | ok | 200 |"))
    assert "+10.00%" in row, row
    line = BT.progress_line(runs[3], runs)
    assert "+10.00% vs dense-cudnn" in line, line


def _ok_run(config, n, ms, **extra):
    return dict(suite="speed1", config=config, seq_len=n, world=1, steps=5, id=f"{config}_N{n}",
                status="ok", median_step_ms=ms, tokens_per_s=n / (ms * 1e-3), wall_s=1.0,
                **BT.config_sets(config, n, 1, cpu=True)[1], **extra)


def test_resume_does_not_reuse_a_run_measured_with_other_overrides(tmp_path, monkeypatch):
    """--resume skips a planned run only when the earlier one ran with the same --extra-set
    overrides and preset: a run without model.compile=model is not reported as the
    compiled one (it is run again)."""
    out = tmp_path / "bt"
    out.mkdir()
    args = ["--suite", "speed1", "--device", "cpu", "--seqlens", "512", "--steps", "5",
            "--configs", "dense-cudnn", "--out", str(out), "--resume"]
    old = _ok_run("dense-cudnn", 512, 10.0)
    old.update(extra_sets=[], preset=BT.SUITES["speed1"]["preset"])
    (out / "train_speed1.json").write_text(json.dumps({"suite": "speed1", "runs": [old]}))
    ran = []

    def fake_run_one(job, a, deadline):
        ran.append(job["id"])
        return dict(_ok_run(job["config"], job["seq_len"], 20.0), extra_sets=job["extra_sets"],
                    preset=job["preset"])
    monkeypatch.setattr(BT, "run_one", fake_run_one)
    monkeypatch.setattr(BT, "plot", lambda res, png: False)
    assert BT.main(args) == 0 and ran == []              # same overrides: reused
    assert BT.main(args + ["--extra-set", "model.compile=model"]) == 0
    assert ran == ["dense-cudnn_N512"]                   # other overrides: measured again
    runs = json.loads((out / "train_speed1.json").read_text())["runs"]
    assert [(r["median_step_ms"], r["extra_sets"]) for r in runs] == [(20.0, ["model.compile=model"])]


def test_speedups_compare_runs_of_the_same_overrides():
    """A run kept from an invocation with other --extra-set overrides is not the baseline
    of this one's runs, and its table row says which overrides it ran with."""
    base_eager = _ok_run("dense-cudnn", 512, 10.0, extra_sets=[], preset="p")
    hash_compiled = _ok_run("hash16", 512, 5.0, extra_sets=["model.compile=model"], preset="p")
    base_compiled = _ok_run("dense-cudnn", 512, 8.0, extra_sets=["model.compile=model"],
                            preset="p")
    assert BT.speedups(hash_compiled, [base_eager, hash_compiled]) == {}
    assert BT.speedups(hash_compiled, [base_eager, hash_compiled, base_compiled]) == \
        {"dense-cudnn": 8.0 / 5.0}
    res = {"suite": "speed1", "runs": [base_eager, hash_compiled],
           "settings": {"configs": ["dense-cudnn", "hash16"], "world": 1, "steps": 5,
                        "extra_sets": ["model.compile=model"], "preset": "p"}}
    row = next(ln for ln in BT.table(res).splitlines() if ln.startswith("| 512 | dense-cudnn |"))
    assert "extra --set: none" in row, row


def test_sparse_targets_never_credit_the_attention_free_floor():
    """The '64k best sparse / dense-cudnn' target (speed1) and the '128k best sparse SP'
    target (speed4) are about sparse attention: a floor run (no attention at all) in the
    same suite is not the 'best sparse' config."""
    runs = [_ok_run("dense-cudnn", 65536, 751.1), _ok_run("hash64", 65536, 168.9),
            _ok_run("floor-graph", 65536, 100.0)]
    res = {"suite": "speed1", "runs": runs, "settings": {"world": 1}}
    (t,) = [t for t in BT.targets(res) if "64k best sparse" in t["target"]]
    assert "(hash64)" in t["target"] and t["value"] == round(751.1 / 168.9, 3) and not t["met"]
    runs4 = [dict(r, world=4, suite="speed4", **BT.config_sets(r["config"], 131072, 4, False)[1])
             for r in (_ok_run("dsu-cudnn", 131072, 737.6), _ok_run("hash64", 131072, 220.5),
                       _ok_run("floor", 131072, 50.0))]
    (t,) = BT.targets({"suite": "speed4", "runs": runs4, "settings": {"world": 4}})
    assert "(hash64)" in t["target"] and t["value"] == round(737.6 / 220.5, 3)

"""The launch scripts (``launch/*.sh``) and the installer (``launch/setup.sh``).

* every launcher script checks the configuration in one process before it starts any
  (a bad ``--set`` gives exit code 2 and ONE line on stderr, not one per rank inside the
  launcher's output), and a good configuration still trains through it;
* inside a job started by a launcher directly, only rank 0 reports a configuration error;
* ``setup.sh`` installs torch from PyTorch's CPU wheel index on a machine without a GPU,
  falls back to pip's configured index with a one-line note when that index cannot be
  reached, and knows no project-private wheel folder. It runs here with a stand-in
  interpreter that records the pip calls instead of installing anything.
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import REPO, free_port, job_env

pytest.importorskip("deepspeed")

BIN = os.path.dirname(sys.executable)
TIMEOUT_S = 240

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
steps = 2
warmup = 1
eval_interval = 0
eval_iters = 1
retrieval_samples = 2
log_interval = 1
timeout_min = 2.0
deepspeed_config = "configs/ds/zero1.json"
"""

def _env(**extra) -> dict:
    return job_env(**{"PY": sys.executable, "NPROC": "2", "MASTER_PORT": str(free_port()),
                      **extra})


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def _run(cmd, env, timeout=TIMEOUT_S, cwd=REPO):
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        pytest.fail(f"{cmd} still running after {timeout} s (killed):\n{out[-2000:]}\n{err[-2000:]}")
    return p.returncode, out, err


def _has_mpirun() -> bool:
    return os.access(os.path.join(BIN, "mpirun"), os.X_OK) or shutil.which("mpirun") is not None


SCRIPTS = ["train", "deepspeed", "torchrun",
           pytest.param("mpirun", marks=pytest.mark.skipif(not _has_mpirun(), reason="no mpirun"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_bad_config_one_line(script, config, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["bash", f"launch/{script}.sh", str(config), "--set",
                               "model.n_layer=0", "--out", str(out)], _env())
    assert rc == 2, f"exit {rc}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert stderr.splitlines() == ["[train] configuration error: model.n_layer must be an int "
                                   ">= 1, got 0 (--set model.n_layer=0)"], stderr
    assert not out.exists()


@pytest.mark.timeout(300)
def test_launch_script_checks_the_world_size(config, tmp_path):
    """The pre-flight knows the process count it will launch (NPROC=2 here)."""
    rc, stdout, stderr = _run(["bash", "launch/torchrun.sh", str(config), "--set",
                               "train.sequence_parallel=3", "--out", str(tmp_path / "o")], _env())
    assert rc == 2 and len(stderr.splitlines()) == 1, (rc, stderr)
    assert "train.sequence_parallel=3 must divide the world size 2" in stderr, stderr
    rc, stdout, stderr = _run(["bash", "launch/train.sh", str(config), "--dry-run",
                               "--out", str(tmp_path / "o")], _env())
    assert rc == 0, stderr
    assert "world 2 = dp 1 x sp 2" in stdout and "NOT checked" not in stdout, stdout
    assert stdout.count("dry run: configuration is valid") == 1, stdout


@pytest.mark.timeout(300)
def test_launch_script_trains(config, tmp_path):
    """A good configuration passes the pre-flight and trains (2 ranks, torchrun)."""
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["bash", "launch/torchrun.sh", str(config), "--out", str(out)],
                              _env())
    assert rc == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert "[train] done: 2 steps" in stdout, stdout[-3000:]
    assert (out / "summary.json").exists()


@pytest.mark.timeout(200)
def test_launched_job_reports_once(config, tmp_path):
    """Started by a launcher directly (no pre-flight), each rank finds the error before any
    process group exists: only rank 0 prints it, and the launcher, which stops the job at
    the first exit, never stops rank 0 before it has (the other ranks wait)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "launch/train.py", "--config", str(config), "--set", "model.n_layer=0",
           "--out", str(tmp_path / "o")]
    env = _env()
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rc, stdout, stderr = _run(cmd, env)
    assert rc != 0
    both = stdout + stderr
    assert both.count("configuration error") == 1, both[-3000:]
    assert "exitcode  : 2" in both, both[-3000:]


# ---------------------------------------------------------------------------------------------
# setup.sh
# ---------------------------------------------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python in setup.sh: records every call, imports nothing, installs nothing.
printf '%s\n' "$*" >> "$FAKE_LOG"
case "$1" in
  -m)
    if [ "$2" = venv ]; then
        dir="${@: -1}"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; exit 0
    fi
    if [ "$2" = pip ]; then
        case " $* " in *" --index-url "*) exit "${FAKE_INDEX_PIP_RC:-0}" ;; esac
        exit 0
    fi ;;
  -c)
    case "$2" in *urlopen*) exit "${FAKE_INDEX_RC:-1}" ;; *build_shm_op*) exit 0 ;; esac
    exit 1 ;;
  -) cat >/dev/null; exit 0 ;;
esac
exit 0
"""

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or bool(glob.glob("/dev/nvidia[0-9]*"))


def _setup(tmp_path, **env_extra):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PYTHON=str(fake), VENV=str(tmp_path / "venv"), FAKE_LOG=str(log), **env_extra)
    p = subprocess.run(["bash", "launch/setup.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    calls = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    torch_calls = [c for c in calls if "torch==" in c]
    return p.stdout, torch_calls


needs_no_gpu = pytest.mark.skipif(_has_gpu(), reason="this machine has an NVIDIA GPU")


@needs_no_gpu
def test_setup_installs_the_cpu_wheel(tmp_path):
    out, calls = _setup(tmp_path, FAKE_INDEX_RC="0")
    assert calls == [f"-m pip install -q --index-url {CPU_INDEX} --timeout 60 torch==2.13.0"], calls
    assert "note:" not in out, out
    # without a GPU, DeepSpeed's CPU op is built during setup, not inside the first run
    log = (tmp_path / "calls.log").read_text()
    assert "building DeepSpeed's CPU communication op" in out and "build_shm_op()" in log, out


@needs_no_gpu
def test_setup_falls_back_when_the_cpu_index_is_unreachable(tmp_path):
    out, calls = _setup(tmp_path, FAKE_INDEX_RC="1")
    assert calls == ["-m pip install -q torch==2.13.0"], calls
    notes = [l for l in out.splitlines() if "note:" in l]
    assert len(notes) == 1 and "cannot be reached" in notes[0], out


@needs_no_gpu
def test_setup_falls_back_when_the_cpu_index_lacks_the_version(tmp_path):
    out, calls = _setup(tmp_path, FAKE_INDEX_RC="0", FAKE_INDEX_PIP_RC="1")
    assert calls == [f"-m pip install -q --index-url {CPU_INDEX} --timeout 60 torch==2.13.0",
                     "-m pip install -q torch==2.13.0"], calls
    assert len([l for l in out.splitlines() if "note:" in l]) == 1, out


def test_setup_offline_uses_only_the_given_wheels(tmp_path):
    """PIP_NO_INDEX=1 (offline): no index is tried, pip's own settings (PIP_FIND_LINKS)
    decide; setup.sh itself points at no folder of wheels."""
    out, calls = _setup(tmp_path, FAKE_INDEX_RC="0", PIP_NO_INDEX="1")
    assert calls == ["-m pip install -q torch==2.13.0"], calls
    text = open(os.path.join(REPO, "launch", "setup.sh")).read()
    assert "shared" not in text and "--find-links" not in text


# ---------------------------------------------------------------------------------------------
# packaging: a wheel carries the presets and the dsa-train command
# ---------------------------------------------------------------------------------------------

def _setuptools_version() -> tuple:
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())


@pytest.mark.timeout(300)
@pytest.mark.skipif(_setuptools_version() < (77,), reason="pyproject.toml needs setuptools >= 77")
def test_wheel_runs_presets_from_another_directory(tmp_path):
    """Build a wheel of a copy of the repository (offline, no build isolation), install it
    into a folder of its own, and run its dsa-train command from a directory that is not
    the repository: ``--config configs/tiny.toml`` resolves to the preset inside the
    installed package, which names its DeepSpeed config the same way."""
    import zipfile
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = wheels.glob("dist_sparse_attn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("dist_sparse_attn/py.typed", "dist_sparse_attn/configs/tiny.toml",
                 "dist_sparse_attn/configs/gpt2_small_128k_sp4.toml",
                 "dist_sparse_attn/configs/ds/zero3.json", "dist_sparse_attn/trainer.py"):
        assert name in names, sorted(names)
    info = {n.split("/", 1)[1]: n for n in names if ".dist-info/" in n}
    assert "licenses/LICENSE" in info, sorted(info)
    meta = zipfile.ZipFile(wheel).read(info["METADATA"]).decode()
    assert "License-Expression: Apache-2.0" in meta, meta[:2000]
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"train", "hf", "mpi", "bench", "test", "all"} <= extras, extras
    assert "dsa-train = dist_sparse_attn.train:main" in \
        zipfile.ZipFile(wheel).read(info["entry_points.txt"]).decode()

    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--target", str(site), str(wheel)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env()
    env["PYTHONPATH"] = str(site)       # the wheel's package before the editable checkout
    p = subprocess.run([sys.executable, "-c",
                        "import dist_sparse_attn; print(dist_sparse_attn.__file__)"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=100)
    assert p.stdout.strip().startswith(str(site)), (p.stdout, p.stderr)
    rc, out, err = _run([str(site / "bin" / "dsa-train"), "--config", "configs/tiny.toml",
                         "--dry-run", "--device", "cpu"], env, cwd=elsewhere)
    assert rc == 0, err
    assert "4 layers, 4 heads" in out and "DeepSpeed: ZeRO 1," in out, out
    assert "dry run: configuration is valid" in out, out


def test_pyproject_matches_the_tomllib_fallback():
    """requires-python allows 3.10, so tomli is a dependency there (and only there); the
    metadata lives in pyproject.toml alone."""
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["requires-python"].strip() == ">=3.10"
    reqs = project["dependencies"]
    assert any(r.replace(" ", "") == 'tomli>=1.1;python_version<"3.11"' for r in reqs), reqs
    assert not os.path.exists(os.path.join(REPO, "setup.cfg"))
    assert project["scripts"]["dsa-train"] == "dist_sparse_attn.train:main"


# ---------------------------------------------------------------------------------------------
# mpirun.sh with several hosts
# ---------------------------------------------------------------------------------------------

FAKE_MPIRUN = """#!/usr/bin/env bash
printf '%s\\n' "$*" > "$FAKE_LOG"
"""


def _fake_mpirun_bin(tmp_path, launcher="mpirun"):
    """A folder with ``python`` (this interpreter) and a ``launcher`` (mpirun, deepspeed)
    that records its arguments: the scripts take the launcher beside $PY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "python"
    py.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    mpirun = bin_dir / launcher
    mpirun.write_text(FAKE_MPIRUN)
    for f in (py, mpirun):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return py


@pytest.mark.timeout(200)
@pytest.mark.parametrize("hosts, nproc, expect", [
    ("node-a:2,node-b:2", None, 4),        # every slot of every host, not this node's count
    ("node-a:3,node-b", None, 4),          # a host without a count is one process
    ("node-a:2,node-b:2", "2", 2),         # NPROC given: the total the user chose
])
def test_mpirun_script_counts_the_processes_of_every_host(config, tmp_path, hosts, nproc,
                                                          expect):
    """MPICH's ``-n`` is the total over ``-hosts``, which it fills in order: with this
    node's process count alone the later hosts would get nothing."""
    py = _fake_mpirun_bin(tmp_path)
    log = tmp_path / "mpirun.log"
    env = _env(PY=str(py), MPI_HOSTS=hosts, FAKE_LOG=str(log))
    if nproc is None:
        env.pop("NPROC")
    else:
        env["NPROC"] = nproc
    rc, stdout, stderr = _run(["bash", "launch/mpirun.sh", str(config), "--out",
                               str(tmp_path / "o")], env)
    assert rc == 0, (stdout, stderr)
    args = log.read_text().split()
    assert args[:4] == ["-n", str(expect), "-hosts", hosts], args


def test_mpirun_script_refuses_a_bad_host_list(config, tmp_path):
    py = _fake_mpirun_bin(tmp_path)
    log = tmp_path / "mpirun.log"
    env = _env(PY=str(py), MPI_HOSTS="node-a:two", FAKE_LOG=str(log))
    env.pop("NPROC")
    rc, stdout, stderr = _run(["bash", "launch/mpirun.sh", str(config)], env)
    assert rc == 2 and "MPI_HOSTS" in stderr, (rc, stderr)
    assert not log.exists()


# ---------------------------------------------------------------------------------------------
# the interpreter of the launch scripts
# ---------------------------------------------------------------------------------------------

def test_launch_script_refuses_an_interpreter_it_cannot_run(tmp_path):
    """An explicit PY (or VENV) that does not exist is an error, not a silent switch to
    whatever python3 PATH has."""
    env = _env(PY=str(tmp_path / "no" / "python"))
    rc, stdout, stderr = _run(["bash", "launch/torchrun.sh", "--dry-run"], env, timeout=60)
    assert rc == 2 and stderr.splitlines() == [
        f"[launch] PY={tmp_path / 'no' / 'python'} is not an executable interpreter"], stderr
    env = _env(VENV=str(tmp_path / "novenv"))
    env.pop("PY")
    rc, stdout, stderr = _run(["bash", "launch/torchrun.sh", "--dry-run"], env, timeout=60)
    assert rc == 2 and "VENV=" in stderr and len(stderr.splitlines()) == 1, stderr


@pytest.mark.timeout(200)
def test_launch_script_uses_the_venv_setup_made(config, tmp_path):
    """VENV (launch/setup.sh's folder of the venv) chooses the launchers' interpreter too."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "python.log"
    py = venv / "bin" / "python"
    py.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    env = _env(VENV=str(venv))
    env.pop("PY")
    rc, stdout, stderr = _run(["bash", "launch/torchrun.sh", str(config), "--dry-run",
                               "--out", str(tmp_path / "o")], env)
    assert rc == 0, stderr
    assert "dry run: configuration is valid" in stdout, stdout
    assert "launch/train.py --config" in log.read_text(), log.read_text()


# ---------------------------------------------------------------------------------------------
# deepspeed.sh with a hostfile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [None, "# only a comment\nnode-a\n"])
def test_deepspeed_script_refuses_a_hostfile_it_cannot_use(config, tmp_path, content):
    """A missing hostfile (or one without slots) is an error: the deepspeed launcher
    would only warn and train on this node alone."""
    py = _fake_mpirun_bin(tmp_path, "deepspeed")
    log = tmp_path / "deepspeed.log"
    hostfile = tmp_path / "hosts"
    if content is not None:
        hostfile.write_text(content)
    env = _env(PY=str(py), HOSTFILE=str(hostfile), FAKE_LOG=str(log))
    rc, stdout, stderr = _run(["bash", "launch/deepspeed.sh", str(config)], env, timeout=60)
    assert rc == 2 and "HOSTFILE" in stderr and len(stderr.splitlines()) == 1, (rc, stderr)
    assert not log.exists()


@pytest.mark.timeout(200)
def test_deepspeed_script_reads_a_relative_hostfile_from_the_callers_directory(config,
                                                                              tmp_path):
    py = _fake_mpirun_bin(tmp_path, "deepspeed")
    log = tmp_path / "deepspeed.log"
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    env = _env(PY=str(py), HOSTFILE="hosts", FAKE_LOG=str(log))
    script = os.path.join(REPO, "launch", "deepspeed.sh")
    rc, stdout, stderr = _run(["bash", script, str(config), "--out", str(tmp_path / "o")],
                              env, cwd=tmp_path)
    assert rc == 0, (stdout, stderr)
    args = log.read_text().split()
    assert args[:2] == ["--hostfile", str(tmp_path / "hosts")], args
    # the pre-flight checked the layout for the hostfile's 4 slots
    rc, stdout, stderr = _run(["bash", script, str(config), "--out", str(tmp_path / "o"),
                               "--set", "train.sequence_parallel=3"], env, cwd=tmp_path)
    assert rc == 2 and "world size 4" in stderr, (rc, stderr)

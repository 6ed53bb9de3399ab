"""The package's layers: every module imports in a fresh interpreter, and its imports
of ``dist_sparse_attn.*`` (module level and inside functions alike) point only to lower
layers, so data flows one way and there is no import cycle.

Layers, bottom up (a unit is a top-level module or subpackage of ``dist_sparse_attn``):

    0  _index, _collective   int64 positions that stay int64 under torch.compile; the
                     agreement of ranks (small all_gathers of one row per rank)
    1  _validation, schema, reference, layout, balance, graphs
    2  plan             the attention plan over sorted streams
    3  kernels          the backend registry and every device step (attention, sort, LSH)
    4  hashing          LSH schemes and rotations; the hashing itself is the backend's
    5  compile_ops      the custom ops for torch.compile
    6  ops              the functional API: validation -> keys -> plan -> autograd -> backend
    7  parallel         sequence parallelism (routing, exchanges, collectives)
    8  modules          nn.Modules over ops and parallel
    9  <root>           the package facade (dist_sparse_attn/__init__.py)
    10 model            the GPT model
    11 integrations     DeepSpeed and Hugging Face integrations
    12 config           training configuration
    13 data, distributed, metrics   the training corpus and batches, process setup, metrics
    14 checkpoint       checkpoints with their layout metadata
    15 trainer          the training loop over a DeepSpeed engine
    16 train, demo, testing, and any unit not listed here: applications

A unit may import units of lower layers only; applications may also import each
other, but no unit graph may have a cycle. A new unit lands in the top layer until it
is placed here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAYERS = [
    {"_index", "_collective"},
    {"_validation", "schema", "reference", "layout", "balance", "graphs"},
    {"plan"},
    {"kernels"},
    {"hashing"},
    {"compile_ops"},
    {"ops"},
    {"parallel"},
    {"modules"},
    {"<root>"},
    {"model"},
    {"integrations"},
    {"config"},
    {"data", "distributed", "metrics"},
    {"checkpoint"},
    {"trainer"},
    {"train", "demo", "testing"},
]
TOP = len(LAYERS) - 1

# runs in a fresh interpreter: import every module, then list each module's imports of
# the package (resolved to module names) from its source
_SCAN = r"""
import ast, importlib, json, os, pkgutil, sys
import dist_sparse_attn as pkg
root = os.path.dirname(pkg.__file__)
mods = {m.name: m.ispkg for m in pkgutil.walk_packages(pkg.__path__, "dist_sparse_attn.")}
mods["dist_sparse_attn"] = True
failed = {}
for name in sorted(mods):
    try:
        importlib.import_module(name)
    except Exception as e:          # noqa: BLE001 -- reported by the test
        failed[name] = f"{type(e).__name__}: {e}"
edges = []
for name, ispkg in mods.items():
    rel = name.split(".")[1:]
    path = os.path.join(root, *rel, "__init__.py") if ispkg else os.path.join(root, *rel) + ".py"
    base = name if ispkg else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[:len(base.split(".")) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            # "from pkg import submodule" depends on the submodule; other names on pkg
            targets = subs if len(subs) == len(node.names) else [mod] + subs
        else:
            continue
        for t in targets:
            if t == "dist_sparse_attn" or t.startswith("dist_sparse_attn."):
                edges.append([name, t, node.lineno])
print(json.dumps({"modules": sorted(mods), "failed": failed, "edges": edges}))
"""


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _rank(unit: str) -> int:
    return next((i for i, layer in enumerate(LAYERS) if unit in layer), TOP)


@pytest.fixture(scope="module")
def scan():
    r = subprocess.run([sys.executable, "-c", _SCAN], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _violations(edges):
    """(imports against the layer order, an import cycle between units or None) of
    edges [(importing module, imported module, line)]."""
    bad, graph = [], {}
    for src, dst, line in edges:
        u, t = _unit(src), _unit(dst)
        if u == t:
            continue
        graph.setdefault(u, set()).add(t)
        ru, rt = _rank(u), _rank(t)
        if rt > ru or (rt == ru and ru != TOP):
            bad.append(f"{src}:{line} imports {dst} ({u}, layer {ru} -> {t}, layer {rt})")
    state = {}

    def visit(u, path):
        state[u] = 1
        for t in sorted(graph.get(u, ())):
            if state.get(t) == 1:
                return path + [u, t]
            if t not in state:
                found = visit(t, path + [u])
                if found:
                    return found
        state[u] = 2
        return None
    for u in sorted(graph):
        if u not in state:
            cycle = visit(u, [])
            if cycle:
                return bad, cycle
    return bad, None


def test_layers_and_no_import_cycle(scan):
    assert not scan["failed"], f"modules that do not import: {scan['failed']}"
    assert len(scan["modules"]) > 20 and "dist_sparse_attn.kernels" in scan["modules"]
    # the scan sees the imports, module level and lazy: ops calls down into kernels
    assert any(_unit(s) == "ops" and _unit(d) == "kernels" for s, d, _ in scan["edges"])
    bad, cycle = _violations(scan["edges"])
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_layer_rule_sees_violations():
    """The check is not vacuous: an upward import, an import within a layer below the
    top and a cycle between applications are all reported."""
    assert _rank("layout") < _rank("plan") < _rank("kernels") < _rank("hashing") \
        < _rank("ops") < _rank("parallel") < _rank("modules") < _rank("model")
    assert _rank("some_new_unit") == TOP
    ok = [("dist_sparse_attn.ops", "dist_sparse_attn.kernels", 1),
          ("dist_sparse_attn.kernels.torch_tiled", "dist_sparse_attn.layout", 2),
          ("dist_sparse_attn.kernels.triton_attn", "dist_sparse_attn.kernels", 3)]
    assert _violations(ok) == ([], None)
    up = ok + [("dist_sparse_attn.layout", "dist_sparse_attn.kernels.triton_sort", 9)]
    bad, _ = _violations(up)
    assert len(bad) == 1 and "dist_sparse_attn.layout:9" in bad[0]
    assert len(_violations([("dist_sparse_attn.layout", "dist_sparse_attn.data", 1)])[0]) == 1
    loop = [("dist_sparse_attn.train", "dist_sparse_attn.demo", 1),
            ("dist_sparse_attn.demo", "dist_sparse_attn.train", 2)]
    bad, cycle = _violations(loop)
    assert bad == [] and cycle is not None and cycle[0] == cycle[-1]

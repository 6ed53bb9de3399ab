"""CUDA-graph replay of the training step (dist_sparse_attn.graphs, GPTConfig.cuda_graph).

References: the same model run eagerly with the same weights (losses, logits and every
parameter's gradient, over several optimizer steps and with gradient accumulation), a
small hand-written function and its autograd gradients, and the configuration rules.
Without CUDA only the rules and the eager fallback run; the rest is marked ``gpu``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dist_sparse_attn.config import ConfigError, check_compile
from dist_sparse_attn.graphs import GraphedCall, GraphMismatch
from dist_sparse_attn.model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_buckets=4, vocab_size=256)


def test_config_rules():
    for field, value in (("activation_checkpointing", True), ("mlp_chunk", 64),
                         ("loss_chunk", 64)):
        with pytest.raises(ValueError, match=f"cuda_graph=True does not work with {field}"):
            GPTConfig(cuda_graph=True, **{field: value})
    with pytest.raises(ValueError, match="cuda_graph"):
        GPTConfig(family="hf", cuda_graph=True)
    mcfg = GPTConfig(cuda_graph=True)
    zero = lambda stage: {"zero_optimization": {"stage": stage}}      # noqa: E731
    check_compile(mcfg, zero(1), sp=1, cuda=True)
    check_compile(mcfg, zero(2), sp=1, cuda=True)
    for kw, text in ((dict(ds=zero(1), sp=1, cuda=False), "needs a CUDA device"),
                     (dict(ds=zero(1), sp=2, cuda=True), "one rank per sequence"),
                     (dict(ds=zero(3), sp=1, cuda=True), "ZeRO 0-2")):
        with pytest.raises(ConfigError, match=text):
            check_compile(mcfg, **kw)


def test_cpu_runs_the_usual_forward(seed):
    """On the CPU (and in eval or under no_grad anywhere) cuda_graph changes nothing."""
    ref = GPT(GPTConfig(attention="hash", **TINY))
    model = GPT(GPTConfig(attention="hash", cuda_graph=True, **TINY))
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 256, (2, 64))
    for m in (ref, model):
        m.zero_grad()
        m(idx, idx.roll(-1, 1))[1].backward()
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad)
    assert model._graphs == {}


def test_graphed_call_needs_cuda_or_refuses_bad_arguments():
    lin = torch.nn.Linear(3, 3)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            GraphedCall(lin, lin, [torch.ones(3)])
        return
    lin.cuda()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GraphedCall(lin, list(lin.parameters()), [torch.ones(3, device="cuda")])
    with pytest.raises(ValueError, match="no input may require grad"):
        GraphedCall(lin, lin, [torch.ones(3, device="cuda", requires_grad=True)])
    with pytest.raises(ValueError, match="one CUDA device"):
        GraphedCall(lin, lin, [torch.ones(3)])
    frozen = torch.nn.Linear(3, 3, device="cuda").requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        GraphedCall(frozen, frozen, [torch.ones(3, device="cuda")])


# ---------------------------------------------------------------------------------------------
# on a GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_graphed_call_matches_autograd(seed):
    dev = "cuda"
    lin = torch.nn.Linear(16, 8, device=dev)
    params = list(lin.parameters())

    def fn(x, t):
        y = torch.tanh(lin(x))
        return y, ((y - t) ** 2).mean()

    x0, t0 = torch.randn(4, 16, device=dev), torch.randn(4, 8, device=dev)
    call = GraphedCall(fn, lin, [x0, t0])
    for step in range(3):
        x, t = torch.randn(4, 16, device=dev), torch.randn(4, 8, device=dev)
        lin.zero_grad()
        y_ref, loss_ref = fn(x, t)
        (loss_ref + y_ref.sum()).backward()
        ref = [p.grad.clone() for p in params]
        lin.zero_grad()
        y, loss = call(x, t)
        (loss + y.sum()).backward()
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(y, y_ref)
        for g, r in zip((p.grad for p in params), ref):
            torch.testing.assert_close(g, r)
        with torch.no_grad():
            lin.weight.add_(0.1)        # in place: the capture still holds
    # a call's backward after a later call: refused, not silently wrong
    y1, _ = call(x0, t0)
    call(x0, t0)
    with pytest.raises(GraphMismatch, match="overwritten"):
        y1.sum().backward()
    with pytest.raises(GraphMismatch, match="inputs"):
        call(torch.randn(5, 16, device=dev), t0)
    lin.weight.data = lin.weight.data.clone()        # moved
    with pytest.raises(GraphMismatch, match="parameters"):
        call(x0, t0)


@pytest.mark.gpu
def test_graphed_call_leaves_held_accumulate_nodes_alone(seed):
    """DeepSpeed's ZeRO stages (and DDP) keep every parameter's AccumulateGrad node,
    made on the default stream, alive for their gradient hooks. The capture must not
    reach those nodes (CUDA refuses to make the default stream wait on a capture), and
    their hooks fire once per real backward, never for the warm-up or the capture."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(),
                              torch.nn.Linear(16, 16)).cuda()
    mlp[2].weight = mlp[0].weight                   # tied: one stand-in for both
    fired, nodes = [], []
    for p in mlp.parameters():
        node = p.expand_as(p).grad_fn.next_functions[0][0]
        node.register_hook(lambda *_, p=p: fired.append(p))
        nodes.append(node)
    x0 = torch.randn(8, 16, device="cuda")
    call = GraphedCall(lambda x: (mlp(x).square().mean(),), mlp, [x0])
    assert fired == []
    x = torch.randn(8, 16, device="cuda")
    call(x)[0].backward()
    assert len(fired) == len(nodes) == 3
    got = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(x).square().mean().backward()
    for g, p in zip(got, mlp.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert all(isinstance(p, torch.nn.Parameter) and p.is_leaf for p in mlp.parameters())
    assert [id(p) for p in mlp.parameters()] == [id(p) for p in call.params]


def _models(attention, compile="off", **kw):
    """An eager model and a deep copy of it with cuda_graph (and ``compile``) on."""
    cfg = dict(TINY, attention=attention, **kw)
    ref = GPT(GPTConfig(**cfg)).cuda()
    model = copy.deepcopy(ref)
    model.config = GPTConfig(**cfg, cuda_graph=True, compile=compile)
    return ref, model


@pytest.mark.gpu
@pytest.mark.parametrize("attention, kw", [
    ("dense", {}), ("hash", {}), ("hash", dict(local_heads=1, local_window=32)),
    ("hash", dict(bucket_cap=1.5)), ("qk", dict(qk_keep_rate=0.5)), ("none", {}),
    ("hash", dict(local_heads=1, local_window=32, compile="model")),
    ("qk", dict(qk_keep_rate=0.5, compile="model"))],
    ids=["dense", "hash", "hash-local", "hash-cap", "qk", "none", "hash-local-compiled",
         "qk-compiled"])
def test_gpt_graphed_training_equals_eager(attention, kw, seed):
    """Three AdamW steps, each over two accumulated micro-batches: every loss, the
    logits and every gradient equal the eager model's (also with the captured step
    compiled, ``compile="model"``)."""
    ref, model = _models(attention, **kw)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for step in range(3):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=True)
        for micro in range(2):
            idx = torch.randint(0, 256, (2, 256), device="cuda", generator=gen)
            tgt = idx.roll(-1, 1)
            out = [m(idx, tgt) for m in (ref, model)]
            for logits, loss in out:
                loss.backward()
            torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-3, atol=1e-4)
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
        for opt in opts:
            opt.step()
    assert len(model._graphs) == 1
    # eval and no_grad run the usual forward, on the trained weights
    model.eval(), ref.eval()
    with torch.no_grad():
        idx = torch.randint(0, 256, (1, 128), device="cuda", generator=gen)
        torch.testing.assert_close(model(idx)[0], ref(idx)[0], rtol=1e-3, atol=1e-4)
    assert len(model._graphs) == 1


@pytest.mark.gpu
def test_gpt_graph_recaptured_when_parameters_move(seed):
    ref, model = _models("hash")
    idx = torch.randint(0, 256, (2, 128), device="cuda")
    model(idx, idx)[1].backward()
    first = next(iter(model._graphs.values()))
    model.to(torch.bfloat16), ref.to(torch.bfloat16)        # new storage for every weight
    model.zero_grad(), ref.zero_grad()
    loss = model(idx, idx)[1]
    assert next(iter(model._graphs.values())) is not first
    torch.testing.assert_close(loss, ref(idx, idx)[1], rtol=1e-2, atol=1e-2)

"""A training forward and its backward, replayed from CUDA graphs.

A CUDA graph records the kernels a piece of work launches once and replays them with
one host call: Python, autograd and the launches of every op (a GPT step launches
thousands) then cost nothing per step. :class:`GraphedCall` captures
``fn(*inputs)`` -- a function of integer (or otherwise non-differentiable) input
tensors that returns a tuple of tensors computed with a module -- together with the
gradient of its outputs with respect to the module's parameters, in two graphs that
share one memory pool, and puts the pair into autograd: a call copies the inputs into
the graphs' static buffers, replays the forward graph and returns copies of its
outputs; ``backward`` copies the incoming output gradients in, replays the backward
graph and hands autograd copies of the parameter gradients. Those accumulate into
``param.grad`` through the usual ``AccumulateGrad`` nodes, so gradient accumulation and
the gradient hooks of DeepSpeed's ZeRO stages see an ordinary backward.

The warm-up and the capture differentiate with respect to stand-ins for the parameters:
new leaf tensors that share the parameters' storage, put into the module for the
duration. A parameter's own ``AccumulateGrad`` node belongs to the stream it was made
on (the default stream, when DeepSpeed or DDP made it at start-up and keep it alive for
their hooks); a captured backward that reached it would make the default stream wait on
the capture, which CUDA refuses.

What the captured work must satisfy (the capture fails loudly where CUDA detects it,
the rest is the caller's promise):

* no host synchronisation (``.item()``, value-dependent shapes) and no CPU work whose
  result changes from step to step: a replay runs only the recorded kernels;
* the same input shapes and dtypes on every call (:class:`GraphedCall` checks them,
  and the parameters' storage, dtype and ``requires_grad``, on every call and raises
  :class:`GraphMismatch` when they differ: replaying would read stale memory);
* one backward per call, before the next call: a call overwrites the activations the
  previous one saved (a late backward raises :class:`GraphMismatch`);
* random numbers only from PyTorch's CUDA generator (graph-safe: a replay draws fresh
  ones); dropout masks differ from an eager run's, since the warm-up steps draw too.

Memory: the pool holds the captured step's activations and workspace for as long as
the :class:`GraphedCall` lives, beside whatever eager calls allocate.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

__all__ = ["GraphedCall", "GraphMismatch", "signature"]


class GraphMismatch(RuntimeError):
    """A call whose inputs or parameters no longer match what the graphs captured."""


def signature(tensors) -> tuple:
    """(shape, dtype, device) of each tensor: what a capture fixes about its inputs."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _param_signature(params) -> tuple:
    return tuple((p.data_ptr(), p.dtype, tuple(p.shape), p.requires_grad) for p in params)


class GraphedCall:
    """``fn(*inputs)`` and its gradient w.r.t. ``module``'s parameters, captured in
    CUDA graphs.

    Args:
        fn: ``fn(*inputs) -> tuple of tensors``, computed with ``module`` (and the
            inputs) on one CUDA device, without host synchronisation. It must reach the
            parameters through the module's attributes, as ``module(x)`` and its
            submodules do, not through references to them taken beforehand.
        module: the parameters that require grad are those differentiated.
        sample_inputs: tensors of the shapes, dtypes and device every call will pass;
            none may require grad. Their values are used for the warm-up and capture.
        warmup: eager forward + backward runs (on a side stream) before capturing: the
            first launches compile and autotune kernels, pick cuDNN plans and fill
            caches, which a capture must not do. Their gradients are discarded.

    Calling the object runs the captured step; see the module docstring.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], module: torch.nn.Module,
                 sample_inputs: Sequence[torch.Tensor], warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedCall needs CUDA")
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the module has no parameter that requires grad")
        if any(t.requires_grad for t in sample_inputs):
            raise ValueError("GraphedCall differentiates with respect to the module's "
                             "parameters only: no input may require grad")
        devices = {t.device for t in list(sample_inputs) + params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"inputs and the module's parameters must live on one CUDA "
                             f"device, got {sorted(map(str, devices))}")
        self.fn, self.module, self.params = fn, module, params
        self.static_inputs = [t.detach().clone() for t in sample_inputs]
        self.input_signature = signature(self.static_inputs)
        self.param_signature = _param_signature(module.parameters())
        self.replays = 0
        self._capture(warmup)

    def _run(self):
        out = self.fn(*self.static_inputs)
        if isinstance(out, torch.Tensor):
            out = (out,)
        if not isinstance(out, (tuple, list)) or not out or \
                not all(isinstance(o, torch.Tensor) for o in out):
            raise TypeError(f"fn must return a tensor or a tuple of tensors, got "
                            f"{type(out).__name__}")
        return tuple(out)

    @contextlib.contextmanager
    def _stand_ins(self):
        """Every parameter replaced in the module by a new leaf on its storage (tied
        parameters by one leaf); yields the leaves in ``self.params`` order."""
        leaves = {id(p): torch.nn.Parameter(p.detach(), requires_grad=True) for p in self.params}
        swapped = []
        try:
            for m in self.module.modules():
                for name, p in m._parameters.items():
                    if p is not None and id(p) in leaves:
                        swapped.append((m, name, p))
                        m._parameters[name] = leaves[id(p)]
            yield [leaves[id(p)] for p in self.params]
        finally:
            for m, name, p in swapped:
                m._parameters[name] = p

    def _grad(self, outputs, grad_outputs, leaves):
        diff = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in diff], leaves, [g for _, g in diff],
                                   allow_unused=True)

    def _capture(self, warmup: int):
        # autocast caches the casts of parameters within one autocast region: a capture
        # must record the cast kernels, not reuse a cast made by a warm-up call
        dtype = torch.get_autocast_dtype("cuda")
        autocast = torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"),
                                  cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(warmup):
                with self._stand_ins() as leaves:
                    out = self._run()
                self._grad(out, [torch.ones_like(o) for o in out], leaves)
                del out, leaves
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with self._stand_ins() as leaves:
            with autocast, torch.cuda.graph(self.fwd_graph, pool=pool):
                self.static_outputs = self._run()
        self.differentiable = [o.requires_grad for o in self.static_outputs]
        if not any(self.differentiable):
            raise ValueError("no output of fn requires grad: nothing to capture a backward of")
        self.static_grad_outputs = [torch.empty_like(o) if d else None
                                    for o, d in zip(self.static_outputs, self.differentiable)]
        with torch.cuda.graph(self.bwd_graph, pool=pool):
            self.static_grads = self._grad(self.static_outputs, self.static_grad_outputs,
                                           leaves)

    def check(self, inputs) -> None:
        """Raise :class:`GraphMismatch` unless ``inputs`` and the parameters match the
        capture (shapes, dtypes, device; the parameters' storage and requires_grad)."""
        if signature(inputs) != self.input_signature:
            raise GraphMismatch(f"inputs {signature(inputs)} differ from the captured "
                                f"{self.input_signature}")
        if _param_signature(self.module.parameters()) != self.param_signature:
            raise GraphMismatch("the parameters were moved, cast, resized or had "
                                "requires_grad changed since the capture")

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        self.check(inputs)
        return _Replay.apply(self, *inputs, *self.params)


class _Replay(torch.autograd.Function):

    @staticmethod
    def forward(ctx, call: GraphedCall, *args):
        call.replays += 1
        ctx.call, ctx.replay = call, call.replays
        for static, x in zip(call.static_inputs, args[:len(call.static_inputs)]):
            static.copy_(x)
        call.fwd_graph.replay()
        outs = tuple(o.detach().clone() for o in call.static_outputs)
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, call.differentiable) if not d])
        return outs

    @staticmethod
    def backward(ctx, *grad_outputs):
        call = ctx.call
        if ctx.replay != call.replays:
            raise GraphMismatch(
                "backward of a graphed call whose captured activations a later call has "
                "overwritten: with CUDA graphs, run each call's backward before the next call")
        for static, g in zip(call.static_grad_outputs, grad_outputs):
            if static is not None:
                if g is None:
                    static.zero_()
                else:
                    static.copy_(g)
        call.bwd_graph.replay()
        n_in = len(call.static_inputs)
        # copies: AccumulateGrad may keep the tensor it is given as param.grad, which the
        # next replay would overwrite
        grads = tuple(None if g is None else g.clone() for g in call.static_grads)
        return (None,) + (None,) * n_in + grads

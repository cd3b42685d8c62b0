"""A SwiGLU MLP with LoRA as one autograd node, which keeps half the MLP's activations.

The MLP of Llama / Qwen3 (SmolLM2, Qwen3-1.7B) is

    y = W_d p,   p = silu(g) * u,   g = W_g x,   u = W_u x,   W -> W + s B A  under LoRA.

Under autograd, transformers' `LlamaMLP.forward` (peft LoRA on the three projections) keeps
four (N, I) tensors per layer for backward: silu's input g, its output silu(g), the up
projection u, and the product p (the input of W_d's LoRA A). With I = 1536 and H = 576 they are
6,144 of the ~10,100 floats per token per layer that SmolLM2-135M's student forward keeps.
`LoRASwiGLU` keeps g and u only (plus the (N, r) LoRA bottlenecks) and recomputes silu(g) and p
in backward, elementwise: no matmul is repeated, the values and gradients are the same maths.

Naive equivalent: `down(act(gate(x)) * up(x))` with peft's `lora.Linear` layers, i.e.
`F.linear(x, W) + s * F.linear(F.linear(x, A), B)` for each projection.

Used by `train` for the student's forward (`SDConfig.fused_mlp`); the sampler and the
self-teacher run without gradient and keep the module's own forward, bit for bit. Adapters in
another dtype than the model (peft keeps them in fp32 on a bf16 model) run as peft runs them: the
adapter branch in its own dtype, the sum cast back. A module, adapter state or input that this
function does not cover (bias, DoRA, several active adapters, active LoRA dropout, a base weight
in another dtype than its input, `adapter_names=`) falls back to the module's own forward.
Written from the maths above; fused LoRA MLPs exist elsewhere (unsloth, Liger-Kernel).
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

_ORIGINAL = "_sd_lib_unfused_forward"


@dataclass(frozen=True)
class Projection:
    """One linear map x -> x W^T + s (x A^T) B^T. weight (out, in); lora_A (r, in), lora_B (out, r)
    or both None (no active adapter)."""

    weight: torch.Tensor
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0


def _forward(x: torch.Tensor, p: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (N, in) -> (y (N, out) in x's dtype, x A^T (N, r) in the adapter's dtype, or None).

    As peft: the adapter branch runs in the adapter's dtype (fp32 adapters on a bf16 model) and
    the sum is cast back to the base output's dtype."""
    y = x @ p.weight.T  # (N, out)
    if p.lora_A is None:
        return y, None
    xa = x.to(p.lora_A.dtype) @ p.lora_A.T  # (N, r)
    lora = (xa @ p.lora_B.T).mul_(p.scaling)  # (N, out)
    return (y.add_(lora) if lora.dtype == y.dtype else (y + lora).to(y.dtype)), xa


def _backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor | None, p: Projection, *,
              need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = x W^T + s xa B^T, xa = x A^T, given dy (N, out): (dx, dW, dA, dB)."""
    dx = dy @ p.weight if need_x else None  # (N, in)
    dw = dy.T @ x if p.weight.requires_grad else None  # (out, in)
    da = db = None
    if p.lora_A is not None:
        dy_lora = dy.to(p.lora_B.dtype)
        dxa = (dy_lora @ p.lora_B).mul_(p.scaling)  # (N, r)
        if p.lora_B.requires_grad:
            db = (dy_lora.T @ xa).mul_(p.scaling)  # (out, r)
        if p.lora_A.requires_grad:
            da = dxa.T @ x.to(p.lora_A.dtype)  # (r, in)
        if need_x:
            dx.add_((dxa @ p.lora_A).to(dx.dtype))
    return dx, dw, da, db


class LoRASwiGLU(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) for x (N, H) -> (N, H); each projection W (+ s B A)."""

    @staticmethod
    def forward(ctx, x, w_g, a_g, b_g, w_u, a_u, b_u, w_d, a_d, b_d, scalings):
        gate = Projection(w_g, a_g, b_g, scalings[0])
        up = Projection(w_u, a_u, b_u, scalings[1])
        down = Projection(w_d, a_d, b_d, scalings[2])
        g, xa_g = _forward(x, gate)  # (N, I), (N, r)
        u, xa_u = _forward(x, up)  # (N, I), (N, r)
        y, pa_d = _forward(F.silu(g).mul_(u), down)  # the product p is freed here
        ctx.projections = (gate, up, down)
        ctx.save_for_backward(x, g, u, xa_g, xa_u, pa_d)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa_g, xa_u, pa_d = ctx.saved_tensors
        gate, up, down = ctx.projections
        act = F.silu(g)  # (N, I): recomputed, bit for bit the forward's
        dp, dw_d, da_d, db_d = _backward(dy, act * u, pa_d, down, need_x=True)  # (N, I)
        du = dp * act
        dg = torch.ops.aten.silu_backward(dp.mul_(u), g)  # the kernel autograd runs for F.silu
        del act
        need_x = ctx.needs_input_grad[0]
        dx, dw_g, da_g, db_g = _backward(dg, x, xa_g, gate, need_x=need_x)
        dx_u, dw_u, da_u, db_u = _backward(du, x, xa_u, up, need_x=need_x)
        if need_x:
            dx.add_(dx_u)
        return dx, dw_g, da_g, db_g, dw_u, da_u, db_u, dw_d, da_d, db_d, None


def lora_swiglu(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """x (..., H) -> (..., H): `down(silu(gate(x)) * up(x))` through `LoRASwiGLU`."""
    lead = x.shape[:-1]
    y = LoRASwiGLU.apply(x.reshape(-1, x.shape[-1]), gate.weight, gate.lora_A, gate.lora_B, up.weight, up.lora_A,
                         up.lora_B, down.weight, down.lora_A, down.lora_B,
                         (gate.scaling, up.scaling, down.scaling))
    return y.reshape(*lead, y.shape[-1])


# ----------------------------------------------------------------------------- modules

def _projection(layer: Any, dtype: torch.dtype) -> Projection | None:
    """The `Projection` a plain nn.Linear or a peft `lora.Linear` computes now; None if not covered."""
    if type(layer) is torch.nn.Linear:
        ok = layer.bias is None and layer.weight.dtype == dtype
        return Projection(layer.weight) if ok else None
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.bias is not None or base.weight.dtype != dtype:
        return None
    if layer.disable_adapters or layer.merged:  # peft's forward runs the base layer alone
        return None if layer.disable_adapters and layer.merged else Projection(base.weight)
    active = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
    if not active:
        return Projection(base.weight)
    if len(active) > 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None  # several adapters, or DoRA & co.
    name = active[0]
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if dropout.training and not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return None
    if b.bias is not None or a.weight.dtype != b.weight.dtype or not a.weight.dtype.is_floating_point:
        return None
    return Projection(base.weight, a.weight, b.weight, float(layer.scaling[name]))


def _is_swiglu_mlp(module: Any) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in {"SiLU", "SiLUActivation"})


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    original = getattr(self, _ORIGINAL)
    if args or kwargs or not torch.is_grad_enabled():
        return original(x, *args, **kwargs)
    projections = [_projection(getattr(self, n), x.dtype) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projections):
        return original(x)
    tensors = [t for p in projections for t in (p.weight, p.lora_A, p.lora_B) if t is not None]
    if not (x.requires_grad or any(t.requires_grad for t in tensors)):
        return original(x)
    return lora_swiglu(x, *projections)


def swiglu_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` with gate_proj, up_proj, down_proj and a SiLU `act_fn`."""
    return [m for m in model.modules() if _is_swiglu_mlp(m)]


@contextlib.contextmanager
def fused_swiglu(model: torch.nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """Within the block, every SwiGLU MLP of `model` runs through `LoRASwiGLU` when gradients
    flow (`torch.is_grad_enabled()` and something in it requires grad); without gradient, or in a
    case it does not cover, the module's own forward. Yields the number of modules patched
    (0 when `enabled` is False, or when unsloth is loaded: its own LoRA MLP kernels stay in charge).
    Nests: an already patched module is left as it is."""
    patched = []  # (module, its instance-level forward before, if it had one)
    try:
        for module in swiglu_mlps(model) if enabled and "unsloth" not in sys.modules else []:
            if _ORIGINAL in module.__dict__:
                continue
            patched.append((module, module.__dict__.get("forward")))
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
        yield len(patched)
    finally:
        for module, own in patched:
            del module.__dict__[_ORIGINAL]
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own

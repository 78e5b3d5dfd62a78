"""Reference optimizer rules as epilogue programs, with the per-step scalars torch.optim would use.

Each ``<name>_program(...)`` returns the :class:`~forge_compile.epilogue.EpilogueProgram` that
reproduces the per-element math of ``torch.optim``'s single-tensor implementation (the
``foreach=False, fused=False`` path) op for op, so that the fused kernels can be checked against
real ``torch.optim`` steps. Each ``<name>_scalars(...)`` computes that program's per-step scalar
inputs from the hyper-parameters and the step counter, in Python double precision exactly as
torch.optim does, and returns them as fp32 0-d tensors (the kernels compute in fp32, as eager
does for fp32 parameters).

The structure of a program depends only on which terms are present (weight decay on or off,
nesterov, ...); every value that a scheduler may change (lr, betas, bias corrections) is a
scalar input, so a new learning rate never produces a new program (and never recompiles).

The rewrite pass derives its programs from traced graphs; these hand-written ones are the ground
truth for tests and benchmarks.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch

from forge_compile.epilogue import GRAD, PARAM, EpilogueProgram, Instr

__all__ = [
    "sgd_program", "sgd_scalars", "adam_program", "adam_scalars", "adamw_program",
    "adamw_scalars", "lion_program", "lion_scalars", "lion_reference_step", "scalar_tensors",
]

Device = Union[str, torch.device, None]


def scalar_tensors(values: Sequence[float], device: Device = None) -> List[torch.Tensor]:
    """Python floats -> fp32 0-d tensors (how per-step scalars reach the op)."""
    return [torch.tensor(float(v), dtype=torch.float32, device=device) for v in values]


def _prog(tensors: Tuple[str, ...], scalars: Tuple[str, ...], ops, outputs) -> EpilogueProgram:
    return EpilogueProgram(tensors=tensors, scalars=scalars,
                           ops=tuple(Instr(o, op, tuple(a)) for o, op, a in ops),
                           outputs=tuple(outputs))


# ---------------------------------------------------------------------------------------- SGD
def sgd_program(momentum: bool = True, nesterov: bool = False,
                weight_decay: bool = False) -> EpilogueProgram:
    """torch.optim.SGD (maximize=False).

    Scalars: ``neg_lr``; with momentum ``buf_decay`` and ``buf_in`` (the buffer update is
    ``buf*buf_decay + g*buf_in``: momentum and 1-dampening, or 0 and 1 on the first step, which
    reproduces torch's ``buf = clone(grad)`` from a zero-filled buffer), with nesterov also
    ``momentum``; with weight decay ``weight_decay``.
    """
    scalars: List[str] = ["neg_lr"]
    ops: list = []
    g = GRAD
    if weight_decay:
        scalars.append("weight_decay")
        ops.append(("g_wd", "fma", (PARAM, "weight_decay", GRAD)))   # grad.add(param, alpha=wd)
        g = "g_wd"
    tensors: Tuple[str, ...] = (GRAD, PARAM)
    outputs = []
    if momentum:
        tensors += ("momentum_buffer",)
        scalars += ["buf_decay", "buf_in"]
        ops += [("b0", "mul", ("momentum_buffer", "buf_decay")),
                ("b1", "mul", (g, "buf_in")),
                ("buf", "add", ("b0", "b1"))]
        outputs.append(("momentum_buffer", "buf"))
        if nesterov:
            scalars.append("momentum")
            ops += [("nb", "mul", ("buf", "momentum")), ("upd", "add", (g, "nb"))]
            g = "upd"
        else:
            g = "buf"
    ops += [("dp", "mul", (g, "neg_lr")), ("p", "add", (PARAM, "dp"))]
    outputs.insert(0, (PARAM, "p"))
    return _prog(tensors, tuple(scalars), ops, outputs)


def sgd_scalars(lr: float, momentum: float = 0.0, dampening: float = 0.0,
                weight_decay: float = 0.0, nesterov: bool = False, first_step: bool = False,
                device: Device = None) -> List[torch.Tensor]:
    """Scalars of ``sgd_program(momentum != 0, nesterov, weight_decay != 0)`` for one step."""
    vals = [-lr]
    if weight_decay:
        vals.append(weight_decay)
    if momentum:
        vals += [0.0, 1.0] if first_step else [momentum, 1.0 - dampening]
        if nesterov:
            vals.append(momentum)
    return scalar_tensors(vals, device)


# ---------------------------------------------------------------------------------- Adam(W)
def _adam_ops(g: str, decoupled_decay: bool):
    ops = []
    p = PARAM
    if decoupled_decay:
        ops.append(("p_decayed", "mul", (PARAM, "decay")))        # param.mul_(1 - lr*wd)
        p = "p_decayed"
    ops += [
        ("m", "lerp", ("exp_avg", g, "one_minus_beta1")),         # exp_avg.lerp_(grad, 1-b1)
        ("v_decayed", "mul", ("exp_avg_sq", "beta2")),            # exp_avg_sq.mul_(b2)
        ("g_scaled", "mul", ("one_minus_beta2", g)),              # .addcmul_(g, g, value=1-b2)
        ("g_sq", "mul", ("g_scaled", g)),                         #   = self + (value*g)*g
        ("v", "add", ("v_decayed", "g_sq")),
        ("v_sqrt", "sqrt", ("v",)),                               # (v.sqrt() / bc2_sqrt)
        ("v_hat", "div", ("v_sqrt", "bias_correction2_sqrt")),
        ("denom", "add", ("v_hat", "eps")),                       #   .add_(eps)
        ("ratio", "div", ("m", "denom")),                         # addcdiv_(m, denom, -step)
        ("dp", "mul", ("neg_step_size", "ratio")),                #   = self + value*(m/denom)
        ("p", "add", (p, "dp")),
    ]
    return ops


_ADAM_SCALARS = ("one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction2_sqrt", "eps",
                 "neg_step_size")


def adam_program(weight_decay: bool = False) -> EpilogueProgram:
    """torch.optim.Adam (amsgrad=False, maximize=False); L2 weight decay folded into the grad."""
    scalars: Tuple[str, ...] = _ADAM_SCALARS
    ops = []
    g = GRAD
    if weight_decay:
        scalars = ("weight_decay",) + scalars
        ops.append(("g_wd", "fma", (PARAM, "weight_decay", GRAD)))  # grad.add(param, alpha=wd)
        g = "g_wd"
    ops += _adam_ops(g, decoupled_decay=False)
    return _prog((GRAD, PARAM, "exp_avg", "exp_avg_sq"), scalars, ops,
                 [(PARAM, "p"), ("exp_avg", "m"), ("exp_avg_sq", "v")])


def adamw_program() -> EpilogueProgram:
    """torch.optim.AdamW (amsgrad=False, maximize=False); decoupled decay as scalar ``decay``."""
    return _prog((GRAD, PARAM, "exp_avg", "exp_avg_sq"), ("decay",) + _ADAM_SCALARS,
                 _adam_ops(GRAD, decoupled_decay=True),
                 [(PARAM, "p"), ("exp_avg", "m"), ("exp_avg_sq", "v")])


def _adam_common(lr, betas, eps, step):
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    return [1 - beta1, beta2, 1 - beta2, math.sqrt(bias_correction2), eps, -step_size]


def adam_scalars(lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 step: int = 1, device: Device = None) -> List[torch.Tensor]:
    """Scalars of ``adam_program(weight_decay != 0)`` for step number ``step`` (1-based)."""
    vals = ([weight_decay] if weight_decay else []) + _adam_common(lr, betas, eps, step)
    return scalar_tensors(vals, device)


def adamw_scalars(lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                  step: int = 1, device: Device = None) -> List[torch.Tensor]:
    """Scalars of ``adamw_program()`` for step number ``step`` (1-based)."""
    return scalar_tensors([1 - lr * weight_decay] + _adam_common(lr, betas, eps, step), device)


# ------------------------------------------------------------------------------------- Lion
def lion_program() -> EpilogueProgram:
    """Lion (Chen et al. 2023), written the way users write it (see ``lion_reference_step``)."""
    ops = [
        ("p_decayed", "mul", (PARAM, "decay")),                  # p.mul_(1 - lr*wd)
        ("c0", "mul", ("exp_avg", "beta1")),                     # m*b1 + g*(1-b1)
        ("c1", "mul", (GRAD, "one_minus_beta1")),
        ("c", "add", ("c0", "c1")),
        ("u", "sign", ("c",)),
        ("dp", "mul", ("u", "neg_lr")),                          # p.add_(sign, alpha=-lr)
        ("p", "add", ("p_decayed", "dp")),
        ("m0", "mul", ("exp_avg", "beta2")),                     # m.mul_(b2).add_(g, alpha=1-b2)
        ("m1", "mul", (GRAD, "one_minus_beta2")),
        ("m", "add", ("m0", "m1")),
    ]
    return _prog((GRAD, PARAM, "exp_avg"),
                 ("decay", "neg_lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"),
                 ops, [(PARAM, "p"), ("exp_avg", "m")])


def lion_scalars(lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 device: Device = None) -> List[torch.Tensor]:
    """Scalars of ``lion_program()``."""
    b1, b2 = betas
    return scalar_tensors([1 - lr * weight_decay, -lr, b1, 1 - b1, b2, 1 - b2], device)


@torch.no_grad()
def lion_reference_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0) -> None:
    """A user-written eager Lion step (lucidrains/lion-pytorch style), in place."""
    b1, b2 = betas
    param.mul_(1 - lr * weight_decay)
    update = exp_avg.clone().mul_(b1).add(grad, alpha=1 - b1).sign_()
    param.add_(update, alpha=-lr)
    exp_avg.mul_(b2).add_(grad, alpha=1 - b2)

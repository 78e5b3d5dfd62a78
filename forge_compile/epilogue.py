"""The epilogue program: the optimizer update of one weight, as a tiny elementwise SSA program.

It is the contract between the rewrite pass (which extracts it from the captured graph) and the
kernels (which run it on one tile of the gradient while that tile is still in registers). It is
deliberately small: a fixed vocabulary of fp32 elementwise ops, named per-element tensor inputs,
named per-step scalar inputs (0-d tensors computed once per step in the graph, so that an LR
schedule changes a runtime value, never the program), and the outputs that overwrite inputs.

The program is serialised to a JSON string (``EpilogueProgram.dumps``): that string is the
``program`` argument of the ``forge_compile::fused_linear_update_`` op, and the cache key of every
compiled kernel variant.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Instr", "EpilogueProgram", "OPS", "run_epilogue", "GRAD", "PARAM", "ROUNDINGS"]

GRAD = "grad"
PARAM = "param"
ROUNDINGS = ("stochastic", "nearest")     # EpilogueProgram.param_rounding

Arg = Union[str, float, int, bool]

# op -> arity. Semantics are those of the torch function named in _TORCH_OPS, on fp32 values.
OPS: Dict[str, int] = {
    # binary
    "add": 2, "sub": 2, "mul": 2, "div": 2, "maximum": 2, "minimum": 2, "pow": 2,
    "lt": 2, "le": 2, "gt": 2, "ge": 2, "eq": 2, "ne": 2,
    # unary
    "neg": 1, "sqrt": 1, "rsqrt": 1, "reciprocal": 1, "abs": 1, "sign": 1, "exp": 1, "log": 1,
    # ternary
    "where": 3,   # where(cond, a, b)
    "lerp": 3,    # lerp(start, end, weight), torch's two-sided formula (see _lerp)
    "fma": 3,     # fma(a, b, c) = a * b + c
}


def _lerp(a, b, w):
    # torch.lerp switches formula at weight 0.5 for accuracy at both ends (ATen Lerp.h);
    # matching it keeps Adam's exp_avg bit-close to eager instead of 1 ulp off per step.
    w = torch.as_tensor(w, dtype=torch.float32) if not isinstance(w, torch.Tensor) else w
    return torch.where(w.abs() < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


_TORCH_OPS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)),
    "minimum": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
    "pow": torch.pow,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
    "neg": torch.neg, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
    "abs": torch.abs, "sign": torch.sign, "exp": torch.exp, "log": torch.log,
    "where": lambda c, a, b: torch.where(c, torch.as_tensor(a), torch.as_tensor(b)),
    "lerp": _lerp,
    "fma": lambda a, b, c: a * b + c,
}


@dataclasses.dataclass(frozen=True)
class Instr:
    """``out = op(*args)``; an arg is a value name (str) or a Python number constant."""

    out: str
    op: str
    args: Tuple[Arg, ...]


@dataclasses.dataclass(frozen=True)
class EpilogueProgram:
    """One optimizer update rule for one weight; see the module docstring."""

    tensors: Tuple[str, ...]                 # per-element inputs: (GRAD, PARAM, *state names)
    scalars: Tuple[str, ...]                 # per-step 0-d inputs, in call order
    ops: Tuple[Instr, ...]                   # SSA, topologically ordered
    outputs: Tuple[Tuple[str, str], ...]     # (tensor input overwritten, value name); never GRAD
    # how a bf16 weight's new value is rounded (fp32/fp64 weights: unused; state is always
    # rounded to nearest, as eager does): "stochastic" (unbiased: an update below half a bf16
    # ulp still moves the weight in expectation, FORGE's choice) or "nearest" (eager's rounding)
    param_rounding: str = "stochastic"
    # the scalar (by name) that holds a per-call random seed drawn on the device, a float in
    # [0, 2^24): the stochastic rounding's seed is the launch's seed XOR its value. Under CUDA
    # graphs a host seed is frozen at capture; torch's graph-safe RNG draws a fresh device
    # value at every replay (passes/fused_linear_update.py). None: the launch's seed alone.
    seed_scalar: Optional[str] = None

    def __post_init__(self):
        self.validate()

    @property
    def state(self) -> Tuple[str, ...]:
        return self.tensors[2:]

    def validate(self) -> None:
        """Raise ValueError unless the program is well formed."""
        if self.tensors[:2] != (GRAD, PARAM):
            raise ValueError(f"tensors must start with ({GRAD!r}, {PARAM!r}), got {self.tensors}")
        defined = set(self.tensors) | set(self.scalars)
        if len(defined) != len(self.tensors) + len(self.scalars):
            raise ValueError("input names must be unique")
        for ins in self.ops:
            if ins.op not in OPS:
                raise ValueError(f"unknown op {ins.op!r}; known: {sorted(OPS)}")
            if len(ins.args) != OPS[ins.op]:
                raise ValueError(f"{ins.op} takes {OPS[ins.op]} args, got {ins.args}")
            for a in ins.args:
                if isinstance(a, str) and a not in defined:
                    raise ValueError(f"{ins.out} = {ins.op}{ins.args}: {a!r} used before definition")
            if ins.out in defined:
                raise ValueError(f"{ins.out!r} defined twice")
            defined.add(ins.out)
        if self.param_rounding not in ROUNDINGS:
            raise ValueError(f"param_rounding={self.param_rounding!r}: use one of "
                             f"{', '.join(map(repr, ROUNDINGS))}")
        if self.seed_scalar is not None and self.seed_scalar not in self.scalars:
            raise ValueError(f"seed_scalar={self.seed_scalar!r} is not one of the scalars "
                             f"{self.scalars}")
        for dst, val in self.outputs:
            if dst == GRAD or dst not in self.tensors:
                raise ValueError(f"output {dst!r} must overwrite the param or a state tensor")
            if val not in defined:
                raise ValueError(f"output {dst!r} = undefined value {val!r}")

    def dumps(self) -> str:
        """Canonical JSON (the custom op's ``program`` argument and the kernel cache key)."""
        # cached on the (frozen) instance: the launchers key their kernels by it on every
        # launch, and building it costs ~30 us (2-core CPU, AdamW)
        s = self.__dict__.get("_dumps")
        if s is None:
            d = {"tensors": self.tensors, "scalars": self.scalars,
                 "ops": [[i.out, i.op, list(i.args)] for i in self.ops],
                 "outputs": self.outputs}
            if self.param_rounding != "stochastic":     # the default keeps older strings valid
                d["param_rounding"] = self.param_rounding
            if self.seed_scalar is not None:
                d["seed_scalar"] = self.seed_scalar
            s = json.dumps(d, separators=(",", ":"))
            object.__setattr__(self, "_dumps", s)
        return s

    @staticmethod
    def loads(s: str) -> "EpilogueProgram":
        d = json.loads(s)
        return EpilogueProgram(
            tensors=tuple(d["tensors"]), scalars=tuple(d["scalars"]),
            ops=tuple(Instr(o, op, tuple(a)) for o, op, a in d["ops"]),
            outputs=tuple((k, v) for k, v in d["outputs"]),
            param_rounding=d.get("param_rounding", "stochastic"),
            seed_scalar=d.get("seed_scalar"))

    def __str__(self) -> str:
        lines = [f"epilogue({', '.join(self.tensors)}; scalars: {', '.join(self.scalars) or '-'})"]
        lines += [f"  {i.out} = {i.op}({', '.join(map(str, i.args))})" for i in self.ops]
        lines += [f"  {dst} <- {val}" for dst, val in self.outputs]
        if self.param_rounding != "stochastic":
            lines.append(f"  (a bf16 {PARAM} is rounded to {self.param_rounding})")
        if self.seed_scalar is not None:
            lines.append(f"  (stochastic rounding's seed: the launch's XOR {self.seed_scalar})")
        return "\n".join(lines)


def run_epilogue(program: EpilogueProgram, tensors: Mapping[str, torch.Tensor],
                 scalars: Sequence[Union[torch.Tensor, float]]) -> Dict[str, torch.Tensor]:
    """Evaluate ``program`` with torch ops; returns {output tensor name: new value} (not written)."""
    env: Dict[str, object] = dict(tensors)
    env.update(zip(program.scalars, scalars))
    for ins in program.ops:
        args = [env[a] if isinstance(a, str) else a for a in ins.args]
        env[ins.out] = _TORCH_OPS[ins.op](*args)
    return {dst: env[val] for dst, val in program.outputs}

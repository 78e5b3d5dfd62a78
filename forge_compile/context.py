"""Per-compile state shared by the backend, the passes and explain(): options, names, the report."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from forge_compile.epilogue import ROUNDINGS

__all__ = ["ForgeOptions", "FusedParam", "CompileReport", "PassContext", "current_reports"]

_INNER_COMPILERS = ("inductor", "aot_eager")


@dataclasses.dataclass(frozen=True)
class ForgeOptions:
    """User options of the forge backend (forge_compile.compile(fn, **options))."""

    fuse: bool = True            # False: capture the whole step as one graph, rewrite nothing
    inner: str = "inductor"      # "inductor", or "aot_eager" (no codegen: fast CPU tests)
    # how a fused bf16 weight's new value is rounded to bf16: "stochastic" (FORGE's default:
    # unbiased, so updates below half an ulp still accumulate) or "nearest" (eager's rounding)
    bf16_rounding: str = "stochastic"

    @staticmethod
    def from_kwargs(**kwargs) -> "ForgeOptions":
        """Build options; an unknown name or bad value raises a one-line error naming the fix."""
        names = [f.name for f in dataclasses.fields(ForgeOptions)]
        for k in kwargs:
            if k not in names:
                raise TypeError(f"forge_compile: unknown option {k!r}; valid options: {', '.join(names)}")
        opts = ForgeOptions(**kwargs)
        if opts.inner not in _INNER_COMPILERS:
            raise ValueError(f"forge_compile: inner={opts.inner!r} is not supported; "
                             f"use one of {', '.join(map(repr, _INNER_COMPILERS))}")
        if not isinstance(opts.fuse, bool):
            raise TypeError(f"forge_compile: fuse must be True or False, got {opts.fuse!r}")
        if opts.bf16_rounding not in ROUNDINGS:
            raise ValueError(f"forge_compile: bf16_rounding={opts.bf16_rounding!r} is not "
                             f"supported; use one of {', '.join(map(repr, ROUNDINGS))}")
        return opts


@dataclasses.dataclass
class FusedParam:
    """One weight whose gradient GEMM was fused with its optimizer update."""

    name: str                    # module path, e.g. "blocks.0.mlp.up.weight"
    shape: tuple
    gradient_bytes: int          # bytes of the gradient that is never materialised
    rule: str                    # the epilogue program, printable
    # where the update differs from eager's by design, why and by how much ("": it does not)
    precision_note: str = ""
    # nodes that read the updated weight or state later in the step (an evaluation forward
    # after opt.step()): they read it after the fused op updated it in place
    read_after_update: int = 0
    # its gradient's norm (clip_grad_norm_) computed from the GEMM's operands, not the gradient
    # (passes/grad_norm.py): one more GEMM, and its dY and X held until the clip's scale is known
    norm_from_operands: bool = False


@dataclasses.dataclass
class CompileReport:
    """What one backend compile did: filled by the backend and the passes, read by explain()."""

    graph_index: int
    frame_compile_id: Optional[int] = None   # > 0: Dynamo recompiled this frame
    fused: Dict[str, FusedParam] = dataclasses.field(default_factory=dict)
    unfused: Dict[str, str] = dataclasses.field(default_factory=dict)   # param name -> reason
    unfused_bytes: Dict[str, int] = dataclasses.field(default_factory=dict)  # its gradient's bytes
    input_names: List[Optional[str]] = dataclasses.field(default_factory=list)  # of the ATen graph
    graph_before: Optional[str] = None     # the post-grad ATen graph handed to the passes
    graph_after: Optional[str] = None      # the same graph after the forge rewrite
    graph_module_after: object = None      # torch.fx.GraphModule copy of graph_after (drawing)
    # under CUDA graphs: the host-to-device copies of per-step scalars the rewrite added (each
    # runs on every call, outside the graphs)
    scalar_copies: int = 0
    # outputs of the step returned detached: their autograd graph was consumed by the traced
    # loss.backward() (capture._detach_consumed_outputs), e.g. ``return loss``
    detached_outputs: List[str] = dataclasses.field(default_factory=list)
    # dedupe_casts: identical casts merged into an earlier one, and the bytes of the copies
    # (autocast's bf16 X of q, k, v) no longer kept
    casts_merged: int = 0
    cast_bytes_merged: int = 0

    @property
    def gradient_bytes_eliminated(self) -> int:
        return sum(f.gradient_bytes for f in self.fused.values())


@dataclasses.dataclass
class PassContext:
    """What a pass may read: options, the name of each graph input, the report to fill."""

    options: ForgeOptions
    input_names: List[Optional[str]]   # i-th placeholder of the ATen graph -> its user-facing name
    report: CompileReport
    # Inductor will replay the compiled graph from CUDA graphs (a mode with "triton.cudagraphs"
    # on CUDA inputs): a value the host reads at launch is read once, at capture
    cudagraphs: bool = False


# Reports of the compiles made while explain() (or a test) listens; None when nobody listens.
_LISTENERS: List[List[CompileReport]] = []


def current_reports() -> List[List[CompileReport]]:
    return _LISTENERS

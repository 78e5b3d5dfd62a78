"""``forge_compile.explain``: compile a step with forge, run it once, report what happened."""
from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Any, Callable, Dict, List, Optional

from torch._dynamo.utils import counters

from forge_compile.context import CompileReport, FusedParam, current_reports

__all__ = ["ExplainReport", "explain", "listen"]


class listen:
    """Collect the CompileReport of every forge compile made inside the block."""

    def __enter__(self) -> List[CompileReport]:
        self.reports: List[CompileReport] = []
        current_reports().append(self.reports)
        return self.reports

    def __exit__(self, *exc) -> None:
        # by identity: nested listeners hold equal lists (the same reports), and list.remove
        # would take the outer one's
        listeners = current_reports()
        listeners.pop(next(i for i, r in enumerate(listeners) if r is self.reports))


@dataclasses.dataclass
class ExplainReport:
    """What forge did to one step function (see forge_compile.explain)."""

    graph_count: int
    graph_breaks: List[str]
    recompiles: int
    compiles: List[CompileReport]
    result: Any = None
    # (N, K) weight shape -> largest gradient block (bytes) the split-GEMM mode materialised
    # during the explained step (CUDA, where the autotuner chose it; see docs/kernels.md)
    split_gemm_blocks: Dict[tuple, int] = dataclasses.field(default_factory=dict)

    @property
    def fused(self) -> Dict[str, FusedParam]:
        out: Dict[str, FusedParam] = {}
        for r in self.compiles:
            out.update(r.fused)
        return out

    @property
    def unfused(self) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for r in self.compiles:
            out.update({k: v for k, v in r.unfused.items() if k not in self.fused})
        return out

    @property
    def unfused_bytes(self) -> Dict[str, int]:
        """Bytes of the gradient each unfused parameter still materialises."""
        unfused = self.unfused
        out: Dict[str, int] = {}
        for r in self.compiles:
            out.update({k: v for k, v in r.unfused_bytes.items() if k in unfused})
        return out

    @property
    def gradient_bytes_eliminated(self) -> int:
        return sum(f.gradient_bytes for f in self.fused.values())

    @property
    def detached_outputs(self) -> List[str]:
        """Outputs of the step returned detached: the traced loss.backward() consumed their
        autograd graph (e.g. ``return loss``), and a grad_fn on them would split the step."""
        return [n for r in self.compiles for n in r.detached_outputs]

    @property
    def graph(self) -> Optional[str]:
        """The rewritten ATen graph of the last compile (None when no pass ran)."""
        for r in reversed(self.compiles):
            if r.graph_after is not None:
                return r.graph_after
        return None

    def save_graph(self, path) -> pathlib.Path:
        """Draw the rewritten graph: SVG/PNG when pydot+graphviz are present, DOT text otherwise."""
        path = pathlib.Path(path)
        gm = next((r.graph_module_after for r in reversed(self.compiles)
                   if r.graph_module_after is not None), None)
        if gm is None:
            raise RuntimeError("forge_compile: no rewritten graph to draw (was fuse=False?)")
        from forge_compile.drawing import draw_graph
        return draw_graph(gm, path)

    def __str__(self) -> str:
        lines = [f"forge_compile.explain: {self.graph_count} graph(s), "
                 f"{len(self.graph_breaks)} graph break(s), {self.recompiles} recompile(s)"]
        lines += [f"  break: {b}" for b in self.graph_breaks]
        detached = self.detached_outputs
        if detached:
            lines.append(f"returned detached (requires_grad=False): {', '.join(detached)}; "
                         f"loss.backward() consumed their autograd graph inside the step")
        fused, unfused = self.fused, self.unfused
        if self.compiles and all(r.graph_before is None for r in self.compiles):
            lines.append("fusion off (fuse=False) or no forge pass ran: nothing was rewritten")
        lines.append(f"fused: {len(fused)} parameter(s), gradient bytes eliminated: "
                     f"{self.gradient_bytes_eliminated:,} ({self.gradient_bytes_eliminated / 2**20:.2f} MiB)")
        split = self.split_gemm_blocks
        notes: Dict[str, List[str]] = {}
        for n, f in fused.items():
            block = split.get(tuple(f.shape))
            lines.append(f"  {n} {tuple(f.shape)} ({f.gradient_bytes:,} B)" + (
                f", split-GEMM: ≤ {block:,} B of it live at a time" if block else "") + (
                f", its new value read later in the step by {f.read_after_update} node(s), "
                "after the fused update" if f.read_after_update else "") + (
                ", its norm (clip_grad_norm_) from dY and X: one more GEMM, dY and X held "
                "until the clip's scale" if f.norm_from_operands else "") + (
                ", differs from eager: see below" if f.precision_note else ""))
            if f.precision_note:
                notes.setdefault(f.precision_note, []).append(n)
        for note, names in notes.items():
            lines.append(f"differs from eager by design, {len(names)} parameter(s) ({names[0]}"
                         f"{', ...' if len(names) > 1 else ''}): {note}")
        if split:
            lines.append(f"split-GEMM mode (cuBLAS GEMM per block of rows + the epilogue kernel, "
                         f"chosen by the autotuner): at most {max(split.values()):,} B of one "
                         f"gradient live at a time; FORGE_SPLIT_GEMM_MB=0 keeps it to a tile")
        copies = sum(r.scalar_copies for r in self.compiles)
        if copies:
            lines.append(f"CUDA graphs: the fused updates read their per-step scalars (lr, "
                         f"1 - lr·wd, ...) on the GPU, {copies} host-to-device cop"
                         f"{'y' if copies == 1 else 'ies'} a step, outside the graphs")
        merged = sum(r.casts_merged for r in self.compiles)
        if merged:
            cast_bytes = sum(r.cast_bytes_merged for r in self.compiles)
            lines.append(f"casts merged: {merged} identical cast(s) alive together read one copy "
                         f"(autocast's bf16 input of q/k/v, gate/up), {cast_bytes:,} B "
                         f"({cast_bytes / 2**20:.2f} MiB) of copies not kept")
        ubytes = self.unfused_bytes
        lines.append(f"not fused: {len(unfused)} parameter(s), gradient bytes still materialised: "
                     f"{sum(ubytes.values()):,} ({sum(ubytes.values()) / 2**20:.2f} MiB)")
        lines += [f"  {n} ({ubytes[n]:,} B): {why}" if n in ubytes else f"  {n}: {why}"
                  for n, why in unfused.items()]
        if not fused and not unfused:
            lines.append("no optimizer update was traced in a forge graph: opt.step() ran "
                         "outside them (see the breaks above), or the step has no optimizer "
                         "step")
        return "\n".join(lines)


def explain(fn: Callable, *args, **kwargs) -> ExplainReport:
    """Compile ``fn`` with forge, run it ONCE on the arguments (one real step) and report.

    Options of forge_compile.compile can be given by passing a function made by
    ``forge_compile.compile(fn, **options)``; if that function has not compiled yet, explain()
    runs it as is, so its first call is the explained one and the step is compiled only once.
    """
    from forge_compile import compile as forge_compile_fn
    backend = getattr(fn, "_forge_backend", None)
    if backend is not None and backend.compiles == 0:
        compiled = fn
    else:
        compiled = forge_compile_fn(getattr(fn, "_forge_fn", fn),
                                    fullgraph=getattr(fn, "_forge_fullgraph", False),
                                    **getattr(fn, "_forge_options", {}))
    from forge_compile.kernels import fused_linear_update as kernels
    before = collections.Counter(counters["graph_break"])
    kernels.SPLIT_GEMM_BLOCKS.clear()
    with listen() as reports:
        result = compiled(*args, **kwargs)
    after = collections.Counter(counters["graph_break"])
    breaks = []
    for reason, n in (after - before).items():
        breaks += [str(reason)] * n
    return ExplainReport(graph_count=len(reports), graph_breaks=breaks,
                         recompiles=sum(1 for r in reports if (r.frame_compile_id or 0) > 0),
                         compiles=reports, result=result,
                         split_gemm_blocks=dict(kernels.SPLIT_GEMM_BLOCKS))

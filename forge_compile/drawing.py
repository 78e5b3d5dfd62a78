"""Draw a rewritten graph for explain(): SVG/PNG through pydot + graphviz, DOT text otherwise."""
from __future__ import annotations

import pathlib
import shutil

import torch

__all__ = ["draw_graph", "graph_to_dot"]

_FORGE_OP = "forge_compile"


def graph_to_dot(gm: torch.fx.GraphModule) -> str:
    """A DOT description of ``gm``'s graph; forge's fused ops are filled, so they stand out."""
    lines = ["digraph forge {", "  rankdir=TB;", '  node [shape=box, fontsize=10];']
    for n in gm.graph.nodes:
        label = n.name if n.op in ("placeholder", "output") else f"{n.name}\\n{n.target}"
        label = label.replace('"', "'")
        style = ', style=filled, fillcolor="#f4a261"' if _FORGE_OP in str(n.target) else ""
        shape = ", shape=ellipse" if n.op in ("placeholder", "output") else ""
        lines.append(f'  "{n.name}" [label="{label}"{shape}{style}];')
        for a in n.all_input_nodes:
            lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_graph(gm: torch.fx.GraphModule, path) -> pathlib.Path:
    """Write ``gm`` to ``path``: .svg/.png rendered when pydot and graphviz's ``dot`` are
    installed; otherwise (or for any other suffix) DOT text at ``path`` with suffix .dot."""
    path = pathlib.Path(path)
    dot = graph_to_dot(gm)
    if path.suffix in (".svg", ".png") and shutil.which("dot"):
        try:
            import pydot
        except ImportError:
            pydot = None
        if pydot is not None:
            (graph,) = pydot.graph_from_dot_data(dot)
            getattr(graph, f"write_{path.suffix[1:]}")(str(path))
            return path
    out = path.with_suffix(".dot")
    out.write_text(dot)
    return out

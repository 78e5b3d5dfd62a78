"""The ``forge`` Dynamo backend: Dynamo graph -> AOTAutograd -> forge passes -> inner compiler.

Registered under the name ``forge`` through the ``torch_dynamo_backends`` entry point
(pyproject.toml), so ``torch.compile(step, backend="forge")`` works without importing
forge_compile. Importing this module installs the capture patches (forge_compile.capture),
which act only on frames compiled by this backend.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Dict, List, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.weak import WeakIdKeyDictionary

from forge_compile import capture
from forge_compile.kernels import fused_linear_update as fused_linear_update_kernels
from forge_compile.context import (CompileReport, ForgeOptions, PassContext,
                                   current_reports)

log = logging.getLogger("forge_compile")

__all__ = ["ForgeBackend", "forge_backend"]

capture.install()


def _source_name(node: torch.fx.Node) -> Optional[str]:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return None
    name = src.name
    return name() if callable(name) else name   # a method in older torch, a property in newer


# A module attribute path as Dynamo writes its source: ``._modules['0']``, or
# ``.__dict__['_modules']['0']`` where the module is traced unspecialised (e.g. a step that calls
# ``model.train()``), the same for ``_parameters``/``_buffers``, or a plain ``.name``.
_MODULE_PATH = re.compile(r"\.(?:__dict__\[')?_modules(?:'\])?\['([^']+)'\]"
                          r"|\.(?:__dict__\[')?_(?:parameters|buffers)(?:'\])?\['([^']+)'\]"
                          r"|\.([A-Za-z_]\w*)")
_ROOT = re.compile(r"^(?:L|G)\['([^']+)'\]")


def pretty_name(source: Optional[str]) -> Optional[str]:
    """``L['model']._modules['0']._parameters['weight']`` -> ``0.weight`` (module path)."""
    if source is None:
        return None
    m = _ROOT.match(source)
    if m is None:
        return source
    rest = source[m.end():]
    parts = []
    pos = 0
    for t in _MODULE_PATH.finditer(rest):
        if t.start() != pos:       # something that is not a plain attribute/module path
            return source
        parts.append(next(g for g in t.groups() if g is not None))
        pos = t.end()
    if pos != len(rest) or not parts:
        return source
    if parts[0] in ("self",):
        parts = parts[1:]
    return ".".join(parts)


def _parameter_name(source: Optional[str]) -> Optional[str]:
    """A parameter's module path, or, where its source is no plain path, the source without
    brackets: the pass tells parameters from optimizer state and other inputs by the brackets
    (``opt.state[...]``, ``L['x']``), so a parameter must never keep them, or it would be skipped
    without a word."""
    name = pretty_name(source)
    if name is None or "[" not in name:
        return name
    return re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", name).replace("..", ".").lstrip(".")


# parameter -> the module path a forge graph named it by, held weakly (an entry goes with its
# parameter): a later graph that gets the parameter only through opt.param_groups names it so
_PARAM_NAMES = WeakIdKeyDictionary()


def graph_input_names(gm: torch.fx.GraphModule, example_inputs: List[Any]) -> List[Optional[str]]:
    """User-facing name of each input of the ATen graph AOTAutograd makes from ``gm``.

    AOTAutograd lifts the GraphModule's own parameters and buffers (Dynamo keeps optimizer state
    there, as attributes) in front of the Dynamo placeholders (aot_module_simplified:
    ``params_flat + args``). Parameters are named by module path, optimizer state as
    ``opt.state[<param>].<key>``, anything else by its Dynamo source."""
    names: List[Optional[str]] = []
    by_id = {}
    for node, ex in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        src = _source_name(node)
        name = _parameter_name(src) if isinstance(ex, torch.nn.Parameter) else src
        names.append(name)
        if isinstance(ex, torch.Tensor):
            by_id[id(ex)] = name
        if isinstance(ex, torch.nn.Parameter) and name is not None:
            _PARAM_NAMES[ex] = name
    attrs = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    # parameters lifted as attributes (they reach the frame only through opt.param_groups, e.g.
    # an optimizer-only graph after a graph break) take the name an earlier graph gave them
    # (or, where none did, their place in the optimizer, "param_groups.0.params.1")
    for t in attrs.values():
        if isinstance(t, torch.nn.Parameter) and id(t) not in by_id:
            name = _PARAM_NAMES.get(t) or capture.group_name(t)
            if name is not None:
                by_id[id(t)] = name
    lifted: List[Optional[str]] = []
    for attr, t in attrs.items():
        owner = capture.state_owner(t)
        if owner is not None and id(owner[0]) in by_id:
            lifted.append(f"opt.state[{by_id[id(owner[0])]}].{owner[1]}")
        else:
            lifted.append(by_id.get(id(t), attr))
    return lifted + names


class ForgePostGradPass(CustomGraphPass):
    """Runs forge_compile.passes.run_passes inside Inductor's post_grad_custom_pre_pass."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx

    def __call__(self, graph: torch.fx.Graph) -> None:
        _run_forge_passes(graph.owning_module, self.ctx)

    def uuid(self) -> Any:
        # Changes whenever forge's pass code changes, so Inductor's FX graph cache never serves
        # a graph compiled by older passes (a cache hit skips the pass entirely).
        import pathlib
        import forge_compile.passes as passes
        from forge_compile import patterns
        files = sorted(pathlib.Path(passes.__file__).parent.glob("*.py"))
        files += [pathlib.Path(patterns.__file__), pathlib.Path(__file__)]
        # user-registered rules change the rewrite without changing any file
        return (get_hash_for_files(tuple(files)), patterns.cache_key(), repr(self.ctx.options))


def _run_forge_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    from forge_compile.passes import run_passes
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(ctx.input_names):
        log.debug("forge_compile: %d ATen inputs vs %d Dynamo inputs; names unavailable",
                  len(placeholders), len(ctx.input_names))
        ctx.input_names = [None] * len(placeholders)
    ctx.report.graph_before = str(gm.graph)
    gm = run_passes(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    ctx.report.graph_after = str(gm.graph)
    ctx.report.graph_module_after = gm
    return gm


def inductor_mode_patches(mode: Optional[str], inner: str) -> Dict[str, Any]:
    """Inductor's config for a torch.compile ``mode`` (torch._inductor.list_mode_options), e.g.
    {"triton.cudagraphs": True} for "reduce-overhead"; a mode forge cannot honour fails fast."""
    from torch._inductor import list_mode_options
    if mode in (None, "default"):
        return {}
    modes = [m for m in list_mode_options() if m != "default"]
    if mode not in modes:
        raise ValueError(f"forge_compile: unknown mode {mode!r}; use one of "
                         f"{', '.join(map(repr, modes))}, or drop mode=")
    if inner != "inductor":
        raise ValueError(f"forge_compile: mode={mode!r} is an Inductor mode and inner={inner!r} "
                         f"compiles without Inductor; drop mode= or use inner='inductor'")
    patches = dict(list_mode_options(mode))
    if patches.get("use_post_grad_passes") is False:
        # "lite" (torch 2.13): the rewrite is a post-grad pass, so it would silently not run
        raise ValueError(f"forge_compile: mode={mode!r} turns off Inductor's post-grad passes, "
                         f"where forge's rewrite runs; drop mode= or use 'max-autotune-no-cudagraphs'")
    return patches


def _cudagraphs(mode_patches: Dict[str, Any], example_inputs: List[Any]) -> bool:
    """Will Inductor replay this graph from CUDA graphs? Its mode or its global config says so,
    and the graph runs on CUDA (Inductor does not graph CPU code)."""
    import torch._inductor.config as inductor_config
    wanted = mode_patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs)
    return bool(wanted) and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


# logged once per backend: a graph whose outputs require grad and that holds no optimizer update
# is a forward whose backward runs outside it (torch.compile(model, backend="forge"), or HF
# Trainer's torch_compile_backend="forge", which compiles the model): nothing can be fused
FORWARD_ONLY = ("a graph that returns tensors requiring grad and holds no optimizer update: "
                "its backward and opt.step() run outside it, so none of its weight gradients "
                "can be fused. A compiled model (torch.compile(model, backend='forge'), or "
                "Hugging Face Trainer's torch_compile_backend='forge') is the forward only: "
                "compile the whole training step instead (forward, loss.backward(), "
                "opt.step(), opt.zero_grad()); a step split by a graph break: see the break")


def _returns_grad_requiring(gm: torch.fx.GraphModule) -> bool:
    """Whether a Dynamo graph returns a tensor that requires grad (its backward runs later)."""
    outs: List[torch.fx.Node] = []
    for n in gm.graph.find_nodes(op="output"):
        torch.fx.node.map_arg(n.args, outs.append)
    return any(getattr(n.meta.get("example_value"), "requires_grad", False) for n in outs)


class ForgeBackend:
    """The forge compiler function: ``backend(gm, example_inputs, **torch_compile_kwargs)``."""

    _forge_backend = True     # how forge_compile.capture recognises frames compiled by forge

    def __init__(self, options: ForgeOptions = ForgeOptions()):
        self.options = options
        self.__name__ = "forge"
        self.compiles = 0
        self._warned_forward_only = False

    def __repr__(self) -> str:
        return f"ForgeBackend({self.options})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: List[Any], **kwargs) -> Any:
        options = self.options
        user = dict(kwargs.pop("options", None) or {})
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise TypeError(f"forge_compile: unexpected arguments {sorted(kwargs)}")
        fused_linear_update_kernels.check_env()
        if user:
            options = ForgeOptions.from_kwargs(**{**dataclasses.asdict(options), **user})
        mode_patches = inductor_mode_patches(mode, options.inner)
        self.compiles += 1
        cid = torch._guards.CompileContext.current_compile_id()
        report = CompileReport(graph_index=self.compiles,
                               frame_compile_id=getattr(cid, "frame_compile_id", None))
        report.input_names = graph_input_names(gm, example_inputs)
        report.detached_outputs = capture.detached_outputs()
        ctx = PassContext(options=options, input_names=list(report.input_names), report=report,
                          cudagraphs=(options.inner == "inductor"
                                      and _cudagraphs(mode_patches, example_inputs)))
        log.info("forge_compile: compiling graph %d (%d inputs, fuse=%s, inner=%s)",
                 self.compiles, len(example_inputs), options.fuse, options.inner)
        with capture.forge_compiling():
            if options.inner == "inductor":
                compiled = self._inductor(gm, example_inputs, ctx, mode_patches)
            else:
                compiled = self._aot_eager(gm, example_inputs, ctx)
        if (options.fuse and not report.fused and not report.unfused
                and _returns_grad_requiring(gm) and not self._warned_forward_only):
            self._warned_forward_only = True
            log.warning("forge_compile: %s", FORWARD_ONLY)
        # Reported only once compiled: Dynamo may abandon an attempt and trace again (e.g. a
        # TensorifyScalarRestartAnalysis raised from inside AOTAutograd).
        for listener in current_reports():
            listener.append(report)
        return compiled

    @staticmethod
    def _inductor(gm, example_inputs, ctx: PassContext, mode_patches: Dict[str, Any]):
        import contextlib
        import torch._functorch.config as functorch_config
        from torch._inductor.compile_fx import compile_fx
        # reorder_for_locality (Inductor, inference graphs: the one forward-loss-backward-step
        # graph is one) sinks every producer to just before its first reader; here that moves
        # each weight-gradient GEMM and norm-weight reduction to the optimizer at the end of the
        # graph and keeps their activations alive through the whole backward (2-layer h2048
        # Llama, 1×256 + checkpointing, CPU graph: activations still live at the optimizer).
        patches = {**mode_patches, "reorder_for_locality": False}
        cache_off = contextlib.nullcontext()
        if ctx.options.fuse:
            patches["post_grad_custom_pre_pass"] = ForgePostGradPass(ctx)
            # A hit in Inductor's FX graph cache or AOTAutograd's cache restores the fused code
            # without running the pass, so explain() and the log would report nothing: compile
            # afresh (measured on the CPU example: compile + first step 5.0 s from the cache, 36-52 s
            # without it, 2-core machine, torch 2.13).
            patches["fx_graph_cache"] = False
            if hasattr(functorch_config, "enable_autograd_cache"):
                cache_off = functorch_config.patch(enable_autograd_cache=False)
        with cache_off:
            return compile_fx(gm, example_inputs, config_patches=patches)

    @staticmethod
    def _aot_eager(gm, example_inputs, ctx: PassContext):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._inductor.decomposition import select_decomp_table

        # AOTAutograd compiles a backward lazily and runs it as Python: where that happens in an
        # eager backward inside a frame Dynamo executes (a step split before its backward),
        # Dynamo traced this function (two graph breaks in explain(), at GraphModule.graph and
        # make_boxed_func) and the backward graph's own forward (one more forge compile of an
        # already compiled graph). Neither is user code.
        @torch._disable_dynamo
        def inner(g: torch.fx.GraphModule, _inputs):
            if ctx.options.fuse:
                g = _run_forge_passes(g, ctx)
            forward = g.forward

            @torch._disable_dynamo
            def run(*args):
                return forward(*args)
            return make_boxed_func(run)

        # keep_inference_input_mutations: parameter/state updates stay in-graph as copy_ nodes
        # (what Inductor also sees), instead of extra outputs copied back outside the graph.
        return aot_module_simplified(gm, example_inputs, fw_compiler=inner, inference_compiler=inner,
                                     decompositions=select_decomp_table(),
                                     keep_inference_input_mutations=True)


forge_backend = ForgeBackend()

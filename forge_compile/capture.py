"""Whole-step capture: forward, loss.backward(), optimizer.step() and zero_grad() as ONE graph.

Stock Dynamo splits a training step into three graphs on purpose (graph breaks around
``Optimizer.step`` and a ``@torch._disable_dynamo`` on ``zero_grad``), and cannot trace
``loss.backward()`` unless ``trace_autograd_ops`` is on. FORGE needs the weight-gradient GEMMs
and the optimizer update in one graph, so this module patches Dynamo — at runtime, never on
disk — and ALL version-specific Dynamo patching lives here.

``torch.compile(fn, backend=...)`` wraps the backend and drops its ``backend_ctx_ctor``
(torch/__init__.py ``_TorchCompileWrapper``), so the patches cannot be switched on by a context
Dynamo enters for us. Instead they are installed once (``install()``, done on import of
forge_compile) and each one acts only while a frame compiled by the forge backend is being
traced (``forge_tracing()``); every other ``torch.compile`` in the process sees stock Dynamo.
``uninstall()`` restores every original attribute.

What is patched and why (each row is one entry of ``PATCHES``):

| target | why |
|---|---|
| ``InstructionTranslator.run`` | detect a forge frame; turn on ``trace_autograd_ops`` for its tracing only |
| ``TensorVariable.method_backward`` | (1) break the graph before a ``loss.backward()`` whose loss depends on an autograd graph built before the frame began (a graph break earlier in the step, e.g. ``loss.item()`` read before the backward, or a forward run outside the compiled step): Dynamo traces that backward as a no-op where the frame holds no leaf, no gradient at all, and the step would silently not train; the backward then runs eagerly; (2) torch 2.11 only: AOTAutograd applies the remat pass of activation checkpointing to a forward-loss-backward graph, but torch 2.11's pass finds the backward only by the annotation ``{"remat_pass_tag": "is_backward"}``, so the traced ``loss.backward()`` runs under ``fx.traceback.annotate`` with it; without it every checkpointed activation stays live (measured at 4×1024 on the 953M Llama: 20.3 GiB peak vs 14.7 eager). torch 2.13 marks traced backward nodes itself (``autograd_backward``) |
| ``TensorVariable.method_attr_grad`` / ``method_attr_requires_grad`` | return a fresh ``ConstantVariable`` where Dynamo returns its shared None/True/False: ``var_getattr`` sets the source of the result, and on the shared object that source outlived the trace (a later compile loaded ``L['model']…grad`` in a frame without ``model`` and raised an AssertionError) |
| ``OutputGraph._validate_outputs_safe_for_autograd_nodes`` | a returned tensor whose graph the traced ``loss.backward()`` consumed (``return loss``) comes back detached, with a logged line, instead of a restart that splits the step at the backward (``_detach_consumed_outputs``) |
| ``SkipFunctionVariable.call_function`` | lift the ``torch._dynamo.graph_break()`` calls in ``optim.optimizer._use_grad`` (only there); trace Adam/AdamW ``fused=True`` through ``_functional_fused_adam`` (below) where torch.optim's ``torch.compiler.disable``d ``_fused_adam`` would break the graph |
| ``OptimizerVariable.var_getattr`` | trace ``zero_grad`` (its ``@_disable_dynamo`` wrapper is unwrapped) and an LR scheduler's ``step`` wrapper (lr_scheduler.py is force-skipped) |
| ``OptimizerVariable.graph_break_if_pending_mutation`` | the pending mutation is the traced ``.grad``; handled by ``_init_group`` below |
| ``OptimizerVariable.call_method`` (``_init_group``) | run the real ``_init_group`` with zero-memory placeholder grads for params whose ``.grad`` is a traced value, so the first call already updates (else every param is skipped: a graph that never trains) and the optimizer state exists before tracing |
| ``OptimizerVariable.wrap_tensor`` | map each placeholder back to its traced gradient |
| ``LoggingLoggerVariable.call_method`` | a ``logging.Logger`` call (``logger.warning_once(...)`` in Hugging Face's loss and config code) breaks Dynamo's graph, and one in the forward split the step before the backward, so nothing was fused (HF GPT-2: ``GPT2LMHeadModel``'s loss warns about ``loss_type`` at every trace). An emitting call (``debug`` … ``critical``, ``log``, HF's ``*_once``; never a query such as ``isEnabledFor``) whose arguments are all constants (no tensor, no keyword) is deferred to the end of the graph instead, as Dynamo defers a ``reorderable_logging_functions`` call, but kept in the outermost frame's list: Dynamo drops the deferred calls of inlined functions (torch 2.13, ``debug_locals``). With constant arguments the message is the same; it comes out at the end of the step's graph |
| ``DebuggingVariable.call_function`` | a call of a ``reorderable_logging_functions`` function (``print``, once the user adds it) inside a function the step calls was silently dropped: Dynamo keeps each inlined frame's deferred calls in that frame's ``debug_locals`` and emits only the outermost frame's (torch 2.11 and 2.13). In forge frames the entry moves to the outermost frame's list |
| ``remat_using_tags_for_fwd_loss_bwd_graph_pass.has_recomputable_rng_ops`` | activation checkpointing inside the one graph refuses any op tagged ``nondeterministic_seeded`` in a recompute region, and the SDPA kernels carry that tag for their dropout even at ``dropout_p=0``; a dropout-free SDPA recomputes deterministically, so it is not counted. A real RNG op (dropout) would fail the whole compile: the checkpoint tags are dropped instead (activations kept) with a logged warning (forge compiles only) |

Two changes to the optimizer object itself, made on its first forge trace, with their reasons:
- a float ``lr`` becomes a 0-d float32 CPU tensor in ``param_groups`` (what PyTorch recommends
  for compiled optimizers under LR schedulers: schedulers ``fill_`` it in place), so an LR
  schedule never recompiles; Dynamo guards on a float's value, and a float made dynamic is
  specialised again where it reaches an ``alpha=`` argument (measured: a recompile every step).
  Not done for Adam/AdamW with foreach=True and capturable=False, which reject a tensor lr,
  nor for fused=True groups (no meta kernel for the tensor-lr fused ops).

``fused=True`` Adam/AdamW: Dynamo wraps ``optim.adam._fused_adam`` in ``torch.compiler.disable``
(eval_frame.py, "don't trace into fused optimizer"). Inlining it as is fails in AOTAutograd's
functionalisation of ``aten._fused_adamw_`` ("mutating a non-functional tensor with a functional
tensor is not allowed"): the culprit is the EMPTY ``max_exp_avg_sqs`` list (amsgrad=False), a
mutable ``Tensor(e!)[]`` argument that functionalisation counts as non-functional because an empty
list holds no functional tensor (reproduced with ``make_fx(functionalize(f))`` and no Dynamo: the
same call with amsgrad=True and a non-empty list functionalises fine). So while forge traces, the
call is redirected to ``_functional_fused_adam``: the same per-(device, dtype) grouping and step
increment, then the out-of-place ``aten._fused_adam(w)`` (same kernel, same math) and explicit
``copy_`` back into params and state. Its fake kernel exists, and it is the node
``passes.decompose_fused_optimizers`` rewrites for fusion. Only with a float lr
(``_fused_adamw.tensor_lr`` has no meta kernel, so fused groups keep a float lr, see below),
differentiable=False, no grad_scale/found_inf (AMP), and torch.optim's own signature (checked);
otherwise the stock graph break.

The step counters stay float32 0-d tensors, so bias corrections are float32 tensor math in the
graph where eager uses Python doubles from ``step.item()``: the same deviation as stock
``torch.compile`` of ``opt.step()`` (RAdam: ~2.5e-4 relative after 20 steps, its rectification
term cancels catastrophically near step 6; Adam: ~5e-6). Widening the counters to float64 would
remove it, but stock torch 2.13 then drops the ``step += 1`` mutation of a float64 0-d CPU state
tensor (reproduced with ``torch.compile(opt.step, backend="aot_eager")`` on RMSprop).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Callable, Dict, List, Optional

import torch
import torch._dynamo
import torch.optim.optimizer as _optim_mod
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger("forge_compile")

__all__ = ["install", "uninstall", "installed", "forge_tracing", "is_forge_tracing",
           "is_forge_backend", "PATCHES"]


_tls = threading.local()


@contextlib.contextmanager
def _counted(attr: str):
    setattr(_tls, attr, getattr(_tls, attr, 0) + 1)
    try:
        yield
    finally:
        setattr(_tls, attr, getattr(_tls, attr) - 1)


def is_forge_tracing() -> bool:
    """True while Dynamo traces a frame compiled by the forge backend."""
    return getattr(_tls, "tracing", 0) > 0


@contextlib.contextmanager
def forge_tracing():
    """Switch the forge behaviour of the patched Dynamo on for the enclosed tracing."""
    with _counted("tracing"), torch._dynamo.config.patch(trace_autograd_ops=True):
        yield


def is_forge_backend(fn: Any) -> bool:
    """Whether a (possibly wrapped) Dynamo compiler function is the forge backend."""
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if getattr(fn, "_forge_backend", False):
            return True
        # wrap_backend_debug / ConvertFrame: _torchdynamo_orig_backend; torch.compile's
        # _TorchCompileWrapper: compiler_fn; functools wrappers: __wrapped__ / func.
        fn = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
              or getattr(fn, "__wrapped__", None) or getattr(fn, "func", None))
    return False


# --------------------------------------------------------------------------------------------
# The patches. Each is (owner object, attribute name, factory(original) -> replacement, why).
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Patch:
    owner: Any
    name: str
    make: Callable[[Callable], Callable]
    why: str
    original: Optional[Callable] = None


def is_forge_compiling() -> bool:
    """True while the forge backend compiles a captured graph (AOTAutograd + inner compiler)."""
    return getattr(_tls, "compiling", 0) > 0


def forge_compiling():
    """Mark the enclosed AOTAutograd + inner compile as forge's (see is_forge_compiling)."""
    return _counted("compiling")


def _dynamo_modules():
    from torch._dynamo import symbolic_convert
    from torch._dynamo.variables import builder, functions, optimizer
    return symbolic_convert, builder, functions, optimizer


# code object of optim.optimizer._use_grad_for_differentiable.<locals>._use_grad
_USE_GRAD_CODE = _optim_mod._use_grad_for_differentiable(lambda self: None).__code__


def _make_run(orig):
    def run(self):
        if is_forge_backend(getattr(self.output, "compiler_fn", None)):
            _tls.detached = []
            with forge_tracing():
                return orig(self)
        return orig(self)
    return run


def _make_skip_call(orig):
    def call_function(self, tx, args, kwargs):
        if (is_forge_tracing() and self.value is torch._dynamo.graph_break
                and tx.f_code is _USE_GRAD_CODE):
            from torch._dynamo.variables.constant import ConstantVariable
            return ConstantVariable.create(None)
        if is_forge_tracing():
            twin = _traceable_twin(self.value, kwargs)
            if twin is not None:
                from torch._dynamo.variables.functions import UserFunctionVariable
                return UserFunctionVariable(twin).call_function(tx, args, kwargs)
        return orig(self, tx, args, kwargs)
    return call_function


def _functional_fused_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                           grad_scale, found_inf, *, amsgrad, has_complex, beta1, beta2, lr,
                           weight_decay, eps, maximize, capturable, differentiable,
                           decoupled_weight_decay):
    """``torch.optim.adam._fused_adam`` (torch 2.13, float lr) with the out-of-place
    ``aten._fused_adam(w)`` op and explicit copies back, instead of the in-place
    ``_fused_adam(w)_``: same kernel, same results; traced only while forge traces."""
    if not params:
        return
    op = torch.ops.aten._fused_adamw.default if decoupled_weight_decay \
        else torch.ops.aten._fused_adam.default
    groups: Dict[Any, List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, _), idx in groups.items():
        d_params = [params[i] for i in idx]
        d_exp_avgs = [exp_avgs[i] for i in idx]
        d_exp_avg_sqs = [exp_avg_sqs[i] for i in idx]
        d_max = [max_exp_avg_sqs[i] for i in idx] if amsgrad else []
        d_steps = [state_steps[i] for i in idx]
        d_scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
        d_inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
        torch._foreach_add_(d_steps, 1)
        new_p, _, new_m, new_v, new_max = op(
            d_params, [grads[i] for i in idx], d_exp_avgs, d_exp_avg_sqs, d_max, d_steps,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
            maximize=maximize, grad_scale=d_scale, found_inf=d_inf)
        for j in range(len(idx)):
            d_params[j].copy_(new_p[j])
            d_exp_avgs[j].copy_(new_m[j])
            d_exp_avg_sqs[j].copy_(new_v[j])
            if amsgrad:
                d_max[j].copy_(new_max[j])
        if d_inf is not None:
            torch._foreach_sub_(d_steps, [d_inf] * len(d_steps))


def _fused_adam_twin_ok() -> bool:
    import inspect
    from torch.optim import adam
    orig = getattr(adam._fused_adam, "_torchdynamo_orig_callable", adam._fused_adam)
    try:
        return (list(inspect.signature(orig).parameters)
                == list(inspect.signature(_functional_fused_adam).parameters))
    except (TypeError, ValueError):
        return False


def _traceable_twin(fn: Any, kwargs: Dict[str, Any]) -> Optional[Callable]:
    """The function to trace in place of a ``torch.compiler.disable``d torch.optim fused step,
    or None (then the stock graph break). Only Adam/AdamW, with a float lr, differentiable=False
    and no grad_scale/found_inf, and only where its signature is the one mirrored here."""
    import inspect
    if not inspect.getattr_static(fn, "_torchdynamo_disable", False):
        return None
    from torch.optim import adam
    if getattr(fn, "_torchdynamo_orig_callable", None) is not getattr(
            adam._fused_adam, "_torchdynamo_orig_callable", adam._fused_adam):
        return None
    lr, diff = kwargs.get("lr"), kwargs.get("differentiable")
    if not (lr is not None and lr.is_python_constant()
            and isinstance(lr.as_python_constant(), (int, float))):
        return None
    if diff is None or not diff.is_python_constant() or diff.as_python_constant():
        return None
    for name in ("grad_scale", "found_inf"):       # AMP's GradScaler: untested here, stock break
        v = kwargs.get(name)
        if v is not None and not (v.is_python_constant() and v.as_python_constant() is None):
            return None
    return _functional_fused_adam if _fused_adam_twin_ok() else None


def _make_var_getattr(orig):
    def var_getattr(self, tx, name):
        if is_forge_tracing() and name == "step":
            # An LR scheduler replaces opt.step by a wrapper defined in lr_scheduler.py, a file
            # Dynamo force-skips (graph break). The wrapper only sets opt._opt_called = True
            # (read once, by the scheduler's first step, to warn about call order): do that
            # here and trace the wrapped step itself.
            bound = self.value.__dict__.get("step")
            if bound is not None and getattr(bound, "_wrapped_by_lr_sched", False):
                from torch._dynamo.variables.functions import UserMethodVariable
                self.value._opt_called = True
                return UserMethodVariable(bound.__wrapped__, self)
        if is_forge_tracing() and name == "param_groups":
            _break_if_used_before_backward(self, tx)
            _tensorize_lr(self.value)
        if is_forge_tracing() and name == "zero_grad":
            fn = type(self.value).zero_grad
            inner = getattr(fn, "__wrapped__", None)
            if inner is not None and fn is torch.optim.Optimizer.zero_grad:
                if _used_before_backward(self, tx):
                    # stock Dynamo breaks the graph at the call and zero_grad runs eagerly. The
                    # traced inner function would break inside it instead (at param_groups,
                    # below), where Dynamo cannot rebuild the call: it gave up on the whole
                    # frame, and once failed with an AssertionError
                    log.warning(USED_BEFORE_BACKWARD)
                    return orig(self, tx, name)
                from torch._dynamo.variables.functions import UserMethodVariable
                return UserMethodVariable(inner, self)
        return orig(self, tx, name)
    return var_getattr


USED_BEFORE_BACKWARD = (
    "forge: the optimizer was used before the backward of the step (e.g. opt.zero_grad() at "
    "the top). Call opt.zero_grad() after opt.step(), at the end of the step, to get one fused "
    "graph")


SPLIT_BEFORE_BACKWARD = (
    "forge: loss.backward() reaches an autograd graph built before this graph (a graph break "
    "before the backward, see explain().graph_breaks, e.g. loss.item() read there; or a "
    "forward run outside the compiled step), so the weight-gradient GEMMs are not in this graph "
    "and no update can be fused; the backward runs eagerly. Move the forward and the backward "
    "into one compiled step, with nothing that breaks the graph between them (a loss.item() "
    "the step only returns: torch._dynamo.config.capture_scalar_outputs = True traces it; "
    "print(loss) or print(f'{loss:.4f}'): torch._dynamo.config.reorderable_logging_functions"
    ".add(print) defers the print to the end of the step)")


DISTRIBUTED_NOTE = (
    "torch.distributed is initialized: under DistributedDataParallel or FSDP the model's "
    "forward breaks Dynamo's graph (DDP's forward is on Dynamo's skip list, FSDP's hooks are "
    "dynamo-disabled) and every gradient is reduced across ranks before opt.step() (DDP "
    "all-reduces, FSDP reduce-scatters), so each gradient must exist as a tensor and none can "
    "be fused; the step computes what the eager data-parallel step computes")


def distributed_note() -> str:
    """DISTRIBUTED_NOTE where torch.distributed is initialized (a data-parallel step: its
    gradients are reduced across ranks, so a backward outside forge's graph is expected), else
    an empty string."""
    dist = torch.distributed
    return DISTRIBUTED_NOTE if dist.is_available() and dist.is_initialized() else ""


def _break_if_used_before_backward(self, tx) -> None:
    # Stock Dynamo bug (torch 2.13, also with backend="eager"): touching opt.param_groups before
    # the forward marks the parameters static, they become graph constants, and loss.backward()
    # then silently computes nothing. Break the graph here instead: the optimizer call runs
    # eagerly, the rest of the step is traced in a new frame, and the result equals eager.
    if not _used_before_backward(self, tx):
        return
    _break_for(USED_BEFORE_BACKWARD, "forge: optimizer used before backward",
               "call opt.zero_grad(set_to_none=True) after opt.step()", type(self.value).__name__)


def _used_before_backward(self, tx) -> bool:
    """The optimizer is used with no gradient traced in this frame and none from earlier calls
    (gradients accumulated across calls leave nothing to trace, which is fine)."""
    if _pending_grads(self, tx):
        return False
    return not any(p.grad is not None for g in self.value.param_groups for p in g["params"])


def _break_for(why: str, gb: str, hint: str, context: str = "") -> None:
    """Log ``why`` and break the graph here (the rest runs eagerly, then in a new frame)."""
    log.warning(why)
    from torch._dynamo import exc
    try:
        exc.unimplemented(gb_type=gb, context=context, explanation=why, hints=[hint])
    except TypeError:     # an older unimplemented(msg) signature
        raise exc.Unsupported(why)


def _rejects_tensor_lr(opt: torch.optim.Optimizer, group: dict) -> Optional[str]:
    """Why this group's lr must stay a float, or None."""
    if group.get("fused"):
        # aten::_fused_adamw_.tensor_lr and its siblings have no fake (meta) kernel in torch 2.13
        return "fused=True (the tensor-lr fused kernels cannot be traced)"
    # torch.optim.adam: "lr as a Tensor is not supported for capturable=False and foreach=True"
    if not isinstance(opt, torch.optim.Adam) or group.get("capturable", False):
        return None
    # Dynamo itself turns capturable on for a fresh optimizer whose params are all on an
    # accelerator (OptimizerVariable._set_capturable), right after this check runs.
    if all((p.is_cuda or p.is_xpu) and p not in opt.state for p in group["params"]):
        return None
    foreach = group.get("foreach")
    if foreach is None:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        _, foreach = _default_to_fused_or_foreach(list(group["params"]), False, use_fused=False)
    return "foreach=True and capturable=False" if foreach else None


def _tensorize_lr(opt: torch.optim.Optimizer) -> None:
    """Float lr -> 0-d tensor (see the module docstring); done once per optimizer."""
    for group in opt.param_groups:
        lr = group.get("lr")
        if not isinstance(lr, float) or not group["params"]:
            continue
        why = _rejects_tensor_lr(opt, group)
        if why:
            log.warning("forge_compile: %s with %s keeps a float lr; an LR schedule recompiles "
                        "the step for each new lr (use foreach=False, or capturable=True, to "
                        "avoid that)", type(opt).__name__, why)
            continue
        group["lr"] = torch.tensor(lr, dtype=torch.float32)


def _make_pending(orig):
    def graph_break_if_pending_mutation(self, tx):
        if is_forge_tracing():
            return None
        return orig(self, tx)
    return graph_break_if_pending_mutation


# id(placeholder tensor) -> the traced gradient VariableTracker it stands for, for the length of
# one _init_group call (the call's own list keeps each placeholder alive, so no other tensor can
# take its id meanwhile). Entries go when the call ends, also when the trace raises: one left
# behind would hand a later trace a stale VariableTracker for a tensor that reused the id.
_PLACEHOLDERS: Dict[int, Any] = {}


def _pending_grads(self, tx) -> Dict[torch.Tensor, Any]:
    """Params whose ``.grad`` was assigned inside the traced frame -> traced value (or None)."""
    se = tx.output.side_effects
    pending = {}
    for g in self.value.param_groups:
        for p in g["params"]:
            var = se.id_to_variable.get(id(p), None)
            if var is not None and se.has_pending_mutation_of_attr(var, "grad"):
                vt = se.load_attr(var, "grad")
                pending[p] = vt if vt.is_tensor() else None
    return pending


# optimizer state tensor -> (weakref to its parameter, state key), held weakly (an entry goes with
# its tensor): lets the backend name the state tensors Dynamo lifts as graph attributes
# ("opt.state[w].exp_avg").
_STATE_OWNERS = WeakIdKeyDictionary()


# parameter -> "param_groups.<i>.params.<j>", its place in the optimizer, held weakly: the name
# of last resort, for a graph that reaches a parameter only through the optimizer when no forge
# graph saw its module path (the forward and backward ran eagerly)
_GROUP_NAMES = WeakIdKeyDictionary()


def _record_state_owners(opt: torch.optim.Optimizer) -> None:
    import weakref
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                _STATE_OWNERS[v] = (weakref.ref(p), k)
    for i, g in enumerate(opt.param_groups):
        for j, p in enumerate(g["params"]):
            _GROUP_NAMES.setdefault(p, f"param_groups.{i}.params.{j}")


def group_name(p: torch.Tensor) -> Optional[str]:
    """``param_groups.<i>.params.<j>`` of a parameter a forge trace saw in an optimizer."""
    return _GROUP_NAMES.get(p)


def state_owner(t: torch.Tensor):
    """(parameter, state key) of an optimizer state tensor seen by a forge trace, else None."""
    entry = _STATE_OWNERS.get(t)
    p = None if entry is None else entry[0]()
    return None if p is None else (p, entry[1])


def _prefill_sgd_momentum(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> None:
    # SGD creates momentum_buffer = clone(grad) inside its first step: a state change that makes
    # Dynamo recompile on call 2. With dampening == 0 a zero buffer gives exactly the same first
    # update (0 * momentum + grad == grad), so the buffer is created here, before tracing, and
    # the first compiled graph is already the steady-state one.
    if not isinstance(opt, torch.optim.SGD):
        return
    for g in opt.param_groups:
        if g.get("momentum", 0) == 0 or g.get("dampening", 0) != 0:
            continue
        for p in g["params"]:
            if any(p is q for q in params) and opt.state[p].get("momentum_buffer") is None:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)


def _make_call_method(orig):
    def call_method(self, tx, name, args, kwargs):
        if not (is_forge_tracing() and name == "_init_group" and hasattr(self.value, "_init_group")):
            return orig(self, tx, name, args, kwargs)
        from torch._dynamo.variables import optimizer as ovars
        from torch._dynamo.variables.constant import ConstantVariable
        pending = _pending_grads(self, tx)
        placeholders = []
        try:
            self.move_step_if_cpu()
            py_args, py_kwargs = self.get_python_args(*args, **kwargs)
            saved = {p: p.grad for p in pending}
            try:
                for p, vt in pending.items():
                    if vt is None:        # traced value is None: _init_group must skip p
                        p.grad = None
                        continue
                    # A stride-0 view of one element: no memory, right shape/dtype/device.
                    ph = torch.empty((), dtype=p.dtype, device=p.device).expand_as(p)
                    p.grad = ph
                    placeholders.append(ph)
                    _PLACEHOLDERS[id(ph)] = vt
                _prefill_sgd_momentum(self.value, [p for p, vt in pending.items() if vt is not None])
                ret_val = self.value._init_group(*py_args, **py_kwargs)
                _record_state_owners(self.value)
            finally:
                for p, g0 in saved.items():
                    p.grad = g0           # real state back before guards are installed
            self.map_sources_and_install_guards(tx)
            self.update_list_args(tx, args, kwargs, py_args, py_kwargs)
            tx.store_global_weakref_by_id(f"__optimizer_{id(self.value)}", self.value)
            self.create_finalizer(tx)
            return ConstantVariable.create(ret_val)
        except (ovars.ArgMappingException, ovars.GuardInstallException):
            return orig(self, tx, name, args, kwargs)
        finally:
            for ph in placeholders:       # also when the trace raised (a restart, a break)
                _PLACEHOLDERS.pop(id(ph), None)
    return call_method


def _make_wrap_tensor(orig):
    def wrap_tensor(self, tx, tensor_value):
        vt = _PLACEHOLDERS.get(id(tensor_value))
        if vt is not None:
            return vt
        return orig(self, tx, tensor_value)
    return wrap_tensor


def _dropout_p(node) -> float:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return 1.0
    for i, a in enumerate(schema.arguments):
        if a.name == "dropout_p":
            v = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else a.default_value)
            return v if isinstance(v, (int, float)) else 1.0
    return 1.0


def _make_has_recomputable_rng_ops(orig):
    def has_recomputable_rng_ops(gm):
        if not is_forge_compiling():
            return orig(gm)
        from torch._functorch.partitioners import must_recompute
        rng = [node for node in gm.graph.nodes
               if must_recompute(node) and hasattr(node.target, "tags")
               and torch.Tag.nondeterministic_seeded in node.target.tags
               and not ("scaled_dot_product" in str(node.target) and _dropout_p(node) == 0)]
        if rng:
            # torch's remat pass would raise (it cannot replay RNG in a forward-loss-backward
            # graph) and fail the whole compile; instead the checkpoint tags are dropped: the
            # step runs, keeping those activations, and the log says why
            log.warning("forge_compile: activation checkpointing is ignored inside the captured "
                        "step: a checkpointed region has random ops (%s) that cannot be "
                        "recomputed there; its activations are kept",
                        ", ".join(sorted({str(n.target) for n in rng})[:3]))
            for node in gm.graph.nodes:
                if must_recompute(node):
                    node.meta["recompute"] = None
        return False
    return has_recomputable_rng_ops


# torch 2.11's remat pass finds the backward by this user annotation (its docstring: "annotate
# your backward region with fx.traceback.annotate({"remat_pass_tag": "is_backward"})"); torch 2.13
# finds it by node.meta["autograd_backward"], which its Dynamo sets on a traced autograd.grad.
_REMAT_BACKWARD_TAG = {"remat_pass_tag": "is_backward"}


RETURNED_DETACHED = (
    "forge: the step returns {names} after loss.backward() consumed its autograd graph; it is "
    "returned detached (requires_grad=False), as one fused graph needs, instead of splitting "
    "the step there (which would leave every weight unfused). Return {first}.detach() to say so")


def detached_outputs() -> List[str]:
    """The outputs the last forge trace on this thread returned detached (see
    ``_make_validate_outputs``); read by the backend for the compile's report."""
    return list(getattr(_tls, "detached", ()))


def _make_validate_outputs(orig):
    def validate(self, rv, tx):
        if is_forge_tracing():
            _tls.detached = _detach_consumed_outputs(self, rv, tx)
        return orig(self, rv, tx)
    return validate


def _detach_consumed_outputs(output, rv, tx) -> List[str]:
    """Replace, in ``rv`` (the graph's outputs), each tensor whose autograd graph the traced
    ``loss.backward()`` consumed by its ``detach()``; return their names.

    Stock Dynamo (torch 2.11 and 2.13) restarts the trace with a graph break at the backward, so
    that the returned tensor keeps a grad_fn. That splits ``return loss`` steps, the most common
    way to write one, into a forward-backward graph and an optimizer graph, and nothing can be
    fused. Eager's returned loss can only be read, not backpropagated again (its graph is freed:
    "Trying to backward through the graph a second time"), so the detached value reads the same;
    only ``requires_grad``/``grad_fn`` differ, which the log says."""
    consumed = getattr(output, "autograd_grad_consumed_grad_fns", None)
    if not consumed:
        return []
    from torch._dynamo.output_graph import collect_reachable_grad_fns
    from torch._dynamo.variables.tensor import TensorVariable
    done: Dict[int, Any] = {}
    names: List[str] = []
    for i, var in enumerate(rv):
        if id(var) in done:
            rv[i] = done[id(var)]
            continue
        if not isinstance(var, TensorVariable) or not var.requires_grad:
            continue
        fake = var.as_proxy().node.meta.get("example_value")
        if getattr(fake, "grad_fn", None) is None:
            continue
        if not collect_reachable_grad_fns([(fake, None)]) & consumed:
            continue
        names.append(str(var.source.name) if var.source else var.as_proxy().node.name)
        rv[i] = done[id(var)] = var.call_method(tx, "detach", [], {})
    if names:
        log.warning(RETURNED_DETACHED.format(names=", ".join(names), first=names[0]))
    return names


_SHARED_CONSTANTS = ("CONSTANT_VARIABLE_NONE", "CONSTANT_VARIABLE_TRUE", "CONSTANT_VARIABLE_FALSE")


def _make_fresh_constant(orig):
    def method_attr(self, tx):
        result = orig(self, tx)
        if is_forge_tracing() and _is_shared_constant(result):
            from torch._dynamo.variables.constant import ConstantVariable
            return ConstantVariable(result.value)
        return result
    return method_attr


def _is_shared_constant(v) -> bool:
    from torch._dynamo.variables import constant
    return any(v is getattr(constant, n, None) for n in _SHARED_CONSTANTS)


def _optional_constant_patches() -> List[Patch]:
    """Dynamo (torch 2.11 and 2.13) hands out one shared ConstantVariable for None, True and
    False, and ``TensorVariable.var_getattr`` sets the source of what ``p.grad`` /
    ``p.requires_grad`` returns, that shared object included: a traced ``p.grad`` read after
    ``p.grad = None`` (forge traces zero_grad and _init_group, which do both) left the
    process-wide None carrying
    ``L['model']._modules['2']._parameters['bias'].grad``. A later compile that reconstructed a
    None then loaded that source, and failed ("'model' not in cell_and_freevars") in a frame
    without it."""
    from torch._dynamo.variables import constant
    from torch._dynamo.variables.tensor import TensorVariable
    if not hasattr(constant, "CONSTANT_VARIABLE_NONE"):
        return []
    return [Patch(TensorVariable, name, _make_fresh_constant,
                  "a fresh None/True/False for p.%s: var_getattr sets its source" % name[12:])
            for name in ("method_attr_grad", "method_attr_requires_grad")
            if hasattr(TensorVariable, name)]


def _optional_output_patch() -> List[Patch]:
    from torch._dynamo import output_graph
    if not hasattr(output_graph.OutputGraph, "_validate_outputs_safe_for_autograd_nodes"):
        return []
    return [Patch(output_graph.OutputGraph, "_validate_outputs_safe_for_autograd_nodes",
                  _make_validate_outputs,
                  "return a loss whose graph backward() consumed detached, not split the step")]


def _make_method_backward(orig):
    tag = _backward_needs_remat_tag()

    def method_backward(self, tx, *args, **kwargs):
        if not is_forge_tracing():
            return orig(self, tx, *args, **kwargs)
        if _built_outside(self):
            note = distributed_note()
            _break_for(f"{SPLIT_BEFORE_BACKWARD}. {note}" if note else SPLIT_BEFORE_BACKWARD,
                       "forge: backward of a graph built outside",
                       "compile forward and backward in one step, no graph break between them")
        if not tag:
            return orig(self, tx, *args, **kwargs)
        # Every node Dynamo creates for loss.backward() (the autograd.grad call and the .grad
        # accumulation) carries the tag; AOTAutograd copies a node's "custom" meta onto the ATen
        # nodes it traces from it (fx/proxy.py, preserve_node_meta), where the remat pass looks.
        with torch.fx.traceback.annotate(_REMAT_BACKWARD_TAG), torch.fx.traceback.preserve_node_meta():
            return orig(self, tx, *args, **kwargs)
    return method_backward


def _built_outside(var) -> bool:
    """Whether ``var`` (the loss) depends on a frame input with a grad_fn: part of its autograd
    graph was built before this frame began (a graph break earlier in the step, or a forward run
    outside the compiled function). Dynamo's traced backward cannot reach through it, and where
    the frame holds no leaf it traces the backward as a no-op."""
    stack, seen = [var.as_proxy().node], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if getattr(node.meta.get("example_value"), "grad_fn", None) is not None:
                return True
            continue
        stack.extend(node.all_input_nodes)
    return False


def _make_logger_call(orig):
    def call_method(self, tx, name, args, kwargs):
        if (is_forge_tracing() and not tx.export and _deferrable(name) and not kwargs
                and _all_constant(args)):
            method = getattr(self.value, name, None)
            if callable(method):
                from torch._dynamo.variables.constant import ConstantVariable
                _defer_to_root(tx, method, list(args))
                return ConstantVariable.create(None)
        return orig(self, tx, name, args, kwargs)
    return call_method


def _defer_to_root(tx, fn, args) -> None:
    """Call ``fn(*args)`` at the end of the graph: an entry of the outermost frame's
    ``debug_locals``, the list Dynamo emits after the graph (an inlined frame's own list is
    never emitted), with ``fn`` loaded from a global installed for it (the inlined frame's
    source of it may not load from the outermost frame)."""
    from torch._dynamo.source import GlobalSource
    from torch._dynamo.variables.misc import DebuggingVariable
    root = tx
    while getattr(root, "parent", None) is not None:
        root = root.parent
    glob = tx.output.install_global_by_id("forge_deferred_log", fn)
    root.debug_locals.append((DebuggingVariable(fn, source=GlobalSource(glob)), args))


def _make_debug_call(orig):
    def call_function(self, tx, args, kwargs):
        if not is_forge_tracing() or getattr(tx, "parent", None) is None:
            return orig(self, tx, args, kwargs)
        n = len(tx.debug_locals)
        out = orig(self, tx, args, kwargs)
        moved = tx.debug_locals[n:]
        del tx.debug_locals[n:]
        for var, a in moved:
            _defer_to_root(tx, var.value, a)
        return out
    return call_function


# the Logger methods that only emit and return None (HF adds warning_once/info_once); never a
# query (isEnabledFor, getEffectiveLevel: their value is used) nor exception() (it reads the
# exception being handled, which a deferred call would not see)
_DEFERRED_LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "critical",
                                   "fatal", "log"})


def _deferrable(name: str) -> bool:
    return name in _DEFERRED_LOG_METHODS or (name.endswith("_once") and not name.startswith("_"))


def _all_constant(args) -> bool:
    # a global read (logging.DEBUG, a module-level message) arrives unrealized (lazy): realized,
    # it is a constant guarded on its value
    from torch._dynamo.variables.constant import ConstantVariable
    return all(type(a.realize() if hasattr(a, "realize") else a) is ConstantVariable
               for a in args)


def _optional_logging_patches() -> List[Patch]:
    from torch._dynamo.variables import misc
    if not (hasattr(misc, "LoggingLoggerVariable") and hasattr(misc, "DebuggingVariable")):
        return []
    return [Patch(misc.LoggingLoggerVariable, "call_method", _make_logger_call,
                  "defer a logger call with constant arguments to the graph's end, not break"),
            Patch(misc.DebuggingVariable, "call_function", _make_debug_call,
                  "a reorderable logging call in an inlined function is emitted, not dropped")]


def _remat_pass():
    """torch's remat pass of a forward-loss-backward graph (a module), or None in a torch that
    has none."""
    try:
        from torch._functorch._activation_checkpointing import (
            remat_using_tags_for_fwd_loss_bwd_graph_pass as remat)
    except ImportError:
        return None
    return remat


def _optional_remat_patch() -> List[Patch]:
    remat = _remat_pass()
    if remat is None or not hasattr(remat, "has_recomputable_rng_ops"):
        return []
    return [Patch(remat, "has_recomputable_rng_ops", _make_has_recomputable_rng_ops,
                  "checkpointed dropout-free SDPA is not an RNG op")]


def _backward_needs_remat_tag() -> bool:
    """torch 2.11: its remat pass finds the traced backward only by a tag (see above)."""
    remat = _remat_pass()
    return remat is not None and not hasattr(remat, "_collect_backward_regions")


def _build_patches() -> List[Patch]:
    symbolic_convert, builder, functions, optimizer = _dynamo_modules()
    OV = optimizer.OptimizerVariable
    from torch._dynamo.variables.tensor import TensorVariable
    return (_optional_remat_patch() + _optional_output_patch() + _optional_constant_patches()
            + _optional_logging_patches() + [
        Patch(TensorVariable, "method_backward", _make_method_backward,
              "break before a backward of a loss built before the frame (Dynamo traces it as "
              "a no-op: no gradient at all)" + ("; tag the traced backward so torch 2.11's "
                                               "remat pass finds it"
                                               if _backward_needs_remat_tag() else "")),
        Patch(symbolic_convert.InstructionTranslator, "run", _make_run,
              "detect forge frames; trace_autograd_ops=True while tracing them"),
        Patch(functions.SkipFunctionVariable, "call_function", _make_skip_call,
              "lift the graph breaks of optim.optimizer._use_grad"),
        Patch(OV, "var_getattr", _make_var_getattr, "trace Optimizer.zero_grad"),
        Patch(OV, "graph_break_if_pending_mutation", _make_pending,
              "the pending .grad mutation is handled by _init_group"),
        Patch(OV, "call_method", _make_call_method,
              "_init_group with placeholder grads: first call already updates"),
        Patch(OV, "wrap_tensor", _make_wrap_tensor, "placeholder grad -> traced grad"),
    ])


PATCHES: List[Patch] = []
_lock = threading.Lock()


def installed() -> bool:
    return bool(PATCHES)


def install() -> None:
    """Install every patch (idempotent)."""
    with _lock:
        if PATCHES:
            return
        patches = _build_patches()
        for p in patches:
            p.original = p.owner.__dict__[p.name] if p.name in vars(p.owner) else getattr(p.owner, p.name)
            replacement = p.make(getattr(p.owner, p.name))
            replacement.__forge_patch__ = p.why
            setattr(p.owner, p.name, replacement)
        PATCHES.extend(patches)
        log.debug("forge_compile: installed %d Dynamo patches (torch %s)", len(patches), torch.__version__)


def uninstall() -> None:
    """Restore every patched attribute to its original."""
    with _lock:
        for p in reversed(PATCHES):
            setattr(p.owner, p.name, p.original)
        PATCHES.clear()


@contextlib.contextmanager
def patched():
    """Patches installed for the block, restored after if they were not installed before."""
    was = installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()

"""Public pattern API: teach the fused_linear_update rewrite an op it cannot lower by itself.

The rewrite turns the optimizer update of a weight into an epilogue program
(forge_compile.epilogue) by lowering every ATen op of the update region into the program's small
elementwise vocabulary. Plain ATen arithmetic is lowered by built-in rules; an op the rewrite does
not know (a custom op of yours, ``mylib::lion_step``, or an ATen op without a built-in rule) makes it
refuse the parameter with the reason ``not elementwise: <op>``. ``register_pattern`` adds a rule:

    import forge_compile

    @forge_compile.register_pattern(torch.ops.mylib.soft_sign.default)
    def _(emit, x, scale=1.0):
        # soft_sign(x) = scale * x / (1 + |x|)
        return emit("mul", emit("div", x, emit("add", emit("abs", x), 1.0)), scale)

A rule receives ``emit`` and the op's arguments with every tensor replaced by its value name in
the program (a str) and Python numbers left as they are; ``emit(op, *args)`` appends one
instruction of ``forge_compile.epilogue.OPS`` and returns the name of its result. The rule returns
the value of the op (a name, or a number). The rule must be elementwise and exact: the rewrite
trusts it (the op's output must have the shape of the weight, and it must compute what the op
computes, element by element). Rules registered by users take precedence over the built-in ones.
See docs/patterns.md.
"""
from __future__ import annotations

from typing import Callable, Dict

__all__ = ["register_pattern", "registered_patterns", "unregister_pattern", "cache_key"]

_USER_PATTERNS: Dict[object, Callable] = {}


def register_pattern(target, rule: Callable = None):
    """Register ``rule(emit, *args, **kwargs) -> value`` as the lowering of op ``target``.

    Usable as ``register_pattern(op, rule)`` or as the decorator ``@register_pattern(op)``.
    ``target`` is an OpOverload (``torch.ops.mylib.op.default``); an OpOverloadPacket registers all
    its overloads.
    """
    def deco(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"register_pattern: rule must be callable, got {fn!r}")
        _USER_PATTERNS[target] = fn
        return fn

    return deco if rule is None else deco(rule)


def unregister_pattern(target) -> None:
    """Remove the rule registered for ``target`` (no error if there is none)."""
    _USER_PATTERNS.pop(target, None)


def registered_patterns() -> Dict[object, Callable]:
    """A copy of the user-registered rules, op → rule."""
    return dict(_USER_PATTERNS)


def cache_key() -> str:
    """A string that changes whenever the registered rules change (op, rule name and code).

    A compile cache keyed without it would serve a graph rewritten before a rule was registered
    (the rewrite runs inside Inductor's post-grad pass, which an FX-graph-cache hit skips)."""
    import hashlib
    h = hashlib.sha256()
    for target, rule in sorted(_USER_PATTERNS.items(), key=lambda kv: str(kv[0])):
        code = getattr(rule, "__code__", None)
        h.update(str(target).encode())
        h.update(getattr(rule, "__qualname__", repr(rule)).encode())
        if code is not None:
            h.update(code.co_code)
            h.update(repr(code.co_consts).encode())
    return h.hexdigest()[:16]


def _lookup(target):
    rule = _USER_PATTERNS.get(target)
    if rule is None:
        packet = getattr(target, "overloadpacket", None)
        if packet is not None:
            rule = _USER_PATTERNS.get(packet)
    return rule

"""Static SASS instruction counts of a warp-specialised candidate, fp32 against bf16 W/state
(no GPU needed: a local sm_90 compile with Triton's bundled ptxas, cuobjdump -sass). Pointers,
sizes and strides are compiled as multiples of 16, as Triton's launcher specialises them.
    python scripts/sass_counts.py [--ws 9] [--vec 8] [--rule adamw] [--out FILE]
"""
import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ws", type=int, default=9, help="index into _GPU_WS_CONFIGS")
    p.add_argument("--vec", type=int, default=0, help="WS_VEC (0: the config's)")
    p.add_argument("--rule", default="adamw")
    p.add_argument("--out")
    a = p.parse_args()
    import test_fused_linear_update as T
    from forge_compile.kernels import fused_linear_update as flu
    cfg = flu._GPU_WS_CONFIGS[a.ws]
    if a.vec:
        cfg = dataclasses.replace(cfg, WS_VEC=a.vec)
    prog = T._rules()[a.rule][0]
    tool = T._bundled_tool("cuobjdump")
    lines = [f"_GPU_WS_CONFIGS[{a.ws}] = {cfg}, {a.rule}; static SASS counts, whole kernel"]
    for dt in ("fp32", "bf16model"):
        ck = T._sm90_compile(cfg, prog, dt, divisible=True)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        ops = collections.Counter(
            m.group(1) for m in re.finditer(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                            sass))
        mem = sorted((k, v) for k, v in ops.items()
                     if k.split(".")[0] in ("LDS", "STS", "LDG", "STG", "LDSM", "STSM"))
        lines += [f"{dt}: {sum(ops.values())} instructions, {T._cubin_resources(ck)}",
                  f"  memory: {mem}", f"  most: {ops.most_common(25)}"]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

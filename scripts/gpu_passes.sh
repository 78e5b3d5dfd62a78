#!/usr/bin/env bash
# Device check of the forge passes (torch 2.11): the pass/unroll tests and a subset of the e2e
# tests on CPU tensors under 2.11 (SKIP_CPU=1: not), the e2e tests marked gpu, then one CUDA step
# function (AdamW defaults: foreach=True, capturable set by Dynamo) through Inductor vs eager.
# Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/forge_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ -z "${SKIP_CPU:-}" ]; then
python3 -m pytest -q -p no:cacheprovider tests/test_fused_linear_update_pass.py tests/test_unroll_foreach.py \
  2>&1 | tee "$OUT/passes_211.log" | tail -15
python3 -m pytest -q -p no:cacheprovider tests/test_fused_linear_update_e2e.py \
  -k "mlp_matches or inductor or transformer_matches_eager[adamw] or foreach_adam or clip or autocast" \
  2>&1 | tee "$OUT/e2e_211.log" | tail -15
fi
# the GPU end-to-end tests (mode="reduce-overhead": the fused step replayed from a CUDA graph)
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused_linear_update_e2e.py \
  2>&1 | tee "$OUT/e2e_gpu.log" | tail -15
cd tests && python3 - <<'PY' 2>&1 | tee "$OUT/cuda_adamw.log" | grep -v Warn | tail -30
import copy, torch, forge_compile
import test_fused_linear_update_e2e as t
from forge_models import TinyLM, MLP
for kind, opt_name in (("mlp", "adamw"), ("lm", "adamw"), ("lm", "sgd")):
    torch.manual_seed(0)
    model = (MLP() if kind == "mlp" else TinyLM().randomize_()).cuda()
    ref = copy.deepcopy(model)
    opt, ref_opt = (t.make_optimizer(opt_name, m.parameters()) for m in (model, ref))
    loss_fn = t._mlp_loss if kind == "mlp" else t._lm_loss
    data = lambda i: tuple(x.cuda() for x in (t._mlp_data(i) if kind == "mlp" else t._lm_data(i)))
    step = forge_compile.compile(t._make_step(model, opt, loss_fn), inner="inductor")
    eager = t._make_step(ref, ref_opt, loss_fn)
    with t.listen() as reports:
        for i in range(20):
            step(*data(i)); eager(*data(i))
    fused = {k: v for r in reports for k, v in r.fused.items()}
    unfused = {k: v for r in reports for k, v in r.unfused.items() if k not in fused}
    print(kind, opt_name, len(reports), "graph(s); fused:", sorted(fused), "unfused:", unfused)
    print(kind, opt_name, "max rel err vs eager:",
          max(t._rel(p, q) for p, q in zip(model.parameters(), ref.parameters())))
PY

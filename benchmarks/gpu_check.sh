#!/usr/bin/env bash
# GPU check of racedit's CUDA backend on a fresh machine with an NVIDIA GPU, nvcc under
# /usr/local/cuda and Python 3 with pip, but no package index: every Python package comes
# from the wheels in .whl/ at the repository root (numpy, scipy, pytest and its
# dependencies, setuptools; nvidia-cublas (+ nvidia-cuda-nvrtc) for CUDA 13 or
# nvidia-cublas-cu12 for CUDA 12, needed only when the toolkit has no libcublas).
# Steps: venv, install, build in place with CUDA, the GPU tests (tests/cuda/, every test marked
# gpu), the benchmarks
# (racedit's block in fp32 / TF32 / bf16 per GEMM mode; PyTorch eager bf16 when torch has
# CUDA), the whole-model train step against PyTorch eager / torch.compile, a compute-sanitizer
# memcheck, 300 steps of `python -m racedit train --preset quick --device cuda` (images/s),
# the dense DiT-B/2 step, and an nsys kernel summary of the bf16 step when nsys is there.
# Every log goes to $OUT/. GPU_CHECK_PART=core runs everything up to the memcheck (about 7
# minutes on an H200; a torch.compile warm-up runs in the background during the tests),
# GPU_CHECK_PART=extra the dense step and the nsys profile (reusing an in-place build left by
# an earlier call on the same machine), the default both.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
PART=${GPU_CHECK_PART:-all}   # core | extra | all (see the header)
step() { echo; echo "=== $* ($(( $(date +%s) - T0 )) s)"; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build

step "machine"
nvidia-smi || echo "gpu_check: nvidia-smi failed"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
nvcc --version || { echo "gpu_check: no nvcc under $CUDA_HOME"; exit 1; }
NVCC_MAJOR=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
PY=${PY:-$(command -v python3)}
echo "python: $PY ($($PY --version 2>&1)), nvcc major $NVCC_MAJOR, wheels: $(ls .whl 2>/dev/null | tr '\n' ' ')"

if [ -d .whl ]; then
step "venv + wheels from .whl/"
rm -rf .venv-gpu
"$PY" -m venv .venv-gpu || { echo "gpu_check: venv failed"; exit 1; }
. .venv-gpu/bin/activate
PIP="python -m pip install --no-index --find-links .whl --disable-pip-version-check -q"
$PIP numpy scipy pytest setuptools 2>&1 | tee "$OUT/pip.log" || { echo "gpu_check: pip install failed"; exit 1; }
for w in safetensors pillow matplotlib tqdm; do  # the trainer's (optional here)
    $PIP "$w" >> "$OUT/pip.log" 2>&1 || echo "gpu_check: no $w wheel in .whl/"
done
if ls "$CUDA_HOME"/lib64/libcublas.so* >/dev/null 2>&1 && [ -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    echo "cuBLAS: the toolkit's ($CUDA_HOME/lib64)"
else
    CUBLAS=nvidia-cublas
    [ "$NVCC_MAJOR" = "12" ] && CUBLAS=nvidia-cublas-cu12
    echo "cuBLAS: not in the toolkit; installing the $CUBLAS wheel"
    $PIP "$CUBLAS" 2>&1 | tee -a "$OUT/pip.log" || $PIP --no-deps "$CUBLAS" 2>&1 | tee -a "$OUT/pip.log" \
        || echo "gpu_check: no $CUBLAS wheel in .whl/ (the build will say it has no cuBLAS)"
fi
else
step "no .whl/: using $PY as it is (it must have numpy, scipy, pytest, setuptools)"
"$PY" -c "import numpy, scipy, pytest, setuptools; print('numpy', numpy.__version__, 'scipy', scipy.__version__)" \
    || { echo "gpu_check: $PY lacks numpy/scipy/pytest/setuptools; provide .whl/"; exit 1; }
mkdir -p /tmp/rd-pybin   # `python` (also under timeout/compute-sanitizer) runs $PY
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > /tmp/rd-pybin/python && chmod +x /tmp/rd-pybin/python
export PATH="/tmp/rd-pybin:$PATH"
fi

if [ "$PART" = extra ] && python -c "import racedit, sys; sys.exit(0 if racedit.build_info()['cuda'] else 1)" 2>/dev/null; then
step "build: the in-place CUDA build of an earlier call is there; kept"
else
step "build (in place, with CUDA)"
rm -rf build racedit/_C*.so
python setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "racedit build|error|warning|nvcc" | head -40
fi
python -c "import racedit, json; print(json.dumps(racedit.build_info(), default=str)); print('cuda_available:', racedit.cuda_available())" \
    2>&1 | tee "$OUT/build_info.txt"
python -c "import racedit; assert racedit.build_info()['cuda'], 'built WITHOUT CUDA'" || {
    echo "gpu_check: racedit was built without CUDA; see $OUT/build.log"; exit 1; }

TEST_RC=0
if [ "$PART" != extra ]; then
WARM_PID=
if python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    step "torch.compile warm-up in the background (the timed run then starts from the inductor cache)"
    (timeout 240 python benchmarks/bench_cuda_model.py --warm-compile > "$OUT/compile_warm.log" 2>&1) &
    WARM_PID=$!
fi

step "tests (tests/cuda/, tests/test_build.py, the tests marked gpu in tests/ops, layers, train)"
timeout 200 python -m pytest -ra -q tests/cuda tests/test_build.py -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest.log"
TEST_RC=${PIPESTATUS[0]}
timeout 200 python -m pytest -ra -q -m gpu tests/ops tests/layers tests/train -p no:cacheprovider \
    2>&1 | tee -a "$OUT/pytest.log"
GPU_MARKED_RC=${PIPESTATUS[0]}
[ "$TEST_RC" -ne 0 ] || TEST_RC=$GPU_MARKED_RC

if [ -n "$WARM_PID" ]; then
    step "waiting for the torch.compile warm-up (no benchmark shares the GPU with it)"
    wait "$WARM_PID" || echo "gpu_check: the torch.compile warm-up ended with an error (see compile_warm.log)"
    tail -3 "$OUT/compile_warm.log"
fi

step "benchmark: racedit's CUDA block"
timeout 120 python benchmarks/bench_cuda_moe.py --iters 10 --strategies race,token 2>&1 | tee "$OUT/bench.log"

step "benchmark: PyTorch eager bf16 block vs racedit bf16"
timeout 90 python benchmarks/bench_cuda_torch.py --iters 10 2>&1 | tee "$OUT/bench_torch.log"

step "benchmark: RaceDiT-B/2-4in32 train step, racedit vs PyTorch eager / torch.compile"
timeout 330 python benchmarks/bench_cuda_model.py --steps 5 --compile-timeout 180 2>&1 | tee "$OUT/bench_model.log"

step "training: python -m racedit train --preset quick --device cuda --steps 300"
rm -rf /tmp/rd-train
python -c "import safetensors, PIL" 2>/dev/null || echo "gpu_check: safetensors/Pillow missing: the run stops at its checkpoint (the log is still timed)"
NOREP=$(python -c "import matplotlib" 2>/dev/null || echo --no-report)
timeout 150 python -m racedit train --preset quick --device cuda --steps 300 --no-progress \
    --results-dir /tmp/rd-train $NOREP 2>&1 | tail -20 | tee "$OUT/train_quick.log"
RUN=$(ls -d /tmp/rd-train/*/ 2>/dev/null | head -1)
if [ -n "$RUN" ] && [ -f "$RUN/log.jsonl" ]; then
    cp "$RUN/log.jsonl" "$OUT/train_quick_log.jsonl"
    cp "$RUN"/samples/*.png "$RUN"/routing_report* "$OUT/" 2>/dev/null
    python - "$RUN/log.jsonl" <<'PYEOF' 2>&1 | tee -a "$OUT/train_quick.log"
import json, sys
import numpy as np
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ips = np.array([r["images_per_s"] for r in recs[10:]])   # after 10 warm-up steps
loss = [r["loss"] for r in recs]
print(f"quick preset on cuda: {len(recs)} steps, images/s median {np.median(ips):.0f} "
      f"(p10 {np.percentile(ips, 10):.0f}, p90 {np.percentile(ips, 90):.0f}), "
      f"step {1000 * 32 / np.median(ips):.2f} ms; loss first 10 {np.mean(loss[:10]):.4f} "
      f"-> last 50 {np.mean(loss[-50:]):.4f}")
PYEOF
else
    echo "gpu_check: the quick training run wrote no log"
fi

step "compute-sanitizer memcheck on small cases (out-of-bounds / misaligned accesses)"
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
    timeout 100 "$SAN" --tool memcheck --leak-check no --error-exitcode 3 python - <<'PYEOF' 2>&1 | tail -40 | tee "$OUT/memcheck.log"
import numpy as np, racedit
from racedit import cuda as rc
rng = np.random.default_rng(0)
for shape, k in (((2, 6, 4), 2), ((4, 300, 8), 2), ((1, 4100, 3), 1)):
    x = rng.standard_normal(shape).astype(np.float32)
    for s in ("token", "expert", "bl", "be", "le", "race"):
        try:
            rc.route(x, k, s, return_tau=True)
        except ValueError:
            pass
rc.route_threshold(x, 0.1)
N, D, E, He = 37, 12, 5, 9
args = [rng.standard_normal((N, D)).astype(np.float32), rng.random((N, E)) < 0.4,
        rng.standard_normal((N, E)).astype(np.float32),
        rng.standard_normal((E, D, He)).astype(np.float32), rng.standard_normal((E, He)).astype(np.float32),
        rng.standard_normal((E, He, D)).astype(np.float32), rng.standard_normal((E, D)).astype(np.float32)]
args[1][:, 1] = False
for mode in ([0, 1, 2] if rc.info()["grouped_gemm"] else [0, 2]):
    rc.expert_gemm(mode)
    for prec in ("fp32", "bf16"):
        rc.experts_backward(rng.standard_normal((N, D)).astype(np.float32), *args, precision=prec)
        # widths divisible by 4: the vectorised row kernels
        a4 = [rng.standard_normal((N, 16)).astype(np.float32), args[1], args[2],
              rng.standard_normal((E, 16, 8)).astype(np.float32), rng.standard_normal((E, 8)).astype(np.float32),
              rng.standard_normal((E, 8, 16)).astype(np.float32), rng.standard_normal((E, 16)).astype(np.float32)]
        rc.experts_backward(rng.standard_normal((N, 16)).astype(np.float32), *a4, precision=prec)
rc.expert_gemm(0)
for g in ("identity", "sigmoid", "softmax"):
    G = rc.gate_forward(args[2], g)
    rc.gate_backward(args[2], G, g)
cpu = racedit.MoE(16, 4, 2, strategy="race")
st = rc.MoEState(16, 4, 2, hidden=cpu.hidden)
x = rng.standard_normal((2, 9, 16)).astype(np.float32)
rc.moe_forward(st, x, cpu.param_buffer)
rc.moe_backward(st, x, x, cpu.param_buffer)
rc.moe_forward(st, x, cpu.param_buffer, training=False)
st.precision = "bf16"
rc.moe_forward(st, x, cpu.param_buffer)
rc.moe_backward(st, x, x, cpu.param_buffer)
# aux losses: similarity, balance, PLR head (odd plr_dim) in training, then eval
kw = dict(plr_dim=3, sim_weight=0.1, balance_weight=0.1, plr_weight=1.0)
cpu = racedit.MoE(16, 4, 2, strategy="race", **kw)
st = rc.MoEState(16, 4, 2, hidden=cpu.hidden, **kw)
tgt = rng.standard_normal((2, 9, 3)).astype(np.float32)
rc.moe_forward(st, x, cpu.param_buffer, plr_target=tgt)
rc.moe_backward(st, x, x, cpu.param_buffer)
st.aux
rc.moe_forward(st, x, cpu.param_buffer, training=False)
st.aux
# DiT layers and the optimiser, odd sizes
z = rng.standard_normal((2, 5, 7)).astype(np.float32)
rows = rng.standard_normal((2, 9)).astype(np.float32)
out, r = rc.layernorm_forward(z.reshape(10, 7))
rc.layernorm_backward(z.reshape(10, 7), out, r, z.reshape(10, 7))
rc.modulate_backward(z, z, rows); rc.gated_residual_backward(z, z, rows)
rc.silu_backward(z, z); rc.timestep_embedding(np.arange(3, dtype=np.float32), 6)
qkv = rng.standard_normal((2, 5, 12)).astype(np.float32)
o, att = rc.attention_forward(qkv, 2)
rc.attention_backward(o, qkv, att, 2)
o, att = rc.attention_forward(qkv, 2, precision="bf16")
rc.attention_backward(o, qkv, att, 2, precision="bf16")
p = rng.standard_normal(9001).astype(np.float32)
rc.adamw_step(p, p.copy(), np.zeros_like(p), np.zeros_like(p), 1, ema=p.copy())
rc.grad_norm(p); rc.nonfinite_index(p)
# the whole model: MoE (odd grid 3x3 tokens) and dense learn_sigma, step / forward / backward / eval
for cfgname, size, ch, kw in (("RaceDiT-T/2-2in4", 6, 3, {}), ("DiT-T/2", 6, 3, {"learn_sigma": True})):
    g = racedit.RaceDiT(cfgname, input_size=size, in_channels=ch, num_classes=5, device="cuda", **kw)
    xx = rng.standard_normal((3, ch, size, size)).astype(np.float32)
    tt, yy = np.array([0, 500, 1000], np.float32), np.array([0, 1, 5])
    g.step(xx, tt, yy, xx, max_grad_norm=1.0)
    o = g.forward(xx, tt, yy, plr_target=xx)
    g.backward(o)
    g.optimizer_step(max_grad_norm=1.0)
    g.eval()
    g.forward(xx, tt, yy)
    g.branch_norms()
    g.experts_per_token_by_sample()
    g.set_dtype("bf16")
    g.train()
    g.step(xx, tt, yy, xx)
lay = racedit.MoE(16, 4, 2, plr_dim=3, sim_weight=0.1, device="cuda")
lay.backward(lay.forward(x, plr_target=tgt))
racedit._C.moe_get(lay._state, "sample_pairs")   # per-sample pair counts on the device
lay.forward(rng.standard_normal((3, 300, 16)).astype(np.float32))
racedit._C.moe_get(lay._state, "sample_pairs")
print("memcheck script done")
PYEOF
    echo "memcheck exit code ${PIPESTATUS[0]}"
else
    echo "compute-sanitizer not found; skipped"
fi

fi  # core part

if [ "$PART" != core ]; then
step "benchmark: dense DiT-B/2 train step (the same model without experts), racedit vs PyTorch eager"
timeout 120 python benchmarks/bench_cuda_model.py --config DiT-B/2 --steps 5 --no-compile 2>&1 \
    | tee "$OUT/bench_model_dense.log"

NSYS=$(command -v nsys || ls "$CUDA_HOME"/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
    step "nsys: GPU time by kernel of racedit's bf16 RaceDiT-B/2-4in32 step (3 timed steps)"
    timeout 150 "$NSYS" profile -o /tmp/rd-prof --force-overwrite true -t cuda,cublas \
        python benchmarks/bench_cuda_model.py --racedit-only bf16 --steps 3 > "$OUT/nsys_run.log" 2>&1
    timeout 60 "$NSYS" stats -r cuda_gpu_kern_sum,cuda_api_sum -f csv -o "$OUT/nsys" /tmp/rd-prof.nsys-rep \
        > "$OUT/nsys_stats.log" 2>&1 || tail -5 "$OUT/nsys_stats.log"
    head -25 "$OUT"/nsys_cuda_gpu_kern_sum.csv 2>/dev/null | cut -c1-220
else
    echo "nsys not found; no kernel profile"
fi
fi  # extra part

step "done: tests exit code $TEST_RC"
exit "$TEST_RC"

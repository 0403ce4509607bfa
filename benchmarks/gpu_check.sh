#!/usr/bin/env bash
# vgrad on a GPU, in one call: the environment, a grouped sweep, the throughput benchmark,
# the recurrent benchmark and the test suite, each under its own time limit, logs under $OUT (default
# /tmp/vgrad-gpu-check). Run from the repository root on a machine whose python3 has a
# CUDA build of JAX:
#
#     bash benchmarks/gpu_check.sh            # at most 10 minutes
#     bash benchmarks/gpu_check.sh --quick    # the bookkeeping only (any machine)
#     SECTIONS="rnn tests" bash benchmarks/gpu_check.sh   # some of: sweep bench rnn tests
#     SECTIONS="kernels noise" bash benchmarks/gpu_check.sh  # opt-in: kernels per step at
#                      # 1,000 seeds (each a launch on a GPU) and the gradient-noise probe's cost
#     SECTIONS="profile" bash benchmarks/gpu_check.sh  # opt-in: jax.profiler, device time
#                      # per kernel and by origin (forward, backward, guard, probes, ...)
#     SECTIONS="torch" bash benchmarks/gpu_check.sh  # opt-in: PyTorch on the same GPU, its
#                      # loop and torch.func.vmap over seeds (eager and torch.compile)
#
# Wheels for packages the machine lacks (Hydra, OmegaConf, ...) may be put in .whl/: they
# are installed into /tmp/site first (no network needed).
set -u
OUT=${OUT:-/tmp/vgrad-gpu-check}
mkdir -p "$OUT"
quick=0; [ "${1:-}" = "--quick" ] && quick=1
SECTIONS=${SECTIONS:-sweep bench rnn tests}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
# Several test processes share the GPU: none may take most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

echo "== environment"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform
import jax
print("python", platform.python_version(), "| backend", jax.default_backend(),
      "| devices", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "hydra", "omegaconf", "numpy", "torch"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: {e}")
EOF

if want sweep; then
echo "== grouped sweep: 12 jobs of the visualize preset, one program"
if [ $quick = 1 ]; then epochs=2; else epochs=100; fi
/usr/bin/time -f "sweep wall %e s" timeout 90 python3 -m vgrad.train -m +experiment=visualize \
  act=sigmoid,tanh,relu,elu init=normal,he_normal,glorot_uniform seeds=10 epochs=$epochs \
  progress=false hydra.sweep.dir="$OUT/sweep" 2>&1 | tee "$OUT/sweep.log" \
  | grep -E "HYDRA|Error|error" | grep -v "^\[.*\]\[HYDRA\] \s*#" | tail -6
fi

if want bench; then
echo "== benchmark: the visualize preset, S seeds in one program"
if [ $quick = 1 ]; then bench_args="--tiny"; else bench_args="--seeds 1 100 1000 --repeats 2 --torch-runs 1"; fi
timeout 150 python3 benchmarks/bench.py $bench_args --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | tail -14
fi

if want rnn; then
echo "== recurrent benchmark: adding problem T=100, tanh RNN, ||dL/dh_t|| every step"
if [ $quick = 1 ]; then rnn_args="--tiny"; else rnn_args="--seeds 1 10 100 --repeats 1 --torch-runs 1"; fi
timeout 150 python3 benchmarks/rnn_bench.py $rnn_args --json "$OUT/rnn_bench.json" 2>&1 \
  | tee "$OUT/rnn_bench.log" | tail -12
fi

if want kernels; then
echo "== kernels per compiled step: hand-written JAX, same work, default, + gradient_noise"
if [ $quick = 1 ]; then k_args="--seeds 4"; else k_args="--seeds 1000"; fi
timeout 240 python3 benchmarks/kernel_count.py $k_args 2>&1 | tee "$OUT/kernels.log" | tail -6
fi

if want profile; then
echo "== profile: where a step's device time goes, 1,000 seeds (plain, same work, default)"
if [ $quick = 1 ]; then p_args="--seeds 4 --epochs 1"; else p_args="--seeds 1000 --epochs 2"; fi
timeout 240 python3 benchmarks/gpu_profile.py $p_args --json "$OUT/profile.json" 2>&1 \
  | tee "$OUT/profile.log" | grep -A8 "^=="
fi

if want torch; then
echo "== PyTorch on the same GPU: the loop, torch.func.vmap over seeds (eager, compiled) vs vgrad"
if [ $quick = 1 ]; then
  t_check="--check"; t_args="--tiny"
else
  t_check="--check --device cuda"
  t_args="--seeds 1 100 1000 --repeats 2 --torch-runs 1 --torch-device cuda"
fi
timeout 60 python3 benchmarks/torch_vmap.py $t_check 2>&1 | tee "$OUT/torch_check.log" | tail -3
timeout 480 python3 benchmarks/bench.py $t_args --json "$OUT/bench_torch.json" 2>&1 \
  | tee "$OUT/bench_torch.log" | tail -16
fi

if want noise; then
echo "== gradient_noise and hessian probes: cost relative to the default program"
if [ $quick = 1 ]; then n_args="--tiny"; else
  n_args="--seeds 1000 --epochs 10 --hess-epochs 1 --repeats 1 --wide-seeds 100"; fi
timeout 300 python3 benchmarks/noise_bench.py $n_args --json "$OUT/noise_bench.json" 2>&1 \
  | tee "$OUT/noise_bench.log" | tail -22
fi

if want tests; then
echo "== tests"
if [ $quick = 1 ]; then sel=(tests/test_model.py); else sel=(); fi
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -n ${TEST_WORKERS:-12} -p no:cacheprovider "${sel[@]}" -rfE \
  > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
tail -25 "$OUT/tests.log"
fi

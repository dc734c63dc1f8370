#!/bin/bash
# The GPU machine's side of the benchmarks (run from the repository root there, see docs/BENCHMARKS.md).
#   bash benchmarks/gpu_run.sh tests     every GPU test, 8 processes (pytest-xdist, in the image)   (carry .device/a)
#   bash benchmarks/gpu_run.sh bench     gpu_bench.py                                      (carry .device/a)
#   bash benchmarks/gpu_run.sh lm_eval   lm_eval_runs.py: lm_eval --model mamba_ssm vs mamba_floatsim per mode (carry .device/b)
#   bash benchmarks/gpu_run.sh sweep     the bootstrap's and scoring's GPU tests, then lm_eval_runs.py: one lm_eval
#                                        run vs sweep (6 runs) vs sensitivity (26) (carry .device/c)
#                                        (sweep --resume: finishes a round the deadline cut and the --rounds left)
#   bash benchmarks/gpu_run.sh profile   lm_eval_runs.py profile: one lm_eval run and one sweep under cProfile (carry .device/c)
#   bash benchmarks/gpu_run.sh all       lm_eval_runs.py with every configuration: one lm_eval run, sweep, sensitivity,
#                                        --model mamba_ssm and mamba_floatsim per mode, each round interleaved
#                                        (carry .device/c, after a tests or bench call on the same machine, whose
#                                        /tmp/site holds mamba-ssm and causal-conv1d; `all --resume` finishes the rounds)
# .device/a holds the kit's setup.sh and mamba-ssm + causal-conv1d; .device/b setup.sh, the
# wheels and mamba-ssm (the kit's README: both kernels and the wheels exceed one call's 64 MiB);
# .device/c setup.sh and the wheels with matplotlib's added (sensitivity plots; docs/BENCHMARKS.md).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia_smi() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$out/nvidia_smi.txt"
}
# sweep's and all's rounds: $1 lm_eval_runs.py's configurations, $2 its deadline in s, then its own arguments.
# First the GPU paths of the per-evaluation work they time, the bootstrap's sums and the scoring (not again on --resume).
lm_eval_rounds() {
  nvidia_smi
  [ "$3" = --resume ] || timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_bootstrap.py tests/test_scoring.py \
    2>&1 | tee "$out/pytest_sweep.log"
  timeout 560 python3 benchmarks/lm_eval_runs.py bench --preset gpu --configs "$1" --deadline-s "$2" \
    --out "$out" "${@:3}" 2>&1 | tee "$out/lm_eval_runs.log"
}
case $1 in
  tests)
    source .device/a/setup.sh mamba_ssm causal_conv1d || exit 2
    export PYTHONPATH=$PWD:$PYTHONPATH
    tests="tests/test_kernels.py tests/test_fast_path.py tests/test_mamba.py tests/test_recorder.py"  # test_bootstrap and test_scoring need lm-eval: the sweep case runs them
    python3 -c "import hypothesis" 2>/dev/null && tests="$tests tests/test_quant.py"  # test_quant's property tests need it
    python3 -c "import xdist" 2>/dev/null && tests="-n 8 $tests"  # Triton's compilations, most of the time, in parallel
    timeout 570 python3 -m pytest -q -rfs -p no:cacheprovider -k "not interpreter" $tests "${@:2}" 2>&1 | tee "$out/pytest_gpu.log"
    ;;
  bench)
    source .device/a/setup.sh mamba_ssm causal_conv1d || exit 2
    export PYTHONPATH=$PWD:$PYTHONPATH
    nvidia_smi
    timeout 570 python3 benchmarks/gpu_bench.py --out "$out" "${@:2}" 2>&1 | tee "$out/gpu_bench.log"
    ;;
  lm_eval)
    [ -d /tmp/site/mamba_ssm ] || source .device/b/setup.sh wheels mamba_ssm || exit 2
    [ -d /tmp/site/lm_eval ] || source .device/b/setup.sh wheels || exit 2
    export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
    timeout 590 python3 benchmarks/lm_eval_runs.py bench --preset gpu --configs modes --deadline-s 540 \
      --out "$out" "${@:2}" 2>&1 | tee "$out/lm_eval_runs.log"
    ;;
  sweep)
    rm -rf /tmp/site/mamba_ssm /tmp/site/causal_conv1d  # a bench call's: the sweep's figures are without them
    [ -d /tmp/site/matplotlib ] || source .device/c/setup.sh wheels || exit 2
    export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
    python3 -c "import lm_eval, matplotlib" || { echo "gpu_run.sh sweep: lm-eval or matplotlib missing: carry .device/c"; exit 2; }
    lm_eval_rounds sweep,sensitivity 430 "${@:2}"
    ;;
  profile)
    [ -d /tmp/site/matplotlib ] || source .device/c/setup.sh wheels || exit 2
    export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
    timeout 590 python3 benchmarks/lm_eval_runs.py profile --preset gpu --configs sweep --out "$out" "${@:2}" 2>&1 | tee "$out/profile.log"
    ;;
  all)
    [ -d /tmp/site/mamba_ssm ] || source .device/a/setup.sh mamba_ssm causal_conv1d || exit 2
    [ -d /tmp/site/matplotlib ] || source .device/c/setup.sh wheels || exit 2
    export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH
    python3 -c "import lm_eval, matplotlib, mamba_ssm" || { echo "gpu_run.sh all: lm-eval, matplotlib or mamba-ssm missing: carry .device/c after a tests or bench call"; exit 2; }
    lm_eval_rounds lm_eval,sweep,sensitivity,modes 480 "${@:2}"
    ;;
  *) echo "usage: $0 tests|bench|lm_eval|sweep|profile|all [args]"; exit 2 ;;
esac

#!/usr/bin/env bash
# The quick-start demo: the bundled 24-layer demo Mamba on the bundled lambada-style task, through
# the stock `lm_eval` command in fp (the reference), int8, same, better (divisor 2025) and better
# without the int8 range clamp, then `check` on the dumps and `compare` (against fp) on the runs.
# Batches of 128: the PyTorch scan's per-token loop costs per batch, so fewer batches run faster.
# Measured 2026-12-03 on the project's shared 2-core machine while other jobs kept its load at 5-8
# (OMP_NUM_THREADS=1): the five evaluations took 696 s (fp 19 s of loglikelihood requests, the
# rest lm-eval's fixed costs, calibration and perplexity bootstrap); idle cores were not available.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

out=${1:-demo-output}
rm -rf "$out"
model_args="pretrained=examples/demo/model,calib_data=examples/demo/calib.txt,calib_samples=64,calib_seqlen=128"

evaluate() {  # evaluate MODE_ARGS DUMP_DIR
  echo "== lm_eval --model mamba_floatsim, $1"
  lm_eval --model mamba_floatsim \
    --model_args "$model_args,dump_dir=$2,$1" \
    --include_path examples/demo/task --tasks demo_lambada \
    --batch_size 128 --output_path "$out/results"
}

start=$(date +%s)
for mode in fp int8 same "better,divisor=2025"; do
  evaluate "mode=$mode" "$out/yzCheckFloatSim"
done
# its own dump folder: its dump has the clamped run's file name
evaluate "mode=better,divisor=2025,clamp=none" "$out/clamp_none"
echo "== evaluations took $(( $(date +%s) - start )) s"

echo "== lm-eval-floatsim check $out/yzCheckFloatSim"
lm-eval-floatsim check "$out/yzCheckFloatSim"
echo "== lm-eval-floatsim compare $out/results --baseline fp --out $out/compare"
lm-eval-floatsim compare "$out/results" --baseline fp --out "$out/compare" > /dev/null

echo
echo "Accuracy on demo_lambada (2000 passages):"
# the acc table of compare.md: the table lines after its heading
awk '/^### demo_lambada — acc /{found=1; next} found && /^\|/{print; table=1; next} table{exit}' "$out/compare/compare.md"
cat <<DONE

Results (lm-eval JSON, one per mode):  $out/results/
Dumps (the yzCheckFloatSim files):      $out/yzCheckFloatSim/ (better clamp=none: $out/clamp_none/)
Comparison (Markdown, JSON):            $out/compare/compare.md, compare.json
Plots:                                  $out/compare/accuracy.png, $out/compare/sqnr_by_layer.png
DONE

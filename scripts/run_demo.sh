#!/usr/bin/env bash
# The quick-start demo: the bundled 24-layer demo Mamba on the bundled lambada-style task, through
# the stock `lm_eval` command in int8, same and better (divisor 2025), then `check` and `compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

out=${1:-demo-output}
rm -rf "$out"
model_args="pretrained=examples/demo/model,calib_data=examples/demo/calib.txt,calib_samples=64,calib_seqlen=128,dump_dir=$out/yzCheckFloatSim"

start=$(date +%s)
for mode in int8 same "better,divisor=2025"; do
  echo "== lm_eval --model mamba_floatsim, mode=$mode"
  lm_eval --model mamba_floatsim \
    --model_args "$model_args,mode=$mode" \
    --include_path examples/demo/task --tasks demo_lambada \
    --batch_size 32 --output_path "$out/results"
done
echo "== evaluations took $(( $(date +%s) - start )) s"

echo "== lm-eval-floatsim check $out/yzCheckFloatSim"
lm-eval-floatsim check "$out/yzCheckFloatSim"
echo "== lm-eval-floatsim compare $out/results"
lm-eval-floatsim compare "$out/results" --out "$out/compare"

cat <<DONE

Results (lm-eval JSON, one per mode):  $out/results/
Dumps (the yzCheckFloatSim files):      $out/yzCheckFloatSim/
Comparison (Markdown, JSON, plots):     $out/compare/
DONE

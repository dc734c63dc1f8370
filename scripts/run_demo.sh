#!/usr/bin/env bash
# The quick-start demo: the bundled 24-layer demo Mamba on the bundled lambada-style task, through
# the stock `lm_eval` command in fp (the reference), int8, same, better (divisor 2025) and better
# without the int8 range clamp, then `check` on the dumps and `compare` (against fp) on the runs.
# Two evaluations run at a time, one torch thread each: most of an evaluation is single-threaded
# Python (imports, lm-eval's task index, prompts), so two processes use two cores better than one
# process with two threads. int8 starts first: it calibrates into the scales cache in its first
# seconds, and the quantized runs started after it read the cache (a run that found no entry would
# calibrate the same scales itself). Batches of 128: the PyTorch scan's per-token loop costs per batch.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

out=${1:-demo-output}
rm -rf "$out"
mkdir -p "$out/logs"
model_args="pretrained=examples/demo/model,calib_data=examples/demo/calib.txt,calib_samples=64,calib_seqlen=128"

evaluate() {  # evaluate NAME MODE_ARGS DUMP_DIR: one lm_eval run, its output in $out/logs/NAME.log
  local started=$SECONDS
  if lm_eval --model mamba_floatsim \
      --model_args "$model_args,dump_dir=$3,$2" \
      --include_path examples/demo/task --tasks demo_lambada \
      --batch_size 128 --output_path "$out/results" > "$out/logs/$1.log" 2>&1; then
    echo "== $1 done in $(( SECONDS - started )) s"
  else
    echo "== $1 FAILED; the end of $out/logs/$1.log:"; tail -n 20 "$out/logs/$1.log"; return 1
  fi
}

running=0
queue() {  # queue NAME MODE_ARGS DUMP_DIR: start the evaluation once fewer than two are running
  if (( running == 2 )); then wait -n; running=$(( running - 1 )); fi  # a failed one ends the script
  evaluate "$@" &
  running=$(( running + 1 ))
}

start=$SECONDS
echo "== lm_eval --model mamba_floatsim --model_args $model_args,mode=... (two at a time; logs in $out/logs/)"
queue int8 "mode=int8" "$out/yzCheckFloatSim"
queue fp "mode=fp" "$out/yzCheckFloatSim"
queue same "mode=same" "$out/yzCheckFloatSim"
queue better "mode=better,divisor=2025" "$out/yzCheckFloatSim"
# its own dump folder: its dump has the clamped run's file name
queue better_clamp_none "mode=better,divisor=2025,clamp=none" "$out/clamp_none"
while (( running > 0 )); do wait -n; running=$(( running - 1 )); done
echo "== evaluations took $(( SECONDS - start )) s"

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
Logs of the lm_eval runs:               $out/logs/
DONE

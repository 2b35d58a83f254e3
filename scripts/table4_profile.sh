#!/usr/bin/env bash
# Paper Table 4's Mem and TFLOPs columns without weights, data or a download: `main.py profile` of TinyLlama-1.1B
# (its shipped config, shape-only: FakeTensorMode runs the real graph without arithmetic) at batch 128 x 512 tokens
# (the shape that reproduces the table, docs/llm.md), vanilla and ASI rank 20 on #Layers 1-5, plus LoRA (r 8)
# and LoRA + ASI; then scripts/table4_table.py prints the side-by-side table (ours vs the paper) and the measured
# activation memory.
# Output: $RUN_ROOT/table4/profile/<method>_<n>.json, the JSON line profile prints last (all its output: .json.log).
#
#   bash scripts/table4_profile.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   METHODS="vanilla asi lora lora_asi"  LAYERS="1 2 3 4 5"  BATCH_SIZE=128  MAX_LENGTH=512
#
# Expected runtime: 20 profiles of ~10-15 s each (imports dominate) on a shared 2-core CPU, about 4 minutes.
# DATA_ROOT is accepted and unused.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for method in ${METHODS:-vanilla asi lora lora_asi}; do
    case "$method" in
        vanilla) args=(--model.method vanilla) ;;
        asi) args=(--model.method asi --model.ranks 20) ;;
        lora) args=(--model.method lora) ;;
        lora_asi) args=(--model.method asi --model.ranks 20 --model.lora true) ;;
        *) die "unknown method '$method' (vanilla asi lora lora_asi)" ;;
    esac
    for n in ${LAYERS:-1 2 3 4 5}; do
        out="$RUN_ROOT/table4/profile/${method}_$n.json"
        run_once "$out" --last-line "$out" -- \
            "$PYTHON" main.py profile --config configs/models/tinyllama.yaml --config configs/data/boolq.yaml \
            "${args[@]}" --model.num_finetune "$n" --data.batch_size "${BATCH_SIZE:-128}" \
            --data.max_length "${MAX_LENGTH:-512}" --run_root "$RUN_ROOT" "${EXTRA[@]}"
    done
done
if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON scripts/table4_table.py $RUN_ROOT/table4/profile"
else
    "$PYTHON" scripts/table4_table.py "$RUN_ROOT/table4/profile"
fi
finish

#!/usr/bin/env bash
# Paper Table 4: TinyLlama-1.1B-Chat-v1.0 fine-tuned on BoolQ (data/boolq/{train,dev}.jsonl, docs/datasets.md),
# vanilla and ASI rank 20 on the last 1-5 MLP linears (#Layers), batch 8 x 512 tokens, validated on dev; then the
# Table-4 layout of `main.py report` (accuracy, Mem MiB, TFLOPs).
# Runs: $RUN_ROOT/setupA/tinyllama/boolq/{vanilla/l<n>, asi/l<n>_r20}/
# Weights: the hub when online, else ckpts/hf/TinyLlama-1.1B-Chat-v1.0/ (docs/llm.md).
#
#   bash scripts/table4.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   METHODS="vanilla asi"  LAYERS="1 2 3 4 5"  EPOCHS=1
#
# Expected runtime: 10 runs of 1 epoch over 9,427 questions (1,179 steps of 8 x 512 tokens through the frozen
# 1.1B model, float32), about 20-40 minutes each on one H100; not for a CPU.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for method in ${METHODS:-vanilla asi}; do
    for n in ${LAYERS:-1 2 3 4 5}; do
        if [[ "$method" == asi ]]; then
            fit A tinyllama boolq asi "l${n}_r20" --model.num_finetune "$n" --model.ranks 20 \
                --trainer.max_epochs "${EPOCHS:-1}"
        else
            fit A tinyllama boolq "$method" "l$n" --model.num_finetune "$n" --trainer.max_epochs "${EPOCHS:-1}"
        fi
    done
done
if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON main.py report $RUN_ROOT/setupA/tinyllama/boolq --out $RUN_ROOT/table4/report.md --flops paper"
else
    "$PYTHON" main.py report "$RUN_ROOT/setupA/tinyllama/boolq" --out "$RUN_ROOT/table4/report.md" --flops paper \
        --no_plots true
    cat "$RUN_ROOT/table4/report.md"
fi
finish

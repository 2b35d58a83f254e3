#!/usr/bin/env bash
# ASI on ImageNet (paper Table 1; setup B): each model's half-1 checkpoint (ckpts/setupB/<model>_imagenet.ckpt, from
# scripts/pretrain_setupB.sh or the paper's release) fine-tuned on half 2 at 2 and 4 layers, ranks chosen from the
# setup-B perplexity table (scripts/perplexity.sh) under BUDGET=hosvd@0.8.
# Runs: $RUN_ROOT/setupB/<model>/imagenet/asi/l<n>_budget<BUDGET>/
#
#   bash scripts/asi_setupB.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   MODELS="mcunet mobilenet_v2 resnet18 resnet34"  LAYERS="2 4"
#
# Expected runtime: 8 runs of 90 epochs over ~512k images (configs/recipes/setupB_finetune.yaml), about 8-15
# GPU-hours each (data loading bound), so 3-5 GPU-days in all.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for model in ${MODELS:-$ALL_MODELS}; do
    ppl="$(perplexity_file B "$model")"
    for n in ${LAYERS:-2 4}; do
        NEEDS="$ppl" fit B "$model" imagenet asi "l${n}_budget$BUDGET" --model.num_finetune "$n" \
            --model.perplexity_file "$ppl" --model.budget "$BUDGET"
    done
done
finish

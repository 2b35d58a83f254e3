#!/usr/bin/env bash
# ASI on the downstream datasets (paper Table 2, Fig. 4; setup A): each model with ImageNet weights, fine-tuned on
# CIFAR-10, CIFAR-100, CUB-200, Flowers-102 and Pets at 2 and 4 layers, ranks chosen per layer from the model's
# perplexity table (scripts/perplexity.sh, setup A) under the budget HOSVD_eps=0.8 would use (BUDGET=hosvd@0.8).
# Runs: $RUN_ROOT/setupA/<model>/<dataset>/asi/l<n>_budget<BUDGET>/
#
#   bash scripts/asi_setupA.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   MODELS="mcunet mobilenet_v2 resnet18 resnet34"  DATASETS="cifar10 cifar100 cub200 flowers102 pets"  LAYERS="2 4"
#
# Expected runtime: 40 runs of 50 epochs (recipe configs/recipes/setupA.yaml). On one GPU, roughly 30-60 min per
# CIFAR run and 5-15 min per CUB/Flowers/Pets run: about 15-25 GPU-hours in all.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for model in ${MODELS:-$ALL_MODELS}; do
    ppl="$(perplexity_file A "$model")"
    for dataset in ${DATASETS:-$DOWNSTREAM}; do
        for n in ${LAYERS:-2 4}; do
            NEEDS="$ppl" fit A "$model" "$dataset" asi "l${n}_budget$BUDGET" --model.num_finetune "$n" \
                --model.perplexity_file "$ppl" --model.budget "$BUDGET"
        done
    done
done
finish

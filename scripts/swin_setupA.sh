#!/usr/bin/env bash
# Table 2's SwinT rows (setup A): Swin-T with ImageNet weights fine-tuned on CIFAR-10, CIFAR-100, CUB-200,
# Flowers-102 and Pets: vanilla training of all layers and of the last 2 and 4 mlp linears, HOSVD_eps (eps=0.8) and
# ASI under the budget HOSVD_eps=0.8 would use (BUDGET=hosvd@0.8) at 2 and 4 layers. "#Layers" counts the nn.Linear
# layers whose name contains "mlp", from the end (configs/models/swin_t.yaml). ASI's ranks come from Swin-T's
# perplexity table, measured first by scripts/perplexity.sh (skipped when it exists).
# Runs: $RUN_ROOT/setupA/swin_t/<dataset>/<method>/<exp>/  (exp: lall, l2, l4, l2_eps0.8, l4_eps0.8,
# l2_budgethosvd@0.8, l4_budgethosvd@0.8); 1 measurement + 35 fits with the default lists.
#
#   bash scripts/swin_setupA.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   TRANSFORMERS="swin_t"  DATASETS="cifar10 cifar100 cub200 flowers102 pets"  LAYERS="2 4"  EPS="0.8"
#   CHECKPOINTING=1 adds, per dataset and layer count, vanilla with activation checkpointing (exp l<n>_ckpt)
#
# Expected runtime: 35 runs of 50 epochs at 224x224 (configs/recipes/setupA.yaml). Swin-T's forward costs ~2.5x
# ResNet-34's, so count ~1-2 GPU-hours per CIFAR run and ~15-30 min per CUB/Flowers/Pets run for vanilla and ASI;
# HOSVD_eps runs an SVD per mode of every fine-tuned layer at every step and dominates (GPU-days for its 10 runs).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for model in ${TRANSFORMERS:-swin_t}; do
    MODELS="$model" SETUPS=A bash scripts/perplexity.sh "$DATA_ROOT" "$RUN_ROOT" || {
        N_FAILED=$((N_FAILED + 1)); [[ "$KEEP_GOING" == 1 ]] || exit 1; }
    ppl="$(perplexity_file A "$model")"
    for dataset in ${DATASETS:-$DOWNSTREAM}; do
        fit A "$model" "$dataset" vanilla lall --model.num_finetune all
        for n in ${LAYERS:-2 4}; do
            fit A "$model" "$dataset" vanilla "l$n" --model.num_finetune "$n"
            [[ "${CHECKPOINTING:-0}" != 1 ]] ||
                fit A "$model" "$dataset" vanilla "l${n}_ckpt" --model.num_finetune "$n" --model.checkpointing true
            for eps in ${EPS:-0.8}; do
                fit A "$model" "$dataset" hosvd "l${n}_eps$eps" --model.num_finetune "$n" --model.eps "$eps"
            done
            NEEDS="$ppl" fit A "$model" "$dataset" asi "l${n}_budget$BUDGET" --model.num_finetune "$n" \
                --model.perplexity_file "$ppl" --model.budget "$BUDGET"
        done
    done
done
finish

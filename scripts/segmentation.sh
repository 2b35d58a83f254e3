#!/usr/bin/env bash
# Table 3 (semantic segmentation): six networks fine-tuned on Pascal VOC12 aug from the authors' Cityscapes-calibrated
# checkpoints, per model: vanilla training of all layers and of the paper's "5" and "10" layers (the authors' explicit
# lists, segmentation/layer_sets.py), the gradient filter (the authors' per-layer radii), HOSVD_eps (eps=0.8), and
# ASI with ranks chosen under HOSVD_0.8's memory budget from a perplexity table measured on VOC12 aug.
# 8 runs + 1 perplexity table per model, in $RUN_ROOT/setupA/<model>/<dataset>/<method>/<exp>/
# (exp: lall, l5, l10, l5_Rauthors, l10_Rauthors, l5_eps0.8, l10_eps0.8, l5_budget_hosvd0.8, l10_budget_hosvd0.8).
#
#   bash scripts/segmentation.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   SEG_MODELS="pspnet_r18 deeplabv3_r18 fcn_r18 upernet_r18 pspnet_mv2 deeplabv3_mv2"  LAYERS="5 10"
#   SEG_DATASET=voc12aug (digit_scenes for a CPU smoke pass)   SEG_CKPT_DIR=$CKPT_DIR/segmentation
#   GF_METHOD=gradfilter: the gradient-filter method, with the authors' layer lists and per-layer radii. Not
#   gradfilter_paper by default: it refuses convs whose dilation is >= R (the authors hand those to another op, not
#   reproduced), and Table 3's lists hold many (DLV3's ASPP branches, the dilated layer3/layer4 convs at 10 layers).
#
# Checkpoints: $SEG_CKPT_DIR/<model>.pth, the authors' Cityscapes-calibrated mmseg checkpoints
# (scripts/download_ckpts.sh seg, then name each file after its model; docs/segmentation.md). With
# SEG_CKPT_DIR=none the runs start from random weights (only for smoke passes).
# Expected runtime: 20,000 iterations of batch 8 at 512x512 per run, ~2-4 GPU-hours each on one GPU (UPerNet and
# HOSVD the slowest); ~54 runs in all.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

SEG_DATASET="${SEG_DATASET:-voc12aug}"
SEG_CKPT_DIR="${SEG_CKPT_DIR:-$CKPT_DIR/segmentation}"
GF_METHOD="${GF_METHOD:-gradfilter}"

segfit() {  # segfit MODEL METHOD EXP [ARGS...]
    local model="$1" method="$2" exp="$3" ckpt=() needs=()
    shift 3
    if [[ "$SEG_CKPT_DIR" != none ]]; then
        ckpt=(--model.checkpoint "$SEG_CKPT_DIR/$model.pth")
        needs=(--needs "$SEG_CKPT_DIR/$model.pth")
    fi
    run_once "$RUN_ROOT/setupA/$model/$SEG_DATASET/$method/$exp/metrics.json" "${needs[@]}" -- \
        "$PYTHON" main.py fit --config configs/recipes/segmentation.yaml --config "configs/segmentation/$model.yaml" \
        --config "configs/data/$SEG_DATASET.yaml" --data.root "$DATA_ROOT" --run_root "$RUN_ROOT" \
        --exp_name "$exp" --model.method "$method" "${ckpt[@]}" "$@" "${EXTRA[@]}"
}

for model in ${SEG_MODELS:-pspnet_r18 deeplabv3_r18 fcn_r18 upernet_r18 pspnet_mv2 deeplabv3_mv2}; do
    ckpt=()
    [[ "$SEG_CKPT_DIR" != none ]] && ckpt=(--model.checkpoint "$SEG_CKPT_DIR/$model.pth")
    ppl="$RUN_ROOT/setupA/$model/$SEG_DATASET/measure/$PPL_EXP/perplexity.json"
    run_once "$ppl" -- \
        "$PYTHON" main.py measure --config configs/recipes/segmentation.yaml --config "configs/segmentation/$model.yaml" \
        --config "configs/data/$SEG_DATASET.yaml" --data.root "$DATA_ROOT" --run_root "$RUN_ROOT" \
        --exp_name "$PPL_EXP" --measure.epsilons "$EPSILONS" --measure.num_batches "${NUM_BATCHES:-10}" \
        "${ckpt[@]}" "${EXTRA[@]}"
    segfit "$model" vanilla lall --model.num_finetune all
    for n in ${LAYERS:-5 10}; do
        segfit "$model" vanilla "l$n" --model.num_finetune "$n"
        segfit "$model" "$GF_METHOD" "l${n}_Rauthors" --model.num_finetune "$n"
        segfit "$model" hosvd "l${n}_eps0.8" --model.num_finetune "$n" --model.eps 0.8
        NEEDS="$ppl" segfit "$model" asi "l${n}_budget_hosvd0.8" --model.num_finetune "$n" \
            --model.perplexity_file "$ppl" --model.budget "$BUDGET"
    done
done
finish

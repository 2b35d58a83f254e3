#!/usr/bin/env bash
# Perplexity tables for ASI's rank selection (paper Sec. 3.3 eq. 7, Sec. 4.1 "Rank Selection", App. B.2):
# per layer and eps in {0.4, ..., 0.9}, HOSVD ranks, compressed memory and activation perplexity.
#   setup A: each model with its ImageNet weights, measured on ImageNet; one table serves the five downstream sets
#   setup B: each model's half-1 checkpoint (scripts/pretrain_setupB.sh), measured on ImageNet half 2
# Output: $RUN_ROOT/setup<S>/<model>/imagenet/measure/$PPL_EXP/perplexity.json (+ .png); the ASI sweeps read it.
#
#   bash scripts/perplexity.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   SETUPS="A B"  MODELS="mcunet mobilenet_v2 resnet18 resnet34"
#   NUM_BATCHES=K batches of 64 averaged per table (default 10)   MEASURE_LAYERS=last N convs measured (default all)
#
# Expected runtime: 8 tables, each K forward/backward passes plus one HOSVD per layer, mode and batch:
# about 1-5 minutes per table on one GPU (ResNet-34 the slowest), under an hour in all; far longer on a CPU.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for setup in ${SETUPS:-A B}; do
    for model in ${MODELS:-$ALL_MODELS}; do
        out="$(perplexity_file "$setup" "$model")"
        needs=()
        [[ $setup == B ]] && needs=(--needs "$CKPT_DIR/setupB/${model}_$PPL_DATASET.ckpt")
        run_once "$out" "${needs[@]}" -- \
            "$PYTHON" main.py measure --config "$(recipe "$setup")" --config "configs/models/$model.yaml" \
            --config "configs/data/$PPL_DATASET.yaml" --data.root "$DATA_ROOT" \
            --run_root "$RUN_ROOT" --exp_name "$PPL_EXP" --measure.epsilons "$EPSILONS" \
            --measure.num_batches "${NUM_BATCHES:-10}" --measure.num_finetune "${MEASURE_LAYERS:-all}" "${EXTRA[@]}"
    done
done
finish

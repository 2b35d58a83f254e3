#!/usr/bin/env bash
# Measured vs analytic activation memory (docs/resources.md, "Measured activation memory"): `main.py profile`, one training step
# on random input (batch 64, 224x224, random weights: no dataset, no download) for each model, method and number of
# fine-tuned layers; then scripts/memory_table.py prints the markdown table of docs/resources.md.
# Methods: vanilla (plain autograd, the baseline), vanilla_lean (vanilla with --model.lean true), gradfilter
# (radius 2), hosvd (eps 0.8), asi (ranks 2); the compressing methods run lean (their default). Not in the default
# list: vanilla_lean_bn and asi_bn, the same with --model.train_bn_affine true (the authors' trainable BatchNorm
# scale and shift: each such BatchNorm keeps its float input), METHODS="vanilla_lean_bn asi_bn".
# Output: $RUN_ROOT/memory/<model>/<method>_<n>.json, the JSON line profile prints last (all its output: .json.log).
#
#   bash scripts/memory_table.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   MODELS="mcunet mobilenet_v2 resnet18 resnet34"  DEPTHS="2 4"  METHODS="vanilla vanilla_lean gradfilter hosvd asi"
#   BATCH_SIZE=64  RESOLUTION=224
#
# Expected runtime: 40 steps; about 25 minutes on a shared 2-core CPU (ResNet-34's frozen forward at batch 64
# dominates), a few minutes on a GPU. DATA_ROOT is accepted and unused.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for model in ${MODELS:-$ALL_MODELS}; do
    for n in ${DEPTHS:-2 4}; do
        for method in ${METHODS:-vanilla vanilla_lean gradfilter hosvd asi}; do
            case "$method" in
                vanilla) args=(--model.method vanilla) ;;
                vanilla_lean) args=(--model.method vanilla --model.lean true) ;;
                gradfilter) args=(--model.method gradfilter --model.radius 2) ;;
                hosvd) args=(--model.method hosvd --model.eps 0.8) ;;
                asi) args=(--model.method asi --model.ranks 2) ;;
                vanilla_lean_bn) args=(--model.method vanilla --model.lean true --model.train_bn_affine true) ;;
                asi_bn) args=(--model.method asi --model.ranks 2 --model.train_bn_affine true) ;;
                *) die "unknown method '$method' (vanilla vanilla_lean gradfilter hosvd asi vanilla_lean_bn asi_bn)" ;;
            esac
            out="$RUN_ROOT/memory/$model/${method}_$n.json"
            run_once "$out" --last-line "$out" -- \
                "$PYTHON" main.py profile --config "configs/models/$model.yaml" "${args[@]}" --model.num_finetune "$n" \
                --data.batch_size "${BATCH_SIZE:-64}" --data.resolution "${RESOLUTION:-224}" "${EXTRA[@]}"
        done
    done
done
if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON scripts/memory_table.py $RUN_ROOT/memory"
else
    "$PYTHON" scripts/memory_table.py "$RUN_ROOT/memory"
fi
finish

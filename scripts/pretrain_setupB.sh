#!/usr/bin/env bash
# Setup B, step 1 (paper App. B.1 "ImageNet"): train each model from scratch on half 1 of the non-IID ImageNet
# split. The best weights are exported to ckpts/setupB/<model>_imagenet.ckpt ($ASI_CKPT_DIR/setupB/...), which the
# setup-B sweeps fine-tune on half 2. Skipped for a model whose checkpoint is already there (e.g. the paper's).
#
#   bash scripts/pretrain_setupB.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   MODELS="mcunet mobilenet_v2 resnet18 resnet34"
#
# Expected runtime: full training of 90 epochs over ~512k images: about 10-30 GPU-hours per model.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for model in ${MODELS:-$ALL_MODELS}; do
    # done: the pretraining run finished with these settings (it also wrote $CKPT_DIR/setupB/${model}_imagenet.ckpt);
    # a checkpoint that is there without such a run (download_ckpts.sh setupB) is kept and used as it is
    if [[ -s "$CKPT_DIR/setupB/${model}_imagenet.ckpt" && ! -e "$RUN_ROOT/setupB/$model/imagenet/vanilla/pretrain" ]]; then
        echo "skip (done): $CKPT_DIR/setupB/${model}_imagenet.ckpt exists (not made by this sweep; kept)" >&2
        N_SKIPPED=$((N_SKIPPED + 1))
        continue
    fi
    run_once "$RUN_ROOT/setupB/$model/imagenet/vanilla/pretrain/metrics.json" -- \
        "$PYTHON" main.py fit --config configs/recipes/setupB_pretrain.yaml --config "configs/models/$model.yaml" \
        --config configs/data/imagenet.yaml --data.root "$DATA_ROOT" --run_root "$RUN_ROOT" "${LIFECYCLE[@]}" \
        --exp_name pretrain "${EXTRA[@]}"
done
finish

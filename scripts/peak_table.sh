#!/usr/bin/env bash
# Whole-step peak memory per method (docs/peak_memory.md): `main.py profile`, one measured training step on random
# input (random weights: no dataset, no download) for each setting and variant; then scripts/peak_table.py prints
# the markdown table: the paper's Mem (activation_mib), what autograd saves (measured_activation_mib), the
# whole-step peak (peak_step_mib) with its largest parts, training_overhead_mib (peak minus an inference forward's)
# and the unmeasured step time.
# Variants: vanilla, vanilla+checkpointing, asi (ranks 2; the LLMs rank 20 as Table 4), asi+recompute,
# asi+checkpointing; where a frozen prefix sets the peak (few fine-tuned layers), also vanilla and asi with the
# frozen prefix run in micro-batches (--model.frozen_micro_batch: 8 of 64 images, 2 of PSPNet's 8).
# Output: $RUN_ROOT/peak/<setting>/<variant>.json, the JSON line profile prints last (all its output: .json.log).
#
#   bash scripts/peak_table.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   SETTINGS="mcunet mcunet_bn mcunet_bn4 mcunet_all resnet18 resnet18_bn resnet18_all swin_t vit_b_32 tinyllama_blocks tinyllama
#             pspnet_r18"
#   VARIANTS="vanilla vanilla_ckpt asi asi_recompute asi_ckpt"   (+ vanilla_micro asi_micro where MICRO_SETTINGS
#   names the setting: mcunet mcunet_bn resnet18 resnet18_bn swin_t vit_b_32 pspnet_r18; + asi_approx asi_approx4
#   asi_approx_recompute where APPROX_SETTINGS names it, + asi_approx_micro where both do, + asi_approx2 where
#   APPROX2_SETTINGS does: docs/approximate.md)
#
# Expected runtime on a shared 2-core CPU: about 45 minutes (the real-width TinyLlama blocks at 8 x 512 tokens and
# ResNet-18 / Swin-T at batch 64 dominate); tinyllama (128 x 512) runs shape-only. DATA_ROOT is accepted and unused.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

setting_args() {
    case "$1" in
        mcunet) args=(--config configs/models/mcunet.yaml --model.num_finetune 2 --data.batch_size 64 --data.resolution 224) ;;
        mcunet_bn) args=(--config configs/models/mcunet.yaml --model.num_finetune 2 --data.batch_size 64 --data.resolution 224
                         --model.train_bn_affine true) ;;
        mcunet_bn4) args=(--config configs/models/mcunet.yaml --model.num_finetune 4 --data.batch_size 64 --data.resolution 224
                          --model.train_bn_affine true) ;;
        mcunet_all) args=(--config configs/models/mcunet.yaml --model.num_finetune all --data.batch_size 64 --data.resolution 224) ;;
        resnet18) args=(--config configs/models/resnet18.yaml --model.num_finetune 2 --data.batch_size 64 --data.resolution 224) ;;
        resnet18_all) args=(--config configs/models/resnet18.yaml --model.num_finetune all --data.batch_size 64 --data.resolution 224) ;;
        resnet18_bn) args=(--config configs/models/resnet18.yaml --model.num_finetune 2 --data.batch_size 64
                           --data.resolution 224 --model.train_bn_affine true) ;;
        swin_t) args=(--config configs/models/swin_t.yaml --model.num_finetune 4 --data.batch_size 64 --data.resolution 224) ;;
        vit_b_32) args=(--config configs/models/vit_b_32.yaml --model.num_finetune 4 --data.batch_size 64 --data.resolution 224) ;;
        tinyllama_blocks) args=(--config configs/models/tinyllama.yaml --config configs/data/boolq.yaml
                                --model.num_blocks 2 --model.shape_only false --model.num_finetune 5
                                --data.batch_size 8 --data.max_length 512) ;;
        tinyllama) args=(--config configs/models/tinyllama.yaml --config configs/data/boolq.yaml
                         --model.num_finetune 5 --data.batch_size 128 --data.max_length 512) ;;
        pspnet_r18) args=(--config configs/recipes/segmentation.yaml --config configs/segmentation/pspnet_r18.yaml
                          --config configs/data/digit_scenes.yaml --model.num_finetune 5 --data.batch_size 8
                          --data.resolution 512) ;;
        *) die "unknown setting '$1' (mcunet mcunet_bn mcunet_bn4 mcunet_all resnet18 resnet18_bn resnet18_all swin_t vit_b_32 tinyllama_blocks tinyllama pspnet_r18)" ;;
    esac
}

MICRO_SETTINGS="${MICRO_SETTINGS:-mcunet mcunet_bn resnet18 resnet18_bn swin_t vit_b_32 pspnet_r18}"
APPROX_SETTINGS="${APPROX_SETTINGS:-mcunet_bn4 swin_t vit_b_32 tinyllama_blocks tinyllama pspnet_r18}"
APPROX2_SETTINGS="${APPROX2_SETTINGS:-mcunet_bn4}"  # saved tensors in 2 bits (accuracy measured on MCUNet only)
for setting in ${SETTINGS:-mcunet mcunet_bn mcunet_bn4 mcunet_all resnet18 resnet18_bn resnet18_all swin_t vit_b_32 tinyllama_blocks tinyllama pspnet_r18}; do
    setting_args "$setting"
    ranks=2; [[ "$setting" == tinyllama* ]] && ranks=20
    micro=8; [[ "$setting" == pspnet* ]] && micro=2
    variants="${VARIANTS:-vanilla vanilla_ckpt asi asi_recompute asi_ckpt}"
    [[ -z "${VARIANTS:-}" && " $MICRO_SETTINGS " == *" $setting "* ]] && variants+=" vanilla_micro asi_micro"
    [[ -z "${VARIANTS:-}" && " $APPROX_SETTINGS " == *" $setting "* ]] && variants+=" asi_approx asi_approx4 asi_approx_recompute"
    [[ -z "${VARIANTS:-}" && " $APPROX_SETTINGS " == *" $setting "* && " $MICRO_SETTINGS " == *" $setting "* ]] \
        && variants+=" asi_approx_micro"
    [[ -z "${VARIANTS:-}" && " $APPROX2_SETTINGS " == *" $setting "* ]] && variants+=" asi_approx2"
    for variant in $variants; do
        case "$variant" in
            vanilla) v=(--model.method vanilla) ;;
            vanilla_ckpt) v=(--model.method vanilla --model.checkpointing true) ;;
            asi) v=(--model.method asi --model.ranks "$ranks") ;;
            asi_recompute) v=(--model.method asi --model.ranks "$ranks" --model.recompute true) ;;
            asi_ckpt) v=(--model.method asi --model.ranks "$ranks" --model.checkpointing true) ;;
            vanilla_micro) v=(--model.method vanilla --model.frozen_micro_batch "$micro") ;;
            asi_micro) v=(--model.method asi --model.ranks "$ranks" --model.frozen_micro_batch "$micro") ;;
            # approximate (asi_core.approx, issue 21): 2-bit GELU/SiLU derivatives and saved tensors in 8 / 4 bits
            asi_approx) v=(--model.method asi --model.ranks "$ranks" --model.approx_activations true
                           --model.saved_bits 8) ;;
            asi_approx4) v=(--model.method asi --model.ranks "$ranks" --model.approx_activations true
                            --model.saved_bits 4) ;;
            asi_approx2) v=(--model.method asi --model.ranks "$ranks" --model.approx_activations true
                            --model.saved_bits 2) ;;
            asi_approx_recompute) v=(--model.method asi --model.ranks "$ranks" --model.approx_activations true
                                     --model.saved_bits 8 --model.recompute true) ;;
            asi_approx_micro) v=(--model.method asi --model.ranks "$ranks" --model.approx_activations true
                                 --model.saved_bits 8 --model.frozen_micro_batch "$micro") ;;
            *) die "unknown variant '$variant' (vanilla vanilla_ckpt asi asi_recompute asi_ckpt vanilla_micro asi_micro asi_approx asi_approx4 asi_approx2 asi_approx_recompute asi_approx_micro)" ;;
        esac
        out="$RUN_ROOT/peak/$setting/$variant.json"
        run_once "$out" --last-line "$out" -- \
            "$PYTHON" main.py profile "${args[@]}" "${v[@]}" --trainer.logger false "${EXTRA[@]}"
    done
done
if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON scripts/peak_table.py $RUN_ROOT/peak"
else
    "$PYTHON" scripts/peak_table.py "$RUN_ROOT/peak"
fi
finish

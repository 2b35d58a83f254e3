#!/usr/bin/env bash
# Accuracy of the approximate options (asi_core.approx, issue 21: 2-bit activation derivatives, saved tensors in
# 8/4/2 bits) against exact ASI at the same ranks, over seeds, on the three offline demos (docs/approximate.md):
#   1. MCUNet setup B on digits as `make demo` (4 layers, the authors' trainable-BN recipe): asi exact, saved8,
#      saved4, saved2 (MCUNet's activations are ReLU6: no GELU/SiLU to approximate)      -> runs/demo, seeds.md
#   2. llama_tiny on digits_tokens as scripts/llm_demo.sh (ASI rank 16): exact, 2-bit SiLU + saved8, + saved4
#                                                                                          -> runs/llm_demo, seeds.md
#   3. swin_tiny_test on digits (setup B: pretrained here on half 1, then ASI rank 4 on the last 4 mlp linears of
#      half 2): exact, 2-bit GELU (act), act + saved8, act + saved4                         -> runs/approx, seeds.md
#
#   bash scripts/approx_accuracy.sh            SEEDS="0 1 2" (default); DRY_RUN=1 prints the commands
#   PARTS="mcunet llm swin" chooses the parts. Finished runs are skipped (resumable).
#
# Expected runtime on a 2-core CPU: about 25 minutes for all three parts and 3 seeds (the exact runs of the demos
# already made are skipped).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" data "${RUN_ROOT:-runs/approx}"
export SEEDS="${SEEDS:-0 1 2}"
PARTS="${PARTS:-mcunet llm swin}"

if [[ " $PARTS " == *" mcunet "* ]]; then
    DEMO_LAYERS=4 DEMO_METHODS=asi DEMO_VARIANTS="recipe saved8 saved4 saved2" bash scripts/demo.sh runs/demo
fi
if [[ " $PARTS " == *" llm "* ]]; then
    bash scripts/llm_demo.sh runs/llm_demo                  # the exact runs (vanilla, asi, lora, lora + asi)
    APPROX="8 4" bash scripts/llm_demo.sh runs/llm_demo
fi
if [[ " $PARTS " == *" swin "* ]]; then
    export OMP_NUM_THREADS="${DEMO_THREADS:-1}"
    case "$RUN_ROOT" in /*) CKPT_ROOT="$RUN_ROOT" ;; *) CKPT_ROOT="$REPO/$RUN_ROOT" ;; esac
    export ASI_CKPT_DIR="$CKPT_ROOT/ckpts"
    BASE=(--config configs/models/swin_t.yaml --config configs/data/digits.yaml --model.backbone swin_tiny_test
          --data.resolution 32 --run_root "$RUN_ROOT" --trainer.enable_model_summary false)
    run_once "$RUN_ROOT/setupB/swin_tiny_test/digits/vanilla/pretrain/metrics.json" -- \
        "$PYTHON" main.py fit --config configs/recipes/setupB_pretrain.yaml "${BASE[@]}" --exp_name pretrain \
        --model.optimizer adam --model.lr 2e-3 --model.weight_decay 0 --trainer.max_epochs "${PRETRAIN_EPOCHS:-30}" \
        "${EXTRA[@]}"
    CKPT="$ASI_CKPT_DIR/setupB/swin_tiny_test_digits.ckpt"
    for seed in $SEEDS; do
        s=""; [[ "$seed" != 0 ]] && s="_s$seed"
        for variant in exact act act_saved8 act_saved4; do
            case "$variant" in
                exact) v=() ;;
                act) v=(--model.approx_activations true) ;;
                act_saved*) v=(--model.approx_activations true --model.saved_bits "${variant#act_saved}") ;;
            esac
            tag=""; [[ "$variant" != exact ]] && tag="_$variant"
            run_once "$RUN_ROOT/setupB/swin_tiny_test/digits/asi/l4_r4$tag$s/metrics.json" --needs "$CKPT" -- \
                "$PYTHON" main.py fit --config configs/recipes/setupB_finetune.yaml "${BASE[@]}" \
                --exp_name "l4_r4$tag$s" --model.checkpoint "$CKPT" --model.method asi --model.num_finetune 4 \
                --model.ranks 4 --model.optimizer adam --model.lr 1e-3 --model.weight_decay 0 \
                --model.warmup_epochs 0 --trainer.max_epochs "${EPOCHS:-15}" --seed_everything "$seed" \
                "${v[@]}" "${EXTRA[@]}"
        done
    done
    if [[ "$DRY_RUN" != 1 ]]; then
        "$PYTHON" scripts/seeds_table.py "$RUN_ROOT/setupB/swin_tiny_test/digits" | tee "$RUN_ROOT/seeds.md"
    fi
fi

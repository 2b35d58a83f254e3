#!/usr/bin/env bash
# The LLM pipeline on the CPU with data that ships with scikit-learn: a tiny random-init LLaMA (llama_tiny: 4 blocks,
# hidden 64, TinyLlama's module names) on the 8x8 digits read as 64-token pixel sequences (digits_tokens), setup B:
#   1. pretrain on half 1 of a label-skewed split (vanilla, the whole network)        -> ckpt under $RUN_ROOT/ckpts
#   2. fine-tune the last 3 MLP linears (#Layers 3: down_proj, up_proj, gate_proj of the last block) on half 2 with
#      vanilla, ASI (rank RANK on every mode), LoRA (r 8) and LoRA + ASI
#   3. the report (accuracy, Mem MiB, TFLOPs) and measured activation memory of each run
#
#   bash scripts/llm_demo.sh [RUN_ROOT]        (default runs/llm_demo; DRY_RUN=1 prints the commands)
#   DEMO_PRETRAIN_EPOCHS=30 DEMO_EPOCHS=15 RANK=16 DEMO_THREADS=1 override the defaults.
#   SEEDS="0 1 2" repeats step 2 per fine-tuning seed (runs <name>_s<seed>; seed 0 keeps the plain names) and prints
#   the mean and spread over seeds (scripts/seeds_table.py).
#   APPROX="8 4" fine-tunes, instead of the four runs of step 2, ASI with the approximate options (asi_core.approx:
#   2-bit SiLU derivatives, saved tensors in 8 / 4 bits; runs l3_r<RANK>_approx<bits>): scripts/approx_accuracy.sh.
#
# Expected runtime: about 3-5 minutes on a shared 2-core CPU. Finished runs are skipped (resumable).
RUN_ROOT="${1:-${RUN_ROOT:-runs/llm_demo}}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" data "$RUN_ROOT"

case "$RUN_ROOT" in /*) CKPT_ROOT="$RUN_ROOT" ;; *) CKPT_ROOT="$REPO/$RUN_ROOT" ;; esac
export ASI_CKPT_DIR="$CKPT_ROOT/ckpts"
export OMP_NUM_THREADS="${DEMO_THREADS:-1}"
RANK="${RANK:-16}"
BASE=(--config configs/models/llama_tiny.yaml --config configs/data/digits_tokens.yaml --run_root "$RUN_ROOT"
      --trainer.enable_model_summary false)

run_once "$RUN_ROOT/setupB/llama_tiny/digits_tokens/vanilla/pretrain/metrics.json" -- \
    "$PYTHON" main.py fit --config configs/recipes/setupB_pretrain.yaml "${BASE[@]}" --exp_name pretrain \
    --model.optimizer adam --model.lr 3e-3 --model.weight_decay 0 --trainer.max_epochs "${DEMO_PRETRAIN_EPOCHS:-30}" \
    "${EXTRA[@]}"
CKPT="$ASI_CKPT_DIR/setupB/llama_tiny_digits_tokens.ckpt"

finetune() {  # EXP METHOD ARGS...
    local exp="$1" method="$2"
    shift 2
    run_once "$RUN_ROOT/setupB/llama_tiny/digits_tokens/$method/$exp/metrics.json" --needs "$CKPT" -- \
        "$PYTHON" main.py fit --config configs/recipes/setupB_finetune.yaml "${BASE[@]}" --exp_name "$exp" \
        --model.checkpoint "$CKPT" --model.method "$method" --model.num_finetune 3 --model.optimizer adam \
        --model.lr 1e-3 --model.weight_decay 0 --model.warmup_epochs 0 --trainer.max_epochs "${DEMO_EPOCHS:-15}" \
        "$@" "${EXTRA[@]}"
}
for seed in ${SEEDS:-0}; do
    s=""; [[ "$seed" != 0 ]] && s="_s$seed"
    if [[ -z "${APPROX:-}" ]]; then
        finetune "l3$s" vanilla --seed_everything "$seed"
        finetune "l3_r$RANK$s" asi --model.ranks "$RANK" --seed_everything "$seed"
        finetune "l3$s" lora --seed_everything "$seed"
        finetune "l3_r${RANK}_lora$s" asi --model.ranks "$RANK" --model.lora true --seed_everything "$seed"
    fi
    for bits in ${APPROX:-}; do  # approximate (asi_core.approx, issue 21): 2-bit SiLU derivatives + saved in BITS
        finetune "l3_r${RANK}_approx$bits$s" asi --model.ranks "$RANK" --model.approx_activations true \
            --model.saved_bits "$bits" --seed_everything "$seed"
    done
done

if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON main.py report $RUN_ROOT/setupB --out $RUN_ROOT/report.md --no_plots true"
else
    "$PYTHON" main.py report "$RUN_ROOT/setupB" --out "$RUN_ROOT/report.md" --no_plots true
    cat "$RUN_ROOT/report.md"
    "$PYTHON" - "$RUN_ROOT/setupB/llama_tiny/digits_tokens" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/*/metrics.json")):
    d = json.loads(f.read_text())
    r = d.get("resources") or {}
    if r:
        print(f"{f.parent.parent.name}/{f.parent.name}: val_acc {100 * d.get('val_acc', float('nan')):.2f} %, "
              f"activation {r['activation_mib']:.4f} MiB, measured {r['measured_activation_mib']:.3f} MiB")
PY
    if [[ "${SEEDS:-0}" != 0 ]]; then
        "$PYTHON" scripts/seeds_table.py "$RUN_ROOT/setupB/llama_tiny/digits_tokens" | tee "$RUN_ROOT/seeds.md"
    fi
fi
finish

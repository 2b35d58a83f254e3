#!/usr/bin/env bash
# `make demo`: the paper's pipeline end to end on data that ships with scikit-learn (8x8 handwritten digits,
# upsampled), setup B, MCUNet-in1 at a small resolution, on the CPU:
#   1. pretrain on half 1 of a label-skewed split (vanilla, every layer)           -> ckpt under $RUN_ROOT/ckpts
#   2. measure the activation perplexity of the last 4 convs on half 2 (Sec. 3.3)   -> perplexity.json + PNG
#   3. fine-tune the last 2 and 4 convs on half 2: vanilla, gradient filtering R2, HOSVD eps=0.8 and ASI with
#      the budget of HOSVD eps=0.8 (ranks chosen exactly from the perplexity table)
#   4. the Table-1-style report (printed, and $RUN_ROOT/report.csv) and the Pareto PNGs next to it
#
#   bash scripts/demo.sh [RUN_ROOT]        (default runs/demo; DRY_RUN=1 prints the commands)
#   DEMO_RESOLUTION=96 DEMO_BATCH=64 DEMO_PRETRAIN_EPOCHS=15 DEMO_EPOCHS=10 DEMO_THREADS=1 override the defaults.
#
# Spread and ablation (docs/reproducing.md, "The demo's result"): SEEDS="0 1 2" repeats step 3 per fine-tuning seed
# (--seed_everything; the pretraining and the perplexity table stay those of seed 0), DEMO_VARIANTS names the
# authors' settings to undo one at a time (recipe = as the recipe runs; frozen_bn = --model.train_bn_affine false;
# standard_aug = --data.augment standard; our_warmup = --model.warmup_start_factor null; step_schedule =
# --model.scheduler_interval step), DEMO_LAYERS and DEMO_METHODS restrict step 3; then scripts/seeds_table.py prints
# the mean and spread over seeds. Seed 0 of "recipe" is the plain demo's runs (same names), e.g.
#   SEEDS="0 1 2" DEMO_VARIANTS="recipe frozen_bn standard_aug our_warmup step_schedule" DEMO_LAYERS=4 \
#   DEMO_METHODS="vanilla hosvd asi" bash scripts/demo.sh
#
# Expected runtime: 8-12 minutes on a 2-core CPU (plus `make setup` on a fresh machine). Runs that finished are
# skipped, so an interrupted demo resumes; remove $RUN_ROOT to start over.
RUN_ROOT="${1:-${RUN_ROOT:-runs/demo}}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" data "$RUN_ROOT"

case "$RUN_ROOT" in /*) CKPT_ROOT="$RUN_ROOT" ;; *) CKPT_ROOT="$REPO/$RUN_ROOT" ;; esac
export ASI_CKPT_DIR="$CKPT_ROOT/ckpts"   # the demo's pretraining checkpoint stays inside the demo folder
# One intra-op thread by default: on a 2-core machine with anything else running, OpenMP threads spinning
# against each other made an MCUNet step 20-30x slower; one thread is predictable (DEMO_THREADS=2 to try).
export OMP_NUM_THREADS="${DEMO_THREADS:-1}"
RES="${DEMO_RESOLUTION:-96}"
BATCH="${DEMO_BATCH:-64}"
PRE_EPOCHS="${DEMO_PRETRAIN_EPOCHS:-15}"
EPOCHS="${DEMO_EPOCHS:-10}"
QUIET=(--trainer.enable_model_summary false)
DATA=(--config configs/models/mcunet.yaml --config configs/data/digits.yaml --data.resolution "$RES"
      --data.batch_size "$BATCH" --run_root "$RUN_ROOT")
# The digits recipe: a few epochs of setup B fine-tuning (SGD, momentum 0.9, cosine), one warm-up epoch.
EXTRA=(--data.resolution "$RES" --data.batch_size "$BATCH" --trainer.max_epochs "$EPOCHS" --model.warmup_epochs 1
       --model.lr 0.1 "${QUIET[@]}" "${EXTRA[@]}")
START=$SECONDS
step() { echo; echo "=== [$1/4] $2 ($((SECONDS - START)) s so far)" >&2; }

step 1 "pretraining MCUNet on digits half 1 (setup B, vanilla, all layers, $PRE_EPOCHS epochs)"
run_once "$RUN_ROOT/setupB/mcunet/digits/vanilla/pretrain/metrics.json" -- \
    "$PYTHON" main.py fit --config configs/recipes/setupB_pretrain.yaml "${DATA[@]}" "${LIFECYCLE[@]}" --exp_name pretrain \
    --trainer.max_epochs "$PRE_EPOCHS" --model.lr 0.1 "${QUIET[@]}"
CKPT="$ASI_CKPT_DIR/setupB/mcunet_digits.ckpt"

step 2 "measuring activation perplexity of the last 4 convs on half 2 (eps 0.4 ... 0.9)"
PPL="$RUN_ROOT/setupB/mcunet/digits/measure/demo/perplexity.json"
NEEDS="$CKPT" run_once "$PPL" --needs "$CKPT" -- \
    "$PYTHON" main.py measure --config configs/recipes/setupB_finetune.yaml "${DATA[@]}" --exp_name demo \
    --model.checkpoint "$CKPT" --measure.epsilons "$EPSILONS" --measure.num_batches 4 \
    --measure.num_finetune 4 "${QUIET[@]}"

step 3 "fine-tuning the last ${DEMO_LAYERS:-2 and 4} convs on half 2: ${DEMO_METHODS:-vanilla gradfilter hosvd asi}"
variant_args() {  # the authors' setting a variant undoes (the recipe's value -> ours)
    case "$1" in
        recipe) v=() ;;
        frozen_bn) v=(--model.train_bn_affine false) ;;
        standard_aug) v=(--data.augment standard) ;;
        our_warmup) v=(--model.warmup_start_factor null) ;;
        step_schedule) v=(--model.scheduler_interval step) ;;
        saved8|saved4|saved2) v=(--model.saved_bits "${1#saved}") ;;  # approximate (asi_core.approx, issue 21)
        *) die "unknown DEMO_VARIANTS entry '$1' (recipe frozen_bn standard_aug our_warmup step_schedule saved8 saved4 saved2)" ;;
    esac
}
for seed in ${SEEDS:-0}; do
    for variant in ${DEMO_VARIANTS:-recipe}; do
        variant_args "$variant"
        tag=""; [[ "$variant" != recipe ]] && tag+="_$variant"; [[ "$seed" != 0 ]] && tag+="_s$seed"
        v+=(--seed_everything "$seed" --model.checkpoint "$CKPT")
        for n in ${DEMO_LAYERS:-2 4}; do
            for method in ${DEMO_METHODS:-vanilla gradfilter hosvd asi}; do
                case "$method" in
                    vanilla) fit B mcunet digits vanilla "l$n$tag" --model.num_finetune "$n" "${v[@]}" ;;
                    gradfilter) fit B mcunet digits gradfilter "l${n}_R2$tag" --model.num_finetune "$n" \
                                    --model.radius 2 "${v[@]}" ;;
                    hosvd) fit B mcunet digits hosvd "l${n}_eps0.8$tag" --model.num_finetune "$n" --model.eps 0.8 \
                               "${v[@]}" ;;
                    asi) NEEDS="$PPL" fit B mcunet digits asi "l${n}_hosvd@0.8$tag" --model.num_finetune "$n" \
                             --model.perplexity_file "$PPL" --model.budget hosvd@0.8 "${v[@]}" ;;
                    *) die "unknown DEMO_METHODS entry '$method' (vanilla gradfilter hosvd asi)" ;;
                esac
            done
        done
    done
done

step 4 "report"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "$PYTHON main.py report $RUN_ROOT/setupB --format md --plots $RUN_ROOT"
    echo "$PYTHON main.py report $RUN_ROOT/setupB --format md --mem saved --no_plots true"
    echo "$PYTHON main.py report $RUN_ROOT/setupB --format csv --out $RUN_ROOT/report.csv --no_plots true"
else
    "$PYTHON" main.py report "$RUN_ROOT/setupB" --format md --plots "$RUN_ROOT" | tee "$RUN_ROOT/report.md"
    # the same runs with Mem as what autograd really keeps (under the recipe's trainable BN affine: much more)
    "$PYTHON" main.py report "$RUN_ROOT/setupB" --format md --mem saved --no_plots true | tee "$RUN_ROOT/report_saved.md"
    "$PYTHON" main.py report "$RUN_ROOT/setupB" --format csv --out "$RUN_ROOT/report.csv" --no_plots true
fi
if [[ "${SEEDS:-0}" != 0 || "${DEMO_VARIANTS:-recipe}" != recipe ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "$PYTHON scripts/seeds_table.py $RUN_ROOT/setupB/mcunet/digits"
    else
        "$PYTHON" scripts/seeds_table.py "$RUN_ROOT/setupB/mcunet/digits" | tee "$RUN_ROOT/seeds.md"
    fi
fi
finish
echo
[[ "$DRY_RUN" == 1 ]] && exit 0
echo "Done in $((SECONDS - START)) s. Results: $RUN_ROOT/report.md, $RUN_ROOT/report.csv," \
     "Pareto plots $RUN_ROOT/pareto_*.png, runs under $RUN_ROOT/setupB/mcunet/digits/"

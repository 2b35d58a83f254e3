#!/usr/bin/env bash
# Warm-start ablation (paper Sec. 4.2, Fig. 3): MCUNet with ImageNet weights fine-tuned on CIFAR-10 with ASI at
# increasing depth (fine-tuned layers counted from the end), each with and without warm start
# (--model.warm_start false: a fresh random start of the single subspace iteration at every step).
# Ranks: per layer from the setup-A perplexity table under BUDGET (scripts/perplexity.sh), or RANKS=r for the same
# fixed rank in every mode and layer. Runs: $RUN_ROOT/setupA/<model>/<dataset>/asi/l<n>_<budget|r>[_nowarm]/
#
#   bash scripts/warm_start.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   MODEL=mcunet  DATASET=cifar10  DEPTHS="1 2 3 4 5 6 8 10"  RANKS= (unset: budget)
#
# Expected runtime: 16 CIFAR-10 runs of 50 epochs, about 30-60 min each on one GPU: 8-16 GPU-hours.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

model="${MODEL:-mcunet}"
dataset="${DATASET:-cifar10}"
ppl="$(perplexity_file A "$model")"
for n in ${DEPTHS:-1 2 3 4 5 6 8 10}; do
    for warm in true false; do
        suffix=""
        [[ $warm == false ]] && suffix=_nowarm
        if [[ -n "${RANKS:-}" ]]; then
            fit A "$model" "$dataset" asi "l${n}_r$RANKS$suffix" --model.num_finetune "$n" --model.ranks "$RANKS" \
                --model.warm_start "$warm"
        else
            NEEDS="$ppl" fit A "$model" "$dataset" asi "l${n}_budget$BUDGET$suffix" --model.num_finetune "$n" \
                --model.perplexity_file "$ppl" --model.budget "$BUDGET" --model.warm_start "$warm"
        fi
    done
done
finish

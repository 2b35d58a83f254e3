#!/usr/bin/env bash
# Every experiment of the paper's classification results, in dependency order, then the report:
# setup-B pretraining (skipped where the checkpoint exists), perplexity tables, ASI (setup A and B), baselines,
# warm-start ablation, latency, the Swin-T rows of Table 2; finally `main.py report` writes $RUN_ROOT/report.md and the Pareto PNGs there.
# Each step skips what is done, so re-running resumes.
#
#   bash scripts/paper.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#
# Expected runtime: the sum of the scripts' own estimates, dominated by HOSVD_eps and the ImageNet runs:
# weeks of GPU time. Run the scripts one by one (or narrow MODELS/DATASETS/SETUPS) for anything smaller.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

failed=0
for step in pretrain_setupB perplexity asi_setupA asi_setupB baselines warm_start latency swin_setupA; do
    if ! bash "scripts/$step.sh" "$DATA_ROOT" "$RUN_ROOT"; then
        failed=1
        [[ "$KEEP_GOING" == 1 ]] || exit 1
    fi
done
if [[ "$DRY_RUN" == 1 ]]; then
    _quote "$PYTHON" main.py report "$RUN_ROOT" --out "$RUN_ROOT/report.md"
    printf '%s\n' "$QUOTED"
else
    "$PYTHON" main.py report "$RUN_ROOT" --out "$RUN_ROOT/report.md"
fi
exit "$failed"

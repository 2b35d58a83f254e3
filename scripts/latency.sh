#!/usr/bin/env bash
# Training latency of the four methods (paper Sec. 4.4, Fig. 5): MCUNet, batch 128 at 224x224, ASI ranks 2,
# forward / backward / step times per method measured in one process, interleaved (`main.py benchmark`), for each
# number of fine-tuned layers. Random input: no dataset is read (DATA_ROOT is accepted and unused).
# Output: $RUN_ROOT/latency/<n>.json, the JSON line benchmark prints last on stdout (all its output: <n>.json.log).
#
#   bash scripts/latency.sh [DATA_ROOT [RUN_ROOT]]      DRY_RUN=1 prints the commands; see scripts/common.sh
#   DEPTHS="2 4"  METHODS=vanilla,gradfilter_paper,hosvd,asi (gradfilter_paper: the authors' op)
#
# Expected runtime: a few warm-up and timed steps of 4 methods per depth: about a minute per depth on a GPU,
# 5-20 minutes per depth on a Raspberry-Pi-class CPU (HOSVD's SVDs dominate).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

for n in ${DEPTHS:-2 4}; do
    out="$RUN_ROOT/latency/$n.json"
    run_once "$out" --last-line "$out" -- \
        "$PYTHON" main.py benchmark --config configs/models/mcunet.yaml --model.num_finetune "$n" --model.ranks 2 \
        --data.batch_size 128 --data.resolution 224 --benchmark.methods "${METHODS:-vanilla,gradfilter_paper,hosvd,asi}" "${EXTRA[@]}"
done
finish

# Shared by the sweep scripts (source it, do not run it): arguments, dry run, skip-if-done, failures.
#
#   bash scripts/<sweep>.sh [DATA_ROOT [RUN_ROOT]]      (arguments win over the environment)
#
#   DATA_ROOT    datasets, <DATA_ROOT>/<dataset>/ (default: data)
#   RUN_ROOT     run directories, <RUN_ROOT>/setup<A|B>/<model>/<dataset>/<method>/<exp>/ (default: runs)
#   DRY_RUN=1    print the commands that would run, one a line, to be run from the repository root; run nothing
#   KEEP_GOING=1 after a failed run go on with the next one, and fail at the end (default: stop at once)
#   PYTHON       interpreter (default: .venv/bin/python when it exists, else python3)
#   EXTRA_ARGS   appended to every main.py command, split on spaces, e.g. for a quick pass:
#                EXTRA_ARGS="--trainer.max_epochs 1 --trainer.limit_train_batches 5"
#   OVERWRITE=1  redo fits whose run directory holds a run made with other settings (--overwrite true) instead of
#                failing on them
#   MODELS, DATASETS, SETUPS, LAYERS, ...: each script says which it reads and their defaults.
#
# Done means done with the requested settings, and an interruption costs nothing:
# - a fit is skipped here when its metrics.json says "status": "finished" and the run directory's
#   sweep_command.txt (written after it succeeded) is this very command; otherwise it runs with --resume true, and
#   main.py compares the resolved settings (configs, EXTRA_ARGS, seed, trainer length) with those the run recorded:
#   a finished run with the same settings is left alone, an interrupted one resumes from its checkpoints/last.ckpt,
#   one with other settings is refused with the differences listed (OVERWRITE=1 redoes it);
# - a perplexity table or a benchmark is done when its JSON file exists (measure checks its own settings).
# Every run gets an explicit --exp_name, so the scripts know where its result lands.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths as the commands use them, which run from the repository root: relative to it when inside it, else absolute.
_path() {
    local p="$1"
    [[ "$p" == /* ]] || p="$PWD/$p"
    case "$p" in "$REPO"/*) printf '%s\n' "${p#"$REPO"/}" ;; *) printf '%s\n' "$p" ;; esac
}
DATA_ROOT="$(_path "${1:-${DATA_ROOT:-data}}")"
RUN_ROOT="$(_path "${2:-${RUN_ROOT:-runs}}")"
CKPT_DIR="$(_path "${ASI_CKPT_DIR:-$REPO/ckpts}")"
DRY_RUN="${DRY_RUN:-0}"
KEEP_GOING="${KEEP_GOING:-0}"
# how a fit treats a run directory that already holds a run (see the header)
if [[ "${OVERWRITE:-0}" == 1 ]]; then LIFECYCLE=(--overwrite true); else LIFECYCLE=(--resume true); fi
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The paper's grid (Sec. 4.1, Table 1/2); every list can be narrowed from the environment.
ALL_MODELS="mcunet mobilenet_v2 resnet18 resnet34"
DOWNSTREAM="cifar10 cifar100 cub200 flowers102 pets"
EPSILONS="${EPSILONS:-0.4,0.5,0.6,0.7,0.8,0.9}"   # perplexity thresholds (Sec. 4.1 "Rank Selection")
BUDGET="${BUDGET:-hosvd@0.8}"                      # ASI's memory budget: HOSVD_eps=0.8's peak memory (Sec. 4.1)
N_RAN=0 N_SKIPPED=0 N_FAILED=0
NEEDS=""   # set per call: NEEDS=FILE fit ...
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

die() { echo "error: $*" >&2; exit 2; }

# QUOTED=the arguments shell-quoted where needed (printf %q alone would also escape the commas of 0.4,0.5).
_quote() {
    local a q out=()
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else printf -v q '%q' "$a"; out+=("$q"); fi
    done
    QUOTED="${out[*]}"
}

# is_done FILE COMMAND: the result of a run exists. A metrics.json counts once fit has finished ("status":
# "finished") and when the same COMMAND made it (sweep_command.txt next to it); anything else goes to main.py,
# which compares the resolved settings (see the header).
is_done() {
    [[ -s "$1" ]] || return 1
    [[ "$(basename "$1")" == metrics.json ]] || return 0
    grep -q '"status": "finished"' "$1" || return 1
    local marker
    marker="$(dirname "$1")/sweep_command.txt"
    [[ -f "$marker" && "$(cat "$marker")" == "$2" ]]
}

# run_once DONE_FILE [--last-line FILE] [--needs FILE] -- CMD...
# Run CMD from the repository root unless DONE_FILE shows it already ran. --last-line: the last line CMD prints
# on stdout is the result (the JSON of `main.py benchmark`), written to FILE only when CMD succeeds; all of its
# output is shown and kept in FILE.log. --needs: an input another sweep makes (a perplexity table, a checkpoint);
# missing, the run fails with that said.
run_once() {
    local done_file="$1" stdout="" needs=""
    shift
    while [[ "$1" != -- ]]; do
        case "$1" in
            --last-line) stdout="$2"; shift 2 ;;
            --needs) needs="$2"; shift 2 ;;
            *) die "run_once: unknown option $1" ;;
        esac
    done
    shift
    _quote "$@"
    if is_done "$done_file" "$QUOTED"; then
        echo "skip (done): $done_file" >&2
        N_SKIPPED=$((N_SKIPPED + 1))
        return 0
    fi
    local command="$QUOTED" shown="$QUOTED${stdout:+ | tail -n 1 > $stdout}"
    if [[ "$DRY_RUN" == 1 ]]; then
        [[ -z "$needs" || -e "$needs" ]] || echo "# needs $needs, which does not exist yet" >&2
        printf '%s\n' "$shown"
        N_RAN=$((N_RAN + 1))
        return 0
    fi
    local rc=0
    if [[ -n "$needs" && ! -e "$needs" ]]; then
        echo "error: $needs does not exist; make it first (scripts/perplexity.sh for perplexity tables," \
             "scripts/pretrain_setupB.sh for setup-B checkpoints). Not run: $shown" >&2
        rc=3
    else
        echo "==> $shown" >&2
        if [[ -n "$stdout" ]]; then
            mkdir -p "$(dirname "$stdout")"
            { "$@" | tee "$stdout.log" >&2 && tail -n 1 "$stdout.log" > "$stdout.tmp" && mv "$stdout.tmp" "$stdout"; } ||
                { rc=$?; rm -f "$stdout.tmp"; }
        else
            "$@" || rc=$?
        fi
    fi
    if [[ $rc == 0 ]]; then
        N_RAN=$((N_RAN + 1))
        if [[ "$(basename "$done_file")" == metrics.json && -s "$done_file" ]]; then
            printf '%s\n' "$command" > "$(dirname "$done_file")/sweep_command.txt"
        fi
        is_done "$done_file" "$command" || echo "warning: the run ended but $done_file does not show it finished" >&2
        return 0
    fi
    N_FAILED=$((N_FAILED + 1))
    echo "FAILED (exit $rc): $shown" >&2
    [[ "$KEEP_GOING" == 1 ]] || exit "$rc"
}

# RECIPE[SETUP]: the fine-tuning recipe of a setup (A: ImageNet weights -> downstream; B: half 1 -> half 2).
declare -A RECIPE=([A]=configs/recipes/setupA.yaml [B]=configs/recipes/setupB_finetune.yaml)
recipe() { [[ -n "${RECIPE[$1]:-}" ]] || die "unknown setup '$1' (A or B)"; printf '%s\n' "${RECIPE[$1]}"; }

# fit SETUP MODEL DATASET METHOD EXP [ARGS...]: one fine-tuning run, in RUN_ROOT/setup<S>/<model>/<dataset>/<method>/<exp>/.
# NEEDS=FILE fit ... : the run needs FILE (see run_once --needs).
fit() {
    local setup="$1" model="$2" dataset="$3" method="$4" exp="$5"
    shift 5
    [[ -n "${RECIPE[$setup]:-}" ]] || die "unknown setup '$setup' (A or B)"
    run_once "$RUN_ROOT/setup$setup/$model/$dataset/$method/$exp/metrics.json" ${NEEDS:+--needs "$NEEDS"} -- \
        "$PYTHON" main.py fit --config "${RECIPE[$setup]}" --config "configs/models/$model.yaml" \
        --config "configs/data/$dataset.yaml" --data.root "$DATA_ROOT" --run_root "$RUN_ROOT" "${LIFECYCLE[@]}" \
        --exp_name "$exp" --model.method "$method" "$@" "${EXTRA[@]}"
}

# perplexity_file SETUP MODEL: the table scripts/perplexity.sh measures, which ASI's budgeted runs read.
# Setup A measures the ImageNet-pretrained model on ImageNet (one table per model, for every downstream dataset);
# setup B the half-1 checkpoint on ImageNet half 2. `main.py measure --exp_name E` writes it to
# <run_root>/setup<S>/<model>/<dataset>/measure/E/perplexity.json.
PPL_EXP="${PPL_EXP:-paper}"
PPL_DATASET="${PPL_DATASET:-imagenet}"
perplexity_file() { printf '%s\n' "$RUN_ROOT/setup$1/$2/$PPL_DATASET/measure/$PPL_EXP/perplexity.json"; }

# finish: the tally; non-zero when a run failed (with KEEP_GOING=1).
finish() {
    local what="ran"
    [[ "$DRY_RUN" == 1 ]] && what="to run"
    echo "$(basename "$0"): $N_RAN $what, $N_SKIPPED skipped (done), $N_FAILED failed" >&2
    [[ $N_FAILED == 0 ]]
}

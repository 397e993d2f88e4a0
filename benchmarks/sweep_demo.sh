#!/bin/sh
# The demo-budget sweep of docs/BENCHMARKS.md ("What makes the gain over the baseline largest"):
#   benchmarks/sweep_demo.sh DB OUT NAME [--set KEY=VALUE ...]
# trains configs/tiny.yaml with the given --set overrides into OUT/NAME and its baseline of the same
# shape (configs/tiny-baseline.yaml with the same overrides, CCA-only keys dropped) into
# OUT/base-<overrides> (reused when another config needs the same one), then writes
# OUT/NAME.json: retro.evaluate with --control --baseline --overlap. One thread, nice 10: the
# machine is shared. Every step resumes (re-run the same command after a crash).
set -eu
db=$1 out=$2 name=$3
shift 3
py=${PY:-python}
base_sets="" key="base"
for arg in "$@"; do
    case "$arg" in
        --set) ;;
        model.cca_layers=*|model.num_neighbours=*|model.enc_*|retrieval_dropout=*) ;;  # RETRO-only
        *) base_sets="$base_sets --set $arg"; key="$key-$(echo "$arg" | tr -c 'A-Za-z0-9.=\n' '_')" ;;
    esac
done
train() {  # train CONFIG RUN [--set ...]: fresh, or resumed from the run's latest checkpoint
    cfg=$1 run=$2
    shift 2
    if [ -e "$run/checkpoints/latest" ]; then
        OMP_NUM_THREADS=1 nice -n 10 "$py" train.py --db "$db" --out "$run" --resume
    else
        OMP_NUM_THREADS=1 nice -n 10 "$py" train.py --config "$cfg" --db "$db" --out "$run" "$@"
    fi
}
mkdir -p "$out"
# shellcheck disable=SC2086
train configs/tiny-baseline.yaml "$out/$key" $base_sets
train configs/tiny.yaml "$out/$name" "$@"
OMP_NUM_THREADS=1 nice -n 10 "$py" -m retro.evaluate --run "$out/$name" --db "$db" --control \
    --baseline "$out/$key" --overlap --no-progress > "$out/$name.json"

#!/bin/bash
# Issue 21 low-overlap experiments at the random sweep's x10 DB, seed 0 (run beside the sweep's x10 trainings).
set -e
cd REPO
PY=.venv/bin/python
DB=WORK/db
R=OUT
COMMON="--config configs/tiny.yaml --set model.neighbour_alignment=content --set model.neighbour_min_match=0.5 --set max_steps=1200 --set eval_every=300 --set checkpoint_every=120 --set seed=0"
run_fit() {
  OMP_NUM_THREADS=1 $PY train.py --db $DB --out $R/retrofit-zero-null $COMMON --set model.cca_null_value=zero \
    --set init_from=WORK/runs/baseline-seed0 --set freeze_decoder=true --set retrieval_dropout=0.0 > $R/retrofit-zero-null.log 2>&1 || \
  OMP_NUM_THREADS=1 $PY train.py --db $DB --out $R/retrofit-zero-null --resume >> $R/retrofit-zero-null.log 2>&1
  OMP_NUM_THREADS=1 $PY -m retro.evaluate --run $R/retrofit-zero-null --db $DB --split val --baseline WORK/runs/baseline-seed0 --control --overlap --no-progress > $R/retrofit-zero-null.json 2> $R/retrofit-zero-null.eval.log
}
run_drop() {
  OMP_NUM_THREADS=1 $PY train.py --db $DB --out $R/retro-chunk-drop03 $COMMON --set retrieval_dropout=0.3 --set retrieval_dropout_unit=chunk > $R/retro-chunk-drop03.log 2>&1 || \
  OMP_NUM_THREADS=1 $PY train.py --db $DB --out $R/retro-chunk-drop03 --resume >> $R/retro-chunk-drop03.log 2>&1
  OMP_NUM_THREADS=1 $PY -m retro.evaluate --run $R/retro-chunk-drop03 --db $DB --split val --baseline WORK/runs/baseline-seed0 --control --overlap --no-progress > $R/retro-chunk-drop03.json 2> $R/retro-chunk-drop03.eval.log
}
run_fit & run_drop & wait
echo done

# Evaluation-only: the sweep's trained x100 runs, scored with model.neighbour_min_match 0.8 instead
# of the 0.5 they trained with (2026-12-07, this 2-core CPU, about 90 s a run). retro.evaluate has
# no option for it yet, so each run was copied (checkpoint hard-linked, state.json copied) and the
# value edited in the copy's config.yaml and checkpoint state.json.
for run in retro-x100-seed0 retro-x100-seed1 retro-x100-seed2 retrofit-x100-seed0 retrofit-x100-seed1 retrofit-x100-seed2; do
  s=${run##*seed}
  python -m retro.evaluate --run COPIES/$run-mm0.8 --db WORK/db --split val \
      --baseline WORK/runs/baseline-seed$s --overlap --no-progress > $run.txt
done

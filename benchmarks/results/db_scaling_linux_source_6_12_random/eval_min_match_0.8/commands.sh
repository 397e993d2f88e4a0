# Evaluation-only: the sweep's trained x100 runs, scored with model.neighbour_min_match 0.8 instead
# of the 0.5 they trained with (the same weights; 2026-12-07, this 2-core CPU, about 90 s a run).
for run in retro-x100-seed0 retro-x100-seed1 retro-x100-seed2 retrofit-x100-seed0 retrofit-x100-seed1 retrofit-x100-seed2; do
  s=${run##*seed}
  python -m retro.evaluate --run WORK/runs/$run --db WORK/db --split val --neighbour-min-match 0.8 \
      --baseline WORK/runs/baseline-seed$s --overlap --no-progress > $run.txt
done
# These rows were first made before retro.evaluate had --neighbour-min-match: each run copied
# (checkpoint hard-linked, state.json copied) and the value edited in the copy's config.yaml and
# checkpoint state.json, hence "run": "COPIES/...-mm0.8" in them. The command above gives the same
# numbers bit for bit (checked on retrofit-x100-seed0: every bits-per-byte value and bucket equal).

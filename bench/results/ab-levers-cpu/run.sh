#!/usr/bin/env bash
# run.sh NAME [train flags...]: one fixed-epoch A/B run, its final.pt scored apart from the run.
# Run from the repository root with the venv active: bench/results/ab-levers-cpu/run.sh q-dirac --preset cpu --width 0.25 --epochs 5 --dirac
set -eu
name=$1; shift
data=${FASTMBV1_DATA:-../shared/datasets/cifar10/cifar-10-python.tar.gz}
out=bench/results/ab-levers-cpu/$name
python -m fastmbv1 train --device cpu --data "$data" --budget 100000 --eval-every 1000 \
    --checkpoint-every 0 --seed 0 "$@" --out "$out" > "$out.log" 2>&1
python bench/independent_score.py "$out" "$data" > "$out/independent.json"
python - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
ind = json.load(open(out + "/independent.json"))
ips = statistics.median(json.loads(line)["images_per_s"] for line in open(out + "/metrics.jsonl"))
print(f"{out.split('/')[-1]:28s} independent {ind['independent_test_acc']:.2f}  img/s {ips:,.0f}")
PY

#!/usr/bin/env bash
# Train the three-source model and its leave-one-source-out twin on a lent GPU machine, in one
# call (docs/training.md, "With a lent GPU"). Run from the repository root there.
#
# Why this shape: the machine is lent for minutes, cannot see ../shared and has no TensorFlow,
# but it has JAX, and the models are written with keras.ops only, so Keras 3 runs them on
# JAX's GPU backend unchanged (PyTorch's if JAX cannot start). Its model.keras files load in
# TensorFlow here, where calibration and evaluation run from the original files.
#
# Inputs (carried):  .carry/pack.npz      python -m train ... --pack-to (training set as fitted + val)
#                    .carry/init.keras    an uncompiled core with ImageNet backbone weights
#                    .whl/*.whl           keras and the two packages of it the machine lacks
# Each recipe of RECIPES runs twice, in parallel processes: on every source, and with
# LEAVE_OUT's training and validation crops left out (the twin).
# Outputs ($OUT):    NAME.keras per run (no optimizer state), runs.tar.gz (histories, run.json,
#                    logs), and each run's last lines in this script's own output.
set -uo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
RECIPES=${RECIPES:-"a"}
LEAVE_OUT=${LEAVE_OUT:-DeepAPL}
EPOCHS=${EPOCHS:-30}
BUDGET_MIN=${BUDGET_MIN:-6}
WORKERS=${WORKERS:-3}
RUNS=${RUNS:-/tmp/gpu-runs}

if [ "${WHEELS:-.whl}" != none ]; then  # WHEELS=none: keras is installed already (a local rehearsal)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

smoke='import keras, numpy as np, cv2
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]); m.compile("adam", "mse")
m.fit(np.zeros((8, 4)), np.zeros((8, 2)), verbose=0)
ok, enc = cv2.imencode(".webp", np.zeros((8, 8, 3), np.uint8)); cv2.imdecode(enc, cv2.IMREAD_COLOR)
print(keras.backend.backend(), keras.__version__)'
export KERAS_BACKEND=jax
if ! python3 -c "$smoke"; then
  echo "JAX backend failed its smoke test; using PyTorch"
  export KERAS_BACKEND=torch
  python3 -c "$smoke" || exit 4
fi
python3 -c 'import jax; print(jax.devices())' 2>/dev/null

recipe_args() {  # the recipes; the selection between them is by validation accuracy only
  case $1 in
    a) echo "--freeze-blocks 0 --lr 1e-3 --fine-tune-lr 5e-4" ;;
    b) echo "--freeze-blocks 0 --lr 1e-3 --fine-tune-lr 2e-4" ;;
    c) echo "--freeze-blocks 5 --lr 1e-3 --fine-tune-lr 5e-4" ;;
    *) echo "unknown recipe $1" >&2; return 1 ;;
  esac
}

mkdir -p "$RUNS"
pids=()
for r in $RECIPES; do
  args=$(recipe_args "$r") || exit 2
  for twin in 0 1; do
    name="v8$r"; extra=""
    if [ "$twin" = 1 ]; then name="v8$r-twin"; extra="--leave-out-source $LEAVE_OUT"; fi
    # shellcheck disable=SC2086
    timeout $((BUDGET_MIN * 60 + 150)) python3 -m train --data .carry/pack.npz --out "$RUNS/$name" \
      --backbone efficientnet_lite0 --weights none --init-from .carry/init.keras --size 144 \
      --epochs "$EPOCHS" --freeze-epochs 1 --lr-schedule cosine --patience 100 --head-dense 0 \
      --augment-workers "$WORKERS" --time-budget-min "$BUDGET_MIN" --train-only $args $extra \
      > "$RUNS/$name.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done

for d in "$RUNS"/*/; do
  name=$(basename "$d")
  echo "== $name"; grep -v "^I0000\|^W0000\|WARNING" "$RUNS/$name.log" | tail -4
  # a run cut off by the timeout left KeepBest's copy, optimizer state included: slim it
  [ -f "$d/model.keras" ] && python3 -c 'import sys, keras, train.layers
keras.saving.load_model(sys.argv[1], compile=False).save(sys.argv[2])' "$d/model.keras" "$OUT/$name.keras"
done
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.keras' --exclude=backup .
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU batch: lanes of work that needs more than 2 CPU cores, run side by side on one GPU machine (16 cores)
# within a fixed deadline. The accuracy comparison runs only through the fair benchmark harness
# (`dynprune bench`, configs/bench/*.yaml): one lane per benchmark config, JOBS points at a time on the one GPU
# (MPS), every point resumable, so a cut-off batch keeps what finished and the next session carries RUNS back
# in. Results and the runs folder are packed into $OUT/results.tgz every 20 s.
#
#   OUT=/tmp/out DATA=.devdata bash experiments/gpu_batch.sh                  # LANES=bench_full
#   LANES="bench_full" RUNS=runs/bench JOBS=12 DEADLINE=550 OUT=... bash experiments/gpu_batch.sh
#   LANES="dc_resnet20 dc_lenet5_a" OUT=... bash experiments/gpu_batch.sh    # Deep Compression lanes
#   SMOKE=1 DEVICE=cpu OUT=/tmp/out DATA=.devdata bash experiments/gpu_batch.sh   # tiny local check (CI config)
#
# DATA holds the four Fashion-MNIST IDX gz files (linked to the configs' data_dir when that is missing);
# WHEELS (default .whl) holds wheels of packages the machine lacks (torch-pruning); RUNS (default runs/bench)
# is the harness's --root: carry it to the machine and back to resume.
set -u
OUT=${OUT:?set OUT}; DATA=${DATA:-.devdata}; WHEELS=${WHEELS:-.whl}; DEADLINE=${DEADLINE:-470}
DEVICE=${DEVICE:-cuda}; LANES=${LANES:-bench_full}; SMOKE=${SMOKE:-0}; WORK=${WORK:-/tmp/gpu_batch}; PY=${PY:-python3}
RUNS=${RUNS:-runs/bench}; JOBS=${JOBS:-12}; FMNIST=/usr/share/datasets/fashion-mnist
START=$(date +%s)
mkdir -p "$WORK" "$OUT" "$RUNS"
if [ ! -d "$FMNIST" ] && [ -d "$DATA" ]; then mkdir -p "$(dirname "$FMNIST")" && ln -s "$(realpath "$DATA")" "$FMNIST"; fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ACCEL=gpu; [ "$DEVICE" = cpu ] && ACCEL=cpu
if [ "$DEVICE" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
  # MPS lets the lanes' small kernels share the GPU instead of time-slicing whole contexts.
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p /tmp/mps /tmp/mps_log
  if nvidia-cuda-mps-control -d && timeout 90 $PY -c "import torch; print(torch.ones(2, device='cuda').sum().item())"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS off"
  fi
fi
$PY -c "import torch, lightning, torch_pruning; print('torch', torch.__version__, 'lightning', lightning.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || exit 1

pack() { tar czf "$OUT/.results.tgz" -C "$WORK" . -C "$(realpath "$RUNS")/.." "$(basename "$RUNS")" 2>/dev/null \
  && mv "$OUT/.results.tgz" "$OUT/results.tgz"; }
(while sleep 20; do pack; done) & PACKER=$!
left() { local s=$((DEADLINE - ($(date +%s) - START))); [ "$s" -lt 1 ] && s=1; echo "$s"; }

BENCH="-m dynprune bench --root $RUNS --out $WORK --jobs $JOBS --accelerator $ACCEL"
DC="experiments/deep_compression.py --data-dir $DATA --device $DEVICE --threads 1 --out $WORK"
TINY_DC=""
if [ "$SMOKE" = 1 ]; then
  LANES=${LANES//bench_full/bench_ci}
  TINY_DC="--train-subset 300 --epochs 1 --prune-epochs 0 --final-epochs 0 --quant-epochs 0 --prune-start 0.9"
fi
want() { [[ " $LANES " == *" $1 "* ]]; }
lane() { local name=$1; shift; want "$name" || return 0; timeout "$(left)" "$@" > "$WORK/$name.log" 2>&1; echo "lane $name: exit $? at $(( $(date +%s) - START )) s"; }
LENET5_A='{"features.0": 0.5, "features.3": 0.87, "classifier.1": 0.97, "classifier.3": 0.94, "classifier.5": 0.8}'
# The fair benchmark: every accuracy comparison of the README comes from these lanes (and the CPU runs of
# configs/bench/resnet20_reduced.yaml).
lane bench_full $PY $BENCH configs/bench/resnet20_full.yaml &
lane bench_reduced $PY $BENCH configs/bench/resnet20_reduced.yaml &
lane bench_ci $PY $BENCH configs/bench/ci_tiny.yaml &
lane dc_lenet5_a $PY $DC --models lenet5 --tag _gpu_a --epochs 15 --prune-epochs 3 --final-epochs 10 --quant-epochs 5 \
  --sparsity "$LENET5_A" $TINY_DC &
lane dc_lenet5_b $PY $DC --models lenet5 --tag _gpu_b --epochs 15 --prune-epochs 3 --final-epochs 10 --quant-epochs 5 \
  --sparsity "$LENET5_A" --fc-bits 4 $TINY_DC &
lane dc_resnet20 $PY $DC --models resnet20 --tag _gpu --epochs 8 --conv-bits 6 $TINY_DC &
wait $(jobs -p | grep -v "^$PACKER$")
kill $PACKER 2>/dev/null
pack
echo "done at $(( $(date +%s) - START )) s"
ls -la "$WORK"

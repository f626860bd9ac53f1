#!/usr/bin/env bash
# The GPU batch behind the *_gpu results: every lane of experiments/ that needs more compute than 2 CPU
# cores, run side by side on one GPU machine (16 cores) within a fixed deadline; each lane writes its
# tables as runs finish, and the results are packed into $OUT/results.tgz every 20 s (a cut-off run
# still returns what finished).
#
#   OUT=/tmp/out DATA=.devdata bash experiments/gpu_batch.sh          # on the GPU machine (LANES=batch2)
#   LANES="batch1" OUT=... bash experiments/gpu_batch.sh               # the first batch (*_gpu tables)
#   LANES="batch3" DEADLINE=230 OUT=... bash experiments/gpu_batch.sh  # the third (policy after its fix)
#   LANES="batch4" DEADLINE=550 OUT=... bash experiments/gpu_batch.sh  # the fourth (3 seeds, shaping at N = 16)
#   LANES="batch5" DEADLINE=480 OUT=... bash experiments/gpu_batch.sh  # the fifth (batch shaping 1; its
#     N = 16 runs need more than 375 s: a first try at DEADLINE=395 finished none)
#   LANES="dc_resnet20 dc_lenet5_a" OUT=... bash experiments/gpu_batch.sh   # only these lanes
#   SMOKE=1 DEVICE=cpu OUT=/tmp/out DATA=.devdata bash experiments/gpu_batch.sh   # tiny local check
#
# DATA holds the four Fashion-MNIST IDX gz files and optionally dense.ckpt (iso_flops.py --save-dense);
# WHEELS (default .whl) holds wheels of packages the machine lacks (torch-pruning).
set -u
OUT=${OUT:?set OUT}; DATA=${DATA:-.devdata}; WHEELS=${WHEELS:-.whl}; DEADLINE=${DEADLINE:-470}
DEVICE=${DEVICE:-cuda}; LANES=${LANES:-batch2}; SMOKE=${SMOKE:-0}; WORK=${WORK:-/tmp/gpu_batch}; PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$WORK" "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GPU=gpu; [ "$DEVICE" = cpu ] && GPU=cpu
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

pack() { tar czf "$OUT/.results.tgz" -C "$WORK" . 2>/dev/null && mv "$OUT/.results.tgz" "$OUT/results.tgz"; }
(while sleep 20; do pack; done) & PACKER=$!
left() { local s=$((DEADLINE - ($(date +%s) - START))); [ "$s" -lt 1 ] && s=1; echo "$s"; }

ISO="experiments/iso_flops.py --data-dir $DATA --device $DEVICE --threads 1 --out $WORK"
DC="experiments/deep_compression.py --data-dir $DATA --device $DEVICE --threads 1 --out $WORK"
SLIM="experiments/slimmable.py --data-dir $DATA --device $GPU --threads 1 --out $WORK --train-subset 0 --test-subset 0"
TINY_ISO=""; TINY_DC=""; TINY_SLIM=""
if [ "$SMOKE" = 1 ]; then
  TINY_ISO="--train-subset 300 --finetune-epochs 1 --epochs 1 --ratios 2"
  TINY_DC="--train-subset 300 --epochs 1 --prune-epochs 0 --final-epochs 0 --quant-epochs 0 --prune-start 0.9"
  TINY_SLIM="--train-subset 300 --test-subset 200 --epochs 1"
fi
BATCH1="dc_lenet5_a dc_lenet5_b dc_resnet20 slim_supernet slim_thin iso_s0 iso_s12 iso_n16"
BATCH2="iso_r8_n16 iso_r8_n16_s12 iso_r4_n16 iso_full_l1_policy"
BATCH3="iso_policy"
BATCH4="iso_r8_best_s12 iso_r8_shaping3 iso_r8_shaping2 iso_r4_shaping3 iso_r4_n16_s12"
BATCH5="iso_shaping1"
for b in 1 2 3 4 5; do batch_lanes="BATCH$b"; LANES=${LANES//batch$b/${!batch_lanes}}; done
want() { [[ " $LANES " == *" $1 "* ]]; }
lane() { local name=$1; shift; want "$name" || return 0; timeout "$(left)" "$@" > "$WORK/$name.log" 2>&1; echo "lane $name: exit $? at $(( $(date +%s) - START )) s"; }
LENET5_A='{"features.0": 0.5, "features.3": 0.87, "classifier.1": 0.97, "classifier.3": 0.94, "classifier.5": 0.8}'
# Lanes that need no dense ResNet-20 start first; the iso-FLOPs lanes wait for it.
lane dc_lenet5_a $PY $DC --models lenet5 --tag _gpu_a --epochs 15 --prune-epochs 3 --final-epochs 10 --quant-epochs 5 \
  --sparsity "$LENET5_A" $TINY_DC &
lane dc_lenet5_b $PY $DC --models lenet5 --tag _gpu_b --epochs 15 --prune-epochs 3 --final-epochs 10 --quant-epochs 5 \
  --sparsity "$LENET5_A" --fc-bits 4 $TINY_DC &
lane dc_resnet20 $PY $DC --models resnet20 --tag _gpu --epochs 8 --conv-bits 6 $TINY_DC &
lane slim_supernet $PY $SLIM --epochs 8 --part supernet $TINY_SLIM &
lane slim_thin $PY $SLIM --epochs 8 --part thin $TINY_SLIM &
DENSE="$DATA/dense.ckpt"
if [ ! -f "$DENSE" ] && [[ " $LANES " == *" iso_"* ]]; then  # every iso_* lane starts from it
  DENSE="$WORK/dense.ckpt"
  timeout "$(left)" $PY $ISO --save-dense "$DENSE" --seeds 0 $TINY_ISO > "$WORK/dense.log" 2>&1
fi
lane iso_s0 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 4 8 2 --workers 6 --tag _gpu_s0 \
  --variants sigmoid+kd+shaping block+channel+kd block+channel+kd+shaping sigmoid l1 gumbel policy block width \
  $TINY_ISO &
lane iso_s12 $PY $ISO --dense-ckpt "$DENSE" --seeds 1 2 --ratios 4 8 --workers 3 --tag _gpu_s12 \
  --variants sigmoid+kd+shaping block+channel+kd $TINY_ISO &
lane iso_n16 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 4 --workers 2 --tag _gpu_n16 \
  --variants sigmoid+kd+shaping --finetune-epochs 16 $TINY_ISO &
# Batch 2: the longer schedule N = 16 at 8x for static and dynamic alike, N = 16 with the logit penalty at 4x,
# and the full-data rows of l1 and policy.
lane iso_r8_n16 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 8 --workers 4 --tag _gpu_r8_n16 \
  --variants block+channel+kd+shaping sigmoid+kd+shaping block+channel+kd --finetune-epochs 16 $TINY_ISO &
lane iso_r8_n16_s12 $PY $ISO --dense-ckpt "$DENSE" --seeds 1 2 --ratios 8 --workers 4 --tag _gpu_r8_n16_s12 \
  --variants block+channel+kd+shaping --finetune-epochs 16 $TINY_ISO &
lane iso_r4_n16 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 4 --workers 2 --tag _gpu_r4_n16 --skip-static \
  --variants sigmoid+kd+logit0.03 block+channel+kd+shaping --finetune-epochs 16 $TINY_ISO &
lane iso_full_l1_policy $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 4 8 --workers 2 --tag _gpu_l1_policy \
  --skip-static --variants l1+hard0.5 policy l1 $TINY_ISO &
# Batch 3: the policy family after its fix (inward gradient beyond the clamp, unit-RMS advantage), full data.
lane iso_policy $PY $ISO --dense-ckpt "$DENSE" --seeds 0 1 --ratios 2 4 8 --workers 6 --tag _gpu_policy \
  --skip-static --variants policy $TINY_ISO &
# Batch 4: the best N = 16 rows to 3 seeds (4x with static), and the stronger batch shaping (weight 3 or 2,
# decaying over 80% of training) on all the data at N = 16.
lane iso_r8_best_s12 $PY $ISO --dense-ckpt "$DENSE" --seeds 1 2 --ratios 8 --workers 2 --tag _gpu_r8_best_s12 \
  --variants sigmoid+kd+shaping --finetune-epochs 16 --skip-static $TINY_ISO &
lane iso_r8_shaping3 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 1 2 --ratios 8 --workers 3 --tag _gpu_r8_shaping3 \
  --variants sigmoid+kd+shaping3 --finetune-epochs 16 --skip-static $TINY_ISO &
lane iso_r8_shaping2 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 --ratios 8 --workers 1 --tag _gpu_r8_shaping2 \
  --variants sigmoid+kd+shaping2 --finetune-epochs 16 --skip-static $TINY_ISO &
lane iso_r4_shaping3 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 1 2 --ratios 4 --workers 3 --tag _gpu_r4_shaping3 \
  --variants sigmoid+kd+shaping3 --finetune-epochs 16 --skip-static $TINY_ISO &
lane iso_r4_n16_s12 $PY $ISO --dense-ckpt "$DENSE" --seeds 1 2 --ratios 4 --workers 4 --tag _gpu_r4_n16_s12 \
  --variants sigmoid+kd+shaping --finetune-epochs 16 $TINY_ISO &
# Batch 5: batch shaping between the two (weight 1, decaying over the first half), 4x and 8x, N = 16.
lane iso_shaping1 $PY $ISO --dense-ckpt "$DENSE" --seeds 0 1 2 --ratios 4 8 --workers 6 --tag _gpu_shaping1 \
  --variants sigmoid+kd+shaping1 --finetune-epochs 16 --skip-static $TINY_ISO &
wait $(jobs -p | grep -v "^$PACKER$")
kill $PACKER 2>/dev/null
pack
echo "done at $(( $(date +%s) - START )) s"
ls -la "$WORK"

#!/usr/bin/env bash
# One GPU run: install the wheels in .whl/, then run PART. Outputs land under $OUT (tarred).
# Usage (repo root, wheels in .whl/): bash benchmarks/device.sh PART [args]
#   env      versions of what is there
#   train    train the tiny model (args go to tools.train_tiny); weights and report in $OUT/train.tgz
#   gates    the equivalence gates on cuda
#   attn     benchmarks/attn_bench.py ARGS (attention kernels at SAM's shapes)
#   peer     benchmarks/peer_side_by_side.py ARGS (official vs segment-anything-fast vs samrepro)
#   ablate   samrepro ablate ARGS (no tracking; results logged to MLflow afterwards with `samrepro log`)
#   bench    the GPU microbenchmarks (benchmarks/micro -m cuda); the JSON in $OUT is this GPU's baseline to commit
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -e /tmp/site/.done ]; then  # once per machine, so parts can run side by side
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD/src
part=$1; shift
case $part in
  env)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch,triton,torchvision,torchao,segment_anything as s;print(torch.__version__,triton.__version__,torchvision.__version__,torchao.__version__,torch.cuda.get_device_name())"
    ;;
  train)
    python3 -m tools.train_tiny --device cuda --out /tmp/train/weights --report-dir /tmp/train/tiny-training "$@" 2>&1 \
      | tee "$OUT/train.log"
    tar czf "$OUT/train.tgz" -C /tmp/train .
    ;;
  gates)
    python3 -m pytest -q -p no:cacheprovider tests/test_gates.py tests/test_gates_can_fail.py tests/test_sync_free_cuda.py \
      --device cuda "$@" 2>&1 | tee -a "$OUT/gates.log"
    ;;
  ablate)
    timeout "${ABLATE_TIMEOUT_S:-100000}" python3 -m samrepro.cli ablate "$@" --no-track 2>&1 | tee "$OUT/ablate.log"
    # StepResults, specs, logs, report; not the data cache or the fp32 masks (baseline.pt: too big to come back)
    # nor CUDA memory snapshots (tens of MiB each; the return limit is 16 MiB per file)
    tar czf "$OUT/results.tgz" --exclude=baseline.pt --exclude=results/data --exclude='*.memory.pickle' results
    ;;
  attn)
    python3 benchmarks/attn_bench.py --out "$OUT/attn_bench.json" "$@" 2>&1 | tee "$OUT/attn_bench.log"
    ;;
  peer)  # needs the segment-anything-fast checkout in .peer/ (carried); see benchmarks/peer_side_by_side.py
    # SAF's flash_4 autotune choice comes back in $OUT/saf_configs/; copied here into .peer/saf_configs/, the next
    # call reuses it instead of autotuning again (2-4 minutes on an H100)
    mkdir -p "$OUT/saf_configs"; cp .peer/saf_configs/* "$OUT/saf_configs/" 2>/dev/null
    python3 benchmarks/peer_side_by_side.py --saf-dir .peer/segment-anything-fast --saf-configs-dir "$OUT/saf_configs" \
      --out "$OUT/peer.json" "$@" 2>&1 | tee "$OUT/peer.log"
    ;;
  bench)  # the baseline's file name for this GPU and the timing options `nox -s bench` uses too
    found=$(python3 benchmarks/micro/baseline.py cuda) || exit 1
    mapfile -t run <<<"$found"  # the baseline's path, then the timing options
    python3 -m pytest -p no:cacheprovider "${run[@]:1}" --benchmark-json="$OUT/$(basename "${run[0]}")" "$@" 2>&1 \
      | tee "$OUT/bench.log"
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac

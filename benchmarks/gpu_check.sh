#!/usr/bin/env bash
# The GPU path checked for real, on a machine with CUDA (CI has none, and skips these):
#   1. the tests' merge tests with --device cuda (every method on every family, MoE layouts,
#      outputs loaded and run in transformers; tensors over the memory budget in blocks);
#   2. every method merged on the GPU and on the CPU, compared tensor by tensor (gpu_check.py);
#   3. a timed merge of the 1.1B family on the GPU (merge_bench.py).
#     bash benchmarks/gpu_check.sh [DEVICE]    # default cuda; cpu checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
python3 -c "import torch, sys; sys.exit(0 if '$device' == 'cpu' or torch.cuda.is_available() else 'no CUDA device')"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
python3 -m pytest -q --device "$device" tests/test_architectures.py tests/test_merge.py \
    tests/test_memory.py -k "every_method or moe_layouts or loads_in_transformers or any_device"
python3 benchmarks/gpu_check.py --device "$device"
python3 benchmarks/merge_bench.py --size 1b --device "$device" --repeat 1 \
    --methods linear,ties,dare_ties,della,slerp,hierarchical

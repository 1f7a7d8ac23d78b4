#!/usr/bin/env bash
# The GPU checks in one pass, for a CUDA machine whose python3 already has torch and triton (no Ray, no
# registry needed): the GPU tests, then the kernels, lowprec and dit bench suites, each under its own time
# limit so one slow stage cannot hide the others' results.
#
#   bash scripts/gpu_check.sh OUT_DIR        # writes OUT_DIR/{env.txt,pytest.log,<suite>.json,<suite>.md}
#
# Wheels in .whl/ (diffusers for the dit baseline) are installed to /tmp/site first when present.
set -uo pipefail
out=${1:-bench/out/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cc', torch.cuda.get_device_capability())"
} 2>&1 | tee "$out/env.txt"

timeout "${GPU_CHECK_PYTEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs -s tests/gpu 2>&1 \
    | tee "$out/pytest.log"

bench() {  # bench SUITE LIMIT_S [--quick]
    local suite=$1 limit=$2 quick=${3:-}
    timeout "$limit" python3 -c "
import sys
from bench.run import main
sys.exit(main(['$suite'], quick=bool('$quick'), out='$out/$suite.json'))
" 2>&1 | tail -40
}
bench kernels "${GPU_CHECK_KERNELS_S:-60}" --quick
bench lowprec "${GPU_CHECK_LOWPREC_S:-110}"
bench dit "${GPU_CHECK_DIT_S:-170}" --quick

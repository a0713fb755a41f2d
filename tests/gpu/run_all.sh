#!/usr/bin/env bash
# On a CUDA machine: every GPU test and every pipeline's bench; results into the folder given.
#   bash tests/gpu/run_all.sh <results-folder>
set -uo pipefail
out=${1:?usage: tests/gpu/run_all.sh <results-folder>}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
py=${PYTHON:-python}
export LIGHTYARD_HOME=${LIGHTYARD_HOME:-$(mktemp -d)}
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} > "$out/gpu_info.txt" 2>&1
$py -m pytest tests/gpu -m gpu -v -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
status=$?
benched=$($py -c "
from common.registry import all_pipelines
from common.runner import compose
print(' '.join(p.name for p in all_pipelines() if any(e.get('command') == 'bench' for e in compose(p.name).experiments.values())))")
for pipeline in $benched; do
  $py -m common.cli bench "$pipeline" trainer.accelerator=cuda > "$out/bench_${pipeline}.txt" 2>&1 || status=1
done
echo "exit status $status" >> "$out/gpu_info.txt"
exit $status

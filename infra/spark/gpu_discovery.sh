#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript).
# Prints the GPUs visible to this executor as Spark's ResourceInformation JSON:
#   {"name": "gpu", "addresses": ["0", "1"]}
# Exits non-zero with a message on stderr when no GPU can be listed, so that the executor fails
# at start-up instead of running model tasks on the CPU by surprise.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_discovery: nvidia-smi not found; install the NVIDIA driver utilities in the image or run on a GPU node" >&2
  exit 1
fi
indexes=$(nvidia-smi --query-gpu=index --format=csv,noheader,nounits)
if [ -z "$indexes" ]; then
  echo "gpu_discovery: nvidia-smi lists no GPU" >&2
  exit 1
fi
addresses=$(printf '%s\n' $indexes | sed 's/.*/"&"/' | paste -sd, -)
printf '{"name": "gpu", "addresses": [%s]}\n' "$addresses"

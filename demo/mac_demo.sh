#!/usr/bin/env bash
# The mlx-engine demo with a real gpt-oss-20b on an Apple-silicon Mac.
#
#   demo/mac_demo.sh [--model REPO_OR_FOLDER] [--prompt TEXT] [--max-tokens N] [--out-root DIR]
#
# Downloads mlx-community/gpt-oss-20b-MXFP4-Q4 (about 12 GB; override with --model or
# MLX_ENGINE_DEMO_MODEL) into the Hugging Face cache, then runs `mlx-engine demo --model ...`.
# Without network, or if the download fails, it prints why and a line saying it falls back
# to the embedded default model, and runs the demo with that. The last line printed is the
# output folder. PYTHON selects the interpreter that has mlx-engine installed (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c "import mlx_engine" 2>/dev/null; then
    echo "error: $python cannot import mlx_engine; install it (pip install -e .) or set PYTHON." >&2
    exit 2
fi

exec "$python" "$here/real_model_demo.py" "$@"

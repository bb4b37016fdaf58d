#!/usr/bin/env bash
# The GPU check (about 8 minutes): training runs first, then loaders, step, epoch profile.
#   on the device machine:  bash bench/gpu/check.sh            (results under $OUT)
#   dry run on a CPU:       OUT=/tmp/x bench/gpu/check.sh --device cpu --quick
# Any other flags go to bench/gpu/check.py. See bench/gpu/README.md for what to carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python  # here; the device machine has none
else PY=$(command -v python3 || command -v python)
fi
export OUT=${OUT:-/tmp/fastmbv1-gpu-check}
mkdir -p "$OUT"

# Carried pieces (split -d names them NAME.00, NAME.01, ...) are joined once; a warm
# machine keeps /tmp between calls.
if [ ! -f /tmp/cifar-10-python.tar.gz ] && compgen -G ".gpu/cifar.[0-9]*" >/dev/null; then
    cat .gpu/cifar.[0-9]* >/tmp/cifar-10-python.tar.gz
fi
# DALI and its wheels are optional: the check measures the torch pipeline without them.
# DALI's folder goes beside the machine's other nvidia/ packages (a second nvidia/ earlier
# on the path would hide it or them); its dependencies, cp312 wheels from
# bench/gpu/wheels.sh, go one by one into a folder on PYTHONPATH.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
extra=/tmp/fastmbv1-site
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    PY=$PY bash bench/gpu/wheels.sh install "$extra" .gpu/wheels/*.whl || true
fi
if compgen -G ".gpu/dali.tar.zst.[0-9]*" >/dev/null && [ ! -d "$site/nvidia/dali" ]; then
    cat .gpu/dali.tar.zst.[0-9]* | zstd -dc --long=27 | tar -x -C "$site" || echo "warning: DALI not unpacked"
fi

export PYTHONPATH="$PWD:$extra${PYTHONPATH:+:$PYTHONPATH}"
"$PY" bench/gpu/dali_smoke.py || echo "warning: DALI does not run here; the check goes on without it"
if [ -z "${FASTMBV1_DATA:-}" ] && [ -f /tmp/cifar-10-python.tar.gz ]; then
    export FASTMBV1_DATA=/tmp/cifar-10-python.tar.gz
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
# Compiled artifacts returned by an earlier GPU check (its $OUT/compile-artifacts.bin), if
# carried, start this machine's compile cache warm; otherwise this check writes them.
artifacts=$OUT/compile-artifacts.bin
if [ -f .gpu/compile-artifacts.bin ]; then artifacts=.gpu/compile-artifacts.bin; fi
exec "$PY" bench/gpu/check.py --out "$OUT" --artifacts "$artifacts" "$@"

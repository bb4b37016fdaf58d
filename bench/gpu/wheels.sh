#!/usr/bin/env bash
# DALI's Python dependencies for the GPU machine, which runs Python 3.12 and reaches no index.
#   here:   bench/gpu/wheels.sh download [DIR]          cp312 wheels into DIR (.gpu/wheels)
#   there:  bench/gpu/wheels.sh install TARGET WHEEL...  each wheel into TARGET, one by one
# Only what `from nvidia.dali import fn, pipeline_def, types` imports: optree (compiled, so
# a cp312 build), gast, astunparse, six, packaging; DALI's libcst, makefun and nvtx serve its
# experimental dynamic mode only. The versions are those of the project's own venv.
# Installing one wheel at a time means one bad wheel leaves the others installed. $PY picks
# the interpreter; $PIP_TAGS adds pip's target-platform flags, so a dry run on another
# Python can install (and import, given a Python 3.12) the same cp312 wheels.
set -euo pipefail
PY=${PY:-python3}
WHEELS=(optree==0.20.0 gast==0.7.0 astunparse==1.6.3 six==1.17.0 packaging==26.3)
CP312=(--only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64)

case "${1:-}" in
download)
    dir=${2:-.gpu/wheels}
    mkdir -p "$dir"
    "$PY" -m pip download -q --no-deps "${CP312[@]}" -d "$dir" "${WHEELS[@]}"
    ls -l "$dir"
    ;;
install)
    target=$2
    shift 2
    mkdir -p "$target"
    ok=0
    for wheel in "$@"; do
        # shellcheck disable=SC2086  # PIP_TAGS is a list of flags
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
            --target "$target" ${PIP_TAGS:-} "$wheel"; then
            ok=$((ok + 1))
        else
            echo "warning: $wheel not installed" >&2
        fi
    done
    echo "installed $ok of $# wheels into $target"
    ;;
*)
    echo "usage: $0 download [DIR] | install TARGET WHEEL..." >&2
    exit 2
    ;;
esac

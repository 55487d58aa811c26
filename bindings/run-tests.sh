#!/usr/bin/env bash
# Tests of the language bindings against the tiny fixture model:
#   1. Python (ctypes): pytest bindings/python/tests
#   2. C++: bindings/unreal/.../sdxl.hpp compiled as C++17 with -Werror (with and without
#      exceptions) and run
#   3. C#: compiled with mcs, the smoke test run with mono; the Unity code type-checked
# Builds the shared library first (cargo build -p sdxl-ffi --lib, release unless
# SDXL_BINDINGS_PROFILE=debug), or uses $SDXL_LIBRARY when set. Installs what is missing:
# pytest/numpy/pillow into a venv under target/bindings (when the current python lacks them),
# mono via apt-get.
# Fixtures: $SDXL_FIXTURES or ../shared/reference/fixtures. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE=${SDXL_BINDINGS_PROFILE:-release}
OUT=$ROOT/target/bindings
mkdir -p "$OUT"
export SDXL_FIXTURES=${SDXL_FIXTURES:-$ROOT/../shared/reference/fixtures}

step() { echo "== bindings: $*"; }
elapsed() { echo "   ($(( $(date +%s) - $1 )) s)"; }

if [ -n "${SDXL_LIBRARY:-}" ]; then
    # A library built already (e.g. target/release/deps/libsdxl.so after cargo test --release).
    step "using $SDXL_LIBRARY"
    LIBDIR=$(cd "$(dirname "$SDXL_LIBRARY")" && pwd)
    export SDXL_LIBRARY=$LIBDIR/$(basename "$SDXL_LIBRARY")
else
    step "build libsdxl ($PROFILE)"
    t=$(date +%s)
    if [ "$PROFILE" = release ]; then
        cargo build --release -p sdxl-ffi --lib
        LIBDIR=$ROOT/target/release
    else
        cargo build -p sdxl-ffi --lib
        LIBDIR=$ROOT/target/debug
    fi
    export SDXL_LIBRARY=$LIBDIR/libsdxl.so
    elapsed "$t"
fi

# The base model folder: the one whose model_index.json names StableDiffusionXLPipeline.
BASE=""
for d in "$SDXL_FIXTURES"/*/; do
    if grep -Eq '"_class_name": *"StableDiffusionXLPipeline"' "$d/model_index.json" 2>/dev/null; then
        BASE=${d%/}
        break
    fi
done
[ -n "$BASE" ] || { echo "no StableDiffusionXLPipeline folder in $SDXL_FIXTURES" >&2; exit 1; }

step "struct layout (tests/c/layout.c)"
${CC:-cc} -std=c11 -Wall -Wextra -Werror -Iinclude tests/c/layout.c -o "$OUT/layout"
"$OUT/layout" > "$OUT/layout.json"

step "python"
t=$(date +%s)
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import pytest, numpy' 2>/dev/null; then
    if [ ! -x "$OUT/venv/bin/python" ]; then
        "$PYTHON" -m venv "$OUT/venv"
    fi
    "$OUT/venv/bin/python" -m pip install --quiet pytest numpy pillow
    PYTHON=$OUT/venv/bin/python
fi
"$PYTHON" -m pytest bindings/python/tests -q -p no:cacheprovider
elapsed "$t"

step "c++ (sdxl.hpp)"
t=$(date +%s)
CXXFLAGS="-std=c++17 -Wall -Wextra -Wpedantic -Wshadow -Werror"
for variant in exceptions no-exceptions; do
    extra=""
    [ "$variant" = no-exceptions ] && extra="-fno-exceptions"
    # shellcheck disable=SC2086
    ${CXX:-g++} $CXXFLAGS $extra -Iinclude -Ibindings/unreal/Source/Sdxl/Public \
        bindings/unreal/tests/sdxl_hpp_test.cpp -L"$LIBDIR" -lsdxl -Wl,-rpath,"$LIBDIR" -pthread \
        -o "$OUT/sdxl_hpp_test-$variant"
    "$OUT/sdxl_hpp_test-$variant" "$BASE"
done
elapsed "$t"

step "c# (mono)"
t=$(date +%s)
if ! command -v mcs >/dev/null || ! command -v mono >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mono-mcs mono-runtime >/dev/null
fi
mcs -nologo -warnaserror -target:exe -out:"$OUT/smoke.exe" \
    bindings/csharp/Sdxl/*.cs bindings/csharp/tests/Smoke.cs
mcs -nologo -warnaserror -define:UNITY_5_3_OR_NEWER -target:library -out:"$OUT/unity-check.dll" \
    bindings/csharp/Sdxl/*.cs bindings/csharp/tests/UnityStubs.cs
LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} mono "$OUT/smoke.exe" "$BASE" "$OUT/layout.json"
elapsed "$t"

step "all binding tests passed"

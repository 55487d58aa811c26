#!/usr/bin/env bash
# Installs the plugin into an Unreal project:
#   bindings/unreal/install.sh /path/to/MyProject [LIBDIR [PLATFORM]]
# LIBDIR holds the built library (default: target/release), PLATFORM is the Unreal platform
# folder (default: Linux, Mac or Win64 from the host). Copies the plugin to
# MyProject/Plugins/Sdxl, include/sdxl.h to Source/ThirdParty/SdxlLibrary/include and the
# library files to Binaries/ThirdParty/<PLATFORM>. Run it once per target platform.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROJECT=${1:?usage: install.sh UNREAL_PROJECT_DIR [LIBDIR [PLATFORM]]}
LIBDIR=${2:-$ROOT/target/release}
case "$(uname -s)" in
    Darwin) HOST=Mac ;;
    Linux) HOST=Linux ;;
    *) HOST=Win64 ;;
esac
PLATFORM=${3:-$HOST}
DEST=$PROJECT/Plugins/Sdxl

mkdir -p "$DEST/Source" "$DEST/Source/ThirdParty/SdxlLibrary/include" "$DEST/Binaries/ThirdParty/$PLATFORM"
cp "$HERE/Sdxl.uplugin" "$DEST/"
cp -R "$HERE/Source/Sdxl" "$DEST/Source/"
cp "$ROOT/include/sdxl.h" "$DEST/Source/ThirdParty/SdxlLibrary/include/"
copied=0
for f in sdxl.dll sdxl.dll.lib libsdxl.so libsdxl.dylib libsdxl.a; do
    case "$PLATFORM:$f" in
        Win64:sdxl.dll|Win64:sdxl.dll.lib|Linux:libsdxl.so|Mac:libsdxl.dylib|IOS:libsdxl.a) ;;
        *) continue ;;
    esac
    if [ -f "$LIBDIR/$f" ]; then
        cp "$LIBDIR/$f" "$DEST/Binaries/ThirdParty/$PLATFORM/"
        copied=$((copied + 1))
    fi
done
[ "$copied" -gt 0 ] || { echo "no library for $PLATFORM in $LIBDIR" >&2; exit 1; }
echo "installed the Sdxl plugin into $DEST ($PLATFORM); regenerate the project files"

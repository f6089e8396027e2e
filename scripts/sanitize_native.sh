#!/usr/bin/env bash
# The native kernel (models/_occupancy_native.c) under the sanitizers. First its helper thread's protocol under
# ThreadSanitizer (a C program, tests/native/helper_race.c). Then the kernel built with -fsanitize=address,undefined
# into a copy of this tree, and pytest run against that build, the sanitizers' runtimes preloaded into Python. A data
# race, an invalid read or write, a use after free, a signed overflow, a misaligned or out-of-bounds index stops
# the run with the sanitizer's report (exit code != 0).
#
#   bash scripts/sanitize_native.sh                 # the kernel's own tests and the hostile-input ones (~80 s)
#   bash scripts/sanitize_native.sh tests/          # the whole suite (~15 min on 2 cores)
#   bash scripts/sanitize_native.sh tests/x.py -k y # any pytest arguments
#
# Leak detection is off: CPython and torch keep allocations until exit, which LeakSanitizer would report.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cc="${CC:-gcc}"
top="$(mktemp -d)"
trap 'rm -rf "$top"' EXIT
work="$top/main"
mkdir "$work"
# the tree as the working copy has it (tracked and untracked files that git does not ignore), without builds
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$work"
# tests that read ../shared (the paper, the real ROS 2 Python packages) find it beside the copy too
if [ -e "$repo/../shared" ]; then ln -s "$(cd "$repo/../shared" && pwd)" "$top/shared"; fi
include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
suffix="$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
# ThreadSanitizer first, on the helper thread's protocol alone: it cannot be preloaded into an uninstrumented Python,
# so tests/native/helper_race.c includes the kernel's source and is instrumented whole (it links libpython only for
# the symbols of the Python API the source names)
libdir="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
pylib="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LDLIBRARY"))')"
if [ ! -e "$("$cc" -print-file-name=libtsan.so)" ]; then
    echo "sanitize_native: $cc has no libtsan.so: the helper thread's check is not run" >&2
elif [ ! -e "$libdir/$pylib" ] || [ "${pylib##*.}" = a ]; then
    echo "sanitize_native: no shared libpython ($libdir/$pylib): the helper thread's check is not run" >&2
else
    lib="${pylib#lib}"
    "$cc" -O1 -g -fsanitize=thread -std=gnu11 -I"$include" -I"$work/models" "$work/tests/native/helper_race.c" \
        -L"$libdir" -Wl,-rpath,"$libdir" -l"${lib%%.so*}" -lm -lpthread -o "$top/helper_race" &
    tsan_build=$!
fi
# (the two builds side by side)
"$cc" -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
    -ffp-contract=off -std=c11 -Wall -I"$include" "$work/models/_occupancy_native.c" -lm \
    -o "$work/models/_occupancy_native$suffix"
if [ -n "${tsan_build:-}" ]; then
    wait "$tsan_build"
    echo "sanitize_native: ThreadSanitizer on the helper thread's protocol (tests/native/helper_race.c)"
    env -u LD_PRELOAD TSAN_OPTIONS="halt_on_error=1" "$top/helper_race"
fi
runtimes="$("$cc" -print-file-name=libasan.so) $("$cc" -print-file-name=libubsan.so)"
for lib in $runtimes; do
    [ -e "$lib" ] || { echo "sanitize_native: $cc has no $(basename "$lib") (install its sanitizer runtimes)" >&2; exit 2; }
done
if ! nm -D --undefined-only "$work/models/_occupancy_native$suffix" | grep -q __asan_report_store; then
    echo "sanitize_native: the build is not instrumented (no __asan_report_store calls)" >&2
    exit 2
fi
if [ "$#" -eq 0 ]; then
    set -- tests/test_native_postprocess.py tests/test_native_geometry.py tests/test_native_arguments.py \
        tests/test_device_cloud.py tests/test_preprocess_device.py tests/test_fuzz_frames.py tests/test_bad_input.py
fi
echo "sanitize_native: $cc -fsanitize=address,undefined build of the kernel, tests: $*"
cd "$work"
# the copy's models/ comes first on sys.path (python -m puts the working directory there): check that it is the
# copy's package that pytest will import, not an installed one, and that its sanitized build loads (without
# importing the package, which would take torch's import under the sanitizers)
LD_PRELOAD="$runtimes" ASAN_OPTIONS=detect_leaks=0 python -c "
import importlib.util
found = importlib.util.find_spec('models').origin
assert found.startswith('$work'), 'sanitize_native: models would be imported from ' + found
spec = importlib.util.spec_from_file_location('models._occupancy_native', '$work/models/_occupancy_native$suffix')
spec.loader.exec_module(importlib.util.module_from_spec(spec))"
# --capture=sys: pytest captures Python's output only, so that a sanitizer's report (written to file descriptor 2 by
# the C runtime, right before it ends the process) is not lost in pytest's capture of that descriptor
LD_PRELOAD="$runtimes" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    python -m pytest -q -p no:cacheprovider --capture=sys "$@"

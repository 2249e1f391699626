#!/usr/bin/env bash
# Build the smolvm guest kernel (vmlinux, bzImage) from Debian's linux-source
# package, tinyconfig + smolvm.config and the patches in patches/.
#
# The result is cached outside the repository under
#   ${SMOLVM_CACHE:-$HOME/.cache/smolvm}/kernel/<key>/
# where <key> hashes everything that decides the image (the config fragment,
# the patches, this script, the source package version and the compiler), so a
# second run with the same inputs is instant. target/guest/vmlinux and
# target/guest/bzImage in the repository are then linked to the cached files.
#
# Environment:
#   SMOLVM_CACHE               cache root (default $HOME/.cache/smolvm)
#   SMOLVM_KERNEL_JOBS         make -j value (default: nproc)
#   SMOLVM_KERNEL_KEEP_TREE=1  keep the build tree (for incremental rebuilds)
#   SMOLVM_KERNEL_FORCE=1      rebuild even when the cache has this key
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
fragment="$here/smolvm.config"
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
		echo "source $pkg $version"
		echo "compiler $(gcc --version | head -n1)"
		for f in "$fragment" "${patches[@]}" "$here/build.sh"; do
			echo "file ${f#"$here"/} $(sha256sum <"$f" | cut -d' ' -f1)"
		done
	} | sha256sum | cut -c1-16
)"
out="$cache_root/$key"
stage "$pkg $version, ${#patches[@]} patches, key $key"

link_results() {
	mkdir -p "$repo/target/guest"
	ln -sfn "$out/vmlinux" "$repo/target/guest/vmlinux"
	ln -sfn "$out/bzImage" "$repo/target/guest/bzImage"
	stage "vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
	stage "linked $repo/target/guest/vmlinux -> $out/vmlinux"
	echo "$out/vmlinux"
}

if [ -f "$out/vmlinux" ] && [ "${SMOLVM_KERNEL_FORCE:-0}" != 1 ]; then
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
stage "configuring: tinyconfig + $(basename "$fragment")"
kmake() { make -C "$src" O="$obj" ARCH=x86_64 "$@"; }
kmake -s tinyconfig >"$log" 2>&1 || die "make tinyconfig failed, see $log"
# -n: allnoconfig-based merge, so symbols the fragment makes visible default
# to off as in tinyconfig instead of taking their Kconfig defaults.
(cd "$src" && scripts/kconfig/merge_config.sh -n -O "$obj" "$obj/.config" "$fragment") >>"$log" 2>&1 ||
	die "merge_config.sh failed, see $log"

bad=0
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
[ "$bad" = 0 ] || die "the final .config lacks symbols from $(basename "$fragment") (a missing dependency?)"
stage "config checked: every symbol of $(basename "$fragment") landed"

# --- 5. Build ------------------------------------------------------------------
stage "building vmlinux and bzImage with -j$jobs (log: $log)"
(
	while sleep "$heartbeat_s"; do
		n="$(grep -c '^  CC ' "$log" 2>/dev/null || true)"
		stage "still building: ${n:-0} files compiled so far"
	done
) &
hb_pid=$!
tb=$(date +%s)
set +e
kmake -j"$jobs" vmlinux bzImage 2>&1 | tee -a "$log"
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
cp "$obj/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$obj/System.map" "$staging/System.map"
cp "$obj/.config" "$staging/config"
cp "$log" "$staging/build.log"
{
	echo "key=$key"
	echo "source=$pkg $version"
	echo "compiler=$(gcc --version | head -n1)"
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

#!/usr/bin/env bash
# Fetch onnxruntime's C API headers (the onnxruntime wheel ships none) from
# Debian trixie's libonnxruntime-dev package into a private cache directory.
#
# Usage: runtime/fetch_ort_headers.sh [CACHE_DIR]
#   CACHE_DIR defaults to $ONNX_DC_CACHE_DIR or ${XDG_CACHE_HOME:-~/.cache}/onnx-dc.
# Prints the include directory (the one holding onnxruntime_c_api.h) as the
# last line of stdout; progress goes to stderr.
#
# apt runs with a private configuration: its own sources list, state, lists
# and package cache under CACHE_DIR, and an empty dpkg status; the system's apt
# sources, lists and installed packages are never changed. The Debian mirror is
# the one the system's own sources name (override with
# ONNX_DC_DEBIAN_MIRROR=URI). Only `apt-get update` (of the private list) and
# `apt-get download` run; nothing is installed.
set -euo pipefail

PACKAGE="libonnxruntime-dev"
SUITE="${ONNX_DC_DEBIAN_SUITE:-trixie}"
cache_root="${1:-${ONNX_DC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-dc}}"
dest="$cache_root/ort-headers-$SUITE"
include_dir="$dest/usr/include/onnxruntime"

say() { echo "fetch_ort_headers: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ -f "$include_dir/onnxruntime_c_api.h" ]]; then
    say "using cached headers in $include_dir"
    echo "$include_dir"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (not a Debian-like system); set ONNX_DC_ORT_INCLUDE_DIR to onnxruntime's include directory instead"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found; set ONNX_DC_ORT_INCLUDE_DIR to onnxruntime's include directory instead"

mirror="${ONNX_DC_DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    # The system's main Debian archive: a deb source whose release name has no
    # suffix such as -security or -updates.
    mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null \
        | awk '$3 == "deb" && $2 !~ /-/ && $1 ~ /debian\/?$/ {print $1; exit}')" || true
fi
if [[ -z "$mirror" ]]; then
    # No package lists yet (apt-get update never ran): read the sources files.
    mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        /^[[:space:]]*$/ { if (deb && uri != "" && ok) { print uri; exit } deb = 0; uri = ""; ok = 0; next }
        /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
        /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) { uri = $i; break } }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-/) ok = 1 }
        END { if (deb && uri != "" && ok) print uri }' | head -n 1)" || true
fi
if [[ -z "$mirror" ]]; then
    mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -e 's/\[[^]]*\]//' | awk '$1 == "deb" && $2 ~ /debian\/?$/ && $3 !~ /-/ {print $2; exit}')" || true
fi
[[ -n "$mirror" ]] || die "no Debian mirror found in the system's apt sources; set ONNX_DC_DEBIAN_MIRROR to a Debian archive URI"

keyring="${ONNX_DC_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
[[ -f "$keyring" ]] || die "Debian archive keyring $keyring not found (package debian-archive-keyring)"

work="$cache_root/apt-private"
mkdir -p "$work"/{etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,lists/partial,cache/archives/partial,download}
echo "deb [signed-by=$keyring] $mirror $SUITE main" > "$work/etc/sources.list"

apt_opts=(
    -o "Dir::Etc::SourceList=$work/etc/sources.list"
    -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State=$work"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::status=/dev/null"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "Acquire::Languages=none"
    -o "APT::Get::List-Cleanup=false"
    -o "Debug::NoLocking=true"
)
if [[ "$(id -u)" == 0 ]]; then
    # The private directories belong to root; apt's _apt sandbox user could not write them.
    apt_opts+=(-o "APT::Sandbox::User=root")
fi

say "updating private package list for $SUITE from $mirror"
apt-get "${apt_opts[@]}" -q update >&2 || die "apt-get update of the private $SUITE list failed"

say "downloading $PACKAGE"
rm -f "$work/download/"*.deb
(cd "$work/download" && apt-get "${apt_opts[@]}" -q download "$PACKAGE" >&2) \
    || die "apt-get download $PACKAGE failed"
deb="$(ls "$work/download/"*.deb 2>/dev/null | head -n 1)"
[[ -n "$deb" ]] || die "apt-get download produced no .deb"

tmp="$(mktemp -d "$cache_root/.ort-headers.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp" || die "cannot extract $deb"
[[ -f "$tmp/usr/include/onnxruntime/onnxruntime_c_api.h" ]] || die "$deb has no usr/include/onnxruntime/onnxruntime_c_api.h"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
rm -rf "$work"
say "headers from $(basename "$deb") in $include_dir"
echo "$include_dir"

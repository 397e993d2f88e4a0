#!/usr/bin/env bash
# Real text for the retrieval-scaling benchmark, fetched with the package tools every machine of
# this project has (no other download): Debian's
#   linux-source-6.1   the kernel's C source, 139 MB .deb, about 1.2 GB unpacked (WORK/linux-source/)
#   linux-doc-6.1      the kernel's documentation, .rst.gz and .txt (WORK/linux-doc/)
#   python3.11-doc     Python's documentation as text (WORK/python-doc/)
#   linux-source-6.12  with --newer-kernel: the next kernel's C source, 154 MB .deb (WORK/linux-source-6.12/),
#                      a retrieval-only database for models trained on 6.1: the code base's next
#                      version, where most files have a near-copy (db_scaling.py --retrieval-corpus)
# Unpacked with dpkg -x and tar (nothing is installed, no root side effects). Resumable: a re-run
# skips each package already downloaded and each folder already unpacked (a folder appears only
# once whole: unpacked under a temporary name, then renamed).
#
#   bash benchmarks/fetch_corpora.sh WORK [--newer-kernel]
set -euo pipefail
work=${1:?usage: bash benchmarks/fetch_corpora.sh WORK [--newer-kernel]}
newer=${2:-}
mkdir -p "$work/debs"
work=$(cd "$work" && pwd)

fetch() {  # fetch PACKAGE: the .deb in WORK/debs, downloaded once
    if ! ls "$work/debs/$1"_*.deb >/dev/null 2>&1; then
        (cd "$work/debs" && apt-get download "$1" >&2) || {  # stdout is the .deb path
            echo "fetch_corpora: apt-get download $1 failed (run 'apt-get update' once first)" >&2; exit 1; }
    fi
    ls "$work/debs/$1"_*.deb | head -n 1
}

unpack() {  # unpack DEB SUBFOLDER DEST: DEB's SUBFOLDER as WORK/DEST
    local deb=$1 sub=$2 dest=$work/$3 tmp=$work/.$3.tmp-$$
    [ -d "$dest" ] && { echo "$dest: already there"; return; }
    rm -rf "$tmp" && mkdir -p "$tmp"
    dpkg -x "$deb" "$tmp/root"
    mv "$tmp/root/$sub" "$dest.part" && rm -rf "$tmp" && mv "$dest.part" "$dest"
    echo "$dest: $(find "$dest" -type f | wc -l) files, $(du -sh "$dest" | cut -f1)"
}

unpack "$(fetch linux-doc-6.1)" usr/share/doc/linux-doc-6.1/Documentation linux-doc
unpack "$(fetch python3.11-doc)" usr/share/doc/python3.11/html/_sources python-doc

kernel() {  # kernel VERSION DEST: linux-source-VERSION's tree as WORK/DEST
    local version=$1 src=$work/$2
    if [ -d "$src" ]; then
        echo "$src: already there"
        return
    fi
    local deb tmp=$work/.$2.tmp-$$
    deb=$(fetch "linux-source-$version")
    rm -rf "$tmp" && mkdir -p "$tmp"
    dpkg -x "$deb" "$tmp/root"
    tar -xJf "$tmp/root/usr/src/linux-source-$version.tar.xz" -C "$tmp"
    mv "$tmp/linux-source-$version" "$src" && rm -rf "$tmp"
    echo "$src: $(find "$src" -type f | wc -l) files, $(du -sh "$src" | cut -f1)"
}

kernel 6.1 linux-source
case $newer in
    "") ;;
    --newer-kernel) kernel 6.12 linux-source-6.12 ;;
    *) echo "fetch_corpora: unknown option $newer (only --newer-kernel)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Download Revisited Oxford 5k and Paris 6k (Radenovic et al., CVPR 2018): images and ground truth,
# in the revisitop layout that retrieval.data.revisitop.load_revisitop reads:
#
#   DATA_DIR/revisitop/roxford5k/gnd_roxford5k.pkl   DATA_DIR/revisitop/roxford5k/jpg/<name>.jpg
#   DATA_DIR/revisitop/rparis6k/gnd_rparis6k.pkl     DATA_DIR/revisitop/rparis6k/jpg/<name>.jpg
#
# Sources are the ones the revisitop project's python/download.py uses. Re-running skips whatever is
# already there (a ground-truth file present, an archive with its jpg/.done.<archive> marker), so an
# interrupted run can simply be started again. Needs curl (or wget), tar and find.
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") DATA_DIR" >&2
    exit 2
}
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
DATA_DIR=$1

GND_URL=${REVISITOP_GND_URL:-http://cmp.felk.cvut.cz/revisitop/data/datasets}
OXF_URL=${REVISITOP_OXF_URL:-https://www.robots.ox.ac.uk/~vgg/data/oxbuildings}
PAR_URL=${REVISITOP_PAR_URL:-https://www.robots.ox.ac.uk/~vgg/data/parisbuildings}

log() { echo ">> $*" >&2; }

# fetch DEST URL [URL...]: download to DEST.part, then rename; tries each URL in turn.
fetch() {
    local dest=$1 url
    shift
    if [[ -s "$dest" ]]; then
        log "have $dest"
        return 0
    fi
    for url in "$@"; do
        log "downloading $url"
        if command -v curl >/dev/null 2>&1; then
            if curl -fL -# --retry 5 --retry-delay 5 -C - -o "$dest.part" "$url"; then
                mv -f "$dest.part" "$dest"
                return 0
            fi
        elif command -v wget >/dev/null 2>&1; then
            if wget -c -O "$dest.part" "$url"; then
                mv -f "$dest.part" "$dest"
                return 0
            fi
        else
            log "neither curl nor wget is installed"
            return 1
        fi
        rm -f "$dest.part"  # a failed source may have left an error page; do not resume into it
    done
    log "could not download $(basename "$dest") from: $*"
    return 1
}

# extract_flat DATASET_DIR ARCHIVE: unpack every .jpg of ARCHIVE straight into DATASET_DIR/jpg/
# (the Paris archives nest paris/<landmark>/<name>.jpg), mark it done and delete the archive.
extract_flat() {
    local dir=$1 archive=$2 name tmp
    name=$(basename "$archive")
    tmp="$dir/.extract.$name"
    rm -rf "$tmp"
    mkdir -p "$tmp" "$dir/jpg"
    log "extracting $name"
    tar -xzf "$archive" -C "$tmp"
    find "$tmp" -type f -iname '*.jpg' -exec sh -c 'mv -f "$@" "$0"/' "$dir/jpg" {} +
    rm -rf "$tmp"
    touch "$dir/jpg/.done.$name"
    rm -f "$archive"
}

# get_dataset NAME BASE_URL ARCHIVE...: images (each archive tried as -v1 first, then unversioned) + gnd.
get_dataset() {
    local name=$1 base=$2 dir archive stem
    shift 2
    dir="$DATA_DIR/revisitop/$name"
    mkdir -p "$dir/jpg"
    for archive in "$@"; do
        stem=${archive%.tgz}
        if [[ -e "$dir/jpg/.done.$archive" ]]; then
            log "$name: $archive already extracted"
            continue
        fi
        fetch "$dir/$archive" "$base/$stem-v1.tgz" "$base/$stem.tgz"
        extract_flat "$dir" "$dir/$archive"
    done
    fetch "$dir/gnd_$name.pkl" "$GND_URL/$name/gnd_$name.pkl"
    log "$name: $(find "$dir/jpg" -maxdepth 1 -type f -name '*.jpg' | wc -l | tr -d ' ') images in $dir/jpg"
}

get_dataset roxford5k "$OXF_URL" oxbuild_images.tgz
get_dataset rparis6k "$PAR_URL" paris_1.tgz paris_2.tgz
log "done: $DATA_DIR/revisitop"

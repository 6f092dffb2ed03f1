#!/usr/bin/env bash
# Download the Google Landmarks Dataset v2 (https://github.com/cvdfoundation/google-landmark):
# metadata CSVs and the image TARs of one split or all of them, laid out as retrieval.data.gldv2 reads it:
#
#   DATA_DIR/gldv2/metadata/{train,train_clean,index,test}.csv, retrieval_solution_v2.1.csv
#   DATA_DIR/gldv2/<split>/<a>/<b>/<c>/<id>.jpg            (split: train 500 tars, index 100, test 20)
#
# Each TAR is checked against its published md5 (md5sum/<split>/md5.images_XXX.txt), extracted into
# DATA_DIR/gldv2/<split>/, marked done (<split>/.done/images_XXX) and deleted. Re-running skips marked
# TARs and resumes partial downloads, so an interrupted run can simply be started again.
# Sizes: train ~500 GB, index ~85 GB, test ~10 GB (TARs are deleted once extracted).
# JOBS=N (default 4) downloads N TARs at a time. Needs curl (or wget), tar, md5sum (or md5).
set -euo pipefail

BASE_URL=${GLDV2_BASE_URL:-https://s3.amazonaws.com/google-landmark}  # env override: a mirror
JOBS=${JOBS:-4}

usage() {
    echo "usage: $(basename "$0") DATA_DIR [train|index|test|all]   (default: all; env JOBS=N parallel TARs)" >&2
    exit 2
}

log() { echo ">> $*" >&2; }

# fetch DEST URL: download to DEST.part (resuming a previous partial download), then rename.
fetch() {
    local dest=$1 url=$2
    if [[ -s "$dest" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 5 --retry-delay 10 -C - -o "$dest.part" "$url"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -c -O "$dest.part" "$url"
    else
        log "neither curl nor wget is installed"
        return 1
    fi
    mv -f "$dest.part" "$dest"
}

md5_of() {
    if command -v md5sum >/dev/null 2>&1; then
        md5sum "$1" | cut -d' ' -f1
    else
        md5 -q "$1"
    fi
}

# one_tar DATA_DIR SPLIT NNN: download, verify, extract and delete images_NNN.tar of SPLIT.
one_tar() {
    local root=$1/gldv2 split=$2 n=$3 dir tar md5file want got
    dir="$root/$split"
    if [[ -e "$dir/.done/images_$n" ]]; then
        return 0
    fi
    tar="$dir/.download/images_$n.tar"
    md5file="$dir/.download/md5.images_$n.txt"
    fetch "$md5file" "$BASE_URL/md5sum/$split/md5.images_$n.txt"
    fetch "$tar" "$BASE_URL/$split/images_$n.tar"
    read -r want _ <"$md5file" || true
    got=$(md5_of "$tar")
    if [[ -z "$want" || "$want" != "$got" ]]; then
        log "$split/images_$n.tar: md5 $got does not match '${want:-?}' from $md5file; deleted it, run again"
        rm -f "$tar" "$md5file"
        return 1
    fi
    tar -xf "$tar" -C "$dir"
    mkdir -p "$dir/.done"
    touch "$dir/.done/images_$n"
    rm -f "$tar" "$md5file"
    log "$split/images_$n.tar extracted"
}

# Internal entry point used for parallel TARs: download_gldv2.sh --one DATA_DIR SPLIT NNN
if [[ $# -eq 4 && "$1" == "--one" ]]; then
    one_tar "$2" "$3" "$4"
    exit
fi

[[ $# -ge 1 && $# -le 2 && -n "$1" && "$1" != -* ]] || usage
DATA_DIR=$1
WHAT=${2:-all}
case "$WHAT" in
    train) SPLITS=(train) ;;
    index) SPLITS=(index) ;;
    test) SPLITS=(test) ;;
    all) SPLITS=(train index test) ;;
    *) usage ;;
esac
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { log "JOBS must be a positive integer, got '$JOBS'"; exit 2; }

META="$DATA_DIR/gldv2/metadata"
for split in "${SPLITS[@]}"; do
    case "$split" in
        train)
            ntars=500
            fetch "$META/train.csv" "$BASE_URL/metadata/train.csv"
            fetch "$META/train_clean.csv" "$BASE_URL/metadata/train_clean.csv"
            ;;
        index)
            ntars=100
            fetch "$META/index.csv" "$BASE_URL/metadata/index.csv"
            ;;
        test)
            ntars=20
            fetch "$META/test.csv" "$BASE_URL/metadata/test.csv"
            # the ground truth lives under ground_truth/, not metadata/, on the bucket
            fetch "$META/retrieval_solution_v2.1.csv" "$BASE_URL/ground_truth/retrieval_solution_v2.1.csv"
            ;;
    esac
    log "$split: metadata in $META; $ntars TARs, $JOBS at a time"
    mkdir -p "$DATA_DIR/gldv2/$split"
    if ! seq -f '%03g' 0 $((ntars - 1)) | xargs -P "$JOBS" -I{} bash "$0" --one "$DATA_DIR" "$split" {}; then
        log "$split: some TARs failed (see above); run the same command again to retry them"
        exit 1
    fi
    rmdir "$DATA_DIR/gldv2/$split/.download" 2>/dev/null || true
    ndone=$(find "$DATA_DIR/gldv2/$split/.done" -type f -name 'images_*' | wc -l | tr -d ' ')
    log "$split: $ndone/$ntars TARs extracted into $DATA_DIR/gldv2/$split"
done

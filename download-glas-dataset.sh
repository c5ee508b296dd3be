#!/usr/bin/env bash
# Download and install the GlaS 2015 challenge data (Warwick QU dataset).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=dependencies/download_lib.sh
source "$SCRIPT_DIR/dependencies/download_lib.sh"

FOLDER="GlaS-2015"
INNER="Warwick QU Dataset (Released 2016_07_08)"
GLAS_URL=${GLAS_URL:-https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/download/warwick_qu_dataset_released_2016_07_08.zip}
# No published checksum is known for the archive: verification is skipped unless one is given.
GLAS_MD5=${GLAS_MD5-}

USAGE="Usage: bash $(basename -- "$0") DEST

Download the GlaS 2015 data (warwick_qu_dataset_released_2016_07_08.zip) and install it as
DEST/$FOLDER/$INNER/
(train_*.bmp, testA_*.bmp, testB_*.bmp, their *_anno.bmp masks and Grade.csv).
DEST is the parent data folder (the project's --data-root). Afterwards, when create_folds.py sits
next to this script, it runs 'create_folds.py --dataset glas'.

The data left its original page and is now offered on the GlaS contest page of the Warwick TIA
centre (https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/). If the default URL below does
not answer, download the zip by hand from that page (it may ask you to accept its terms) and
point GLAS_URL at the local copy, e.g.
  GLAS_URL=file:///home/me/warwick_qu_dataset_released_2016_07_08.zip bash $(basename -- "$0") DEST

Requires: curl, unzip, md5sum (or md5) when a checksum is set.

Environment variables:
  GLAS_URL   default: https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/download/warwick_qu_dataset_released_2016_07_08.zip
  GLAS_MD5   default: empty (no published checksum is known; not verified)

$COMMON_HELP"

main() {
    parse_destination "$USAGE" "$@"
    require_tools curl unzip
    local dest
    dest=$(absolute_dir "$1")
    remove_stale_staging "$dest" "$FOLDER"
    if already_installed "$dest" "$FOLDER"; then
        info "$dest/$FOLDER is already installed; nothing to do."
        return 0
    fi
    mkdir -p -- "$dest/.downloads"
    fetch "$dest/.downloads" warwick_qu_dataset_released_2016_07_08.zip GLAS_URL GLAS_MD5

    install_traps
    STAGING_ROOT=$(make_staging "$dest" "$FOLDER")
    extract "$dest/.downloads/warwick_qu_dataset_released_2016_07_08.zip" "$STAGING_ROOT/$FOLDER"
    require_layout "$STAGING_ROOT/$FOLDER" "$INNER/Grade.csv" "$INNER/train_1.bmp" \
        "$INNER/train_1_anno.bmp" "$INNER/testA_1.bmp" "$INNER/testB_1.bmp"
    make_folds "$SCRIPT_DIR" "$STAGING_ROOT" glas
    install_folder "$dest" "$FOLDER" warwick_qu_dataset_released_2016_07_08.zip
}

main "$@"

#!/usr/bin/env bash
# Download and install Caltech-UCSD Birds-200-2011 (images + segmentation masks).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=dependencies/download_lib.sh
source "$SCRIPT_DIR/dependencies/download_lib.sh"

FOLDER="Caltech-UCSD-Birds-200-2011"
CUB_IMAGES_URL=${CUB_IMAGES_URL:-https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz}
CUB_IMAGES_MD5=${CUB_IMAGES_MD5-97eceeb196236b17998738112f37df78}
CUB_SEGMENTATIONS_URL=${CUB_SEGMENTATIONS_URL:-https://data.caltech.edu/records/65de6-vp158/files/segmentations.tgz}
# No published checksum is known for segmentations.tgz: verification is skipped unless one is given.
CUB_SEGMENTATIONS_MD5=${CUB_SEGMENTATIONS_MD5-}

USAGE="Usage: bash $(basename -- "$0") DEST

Download CUB-200-2011 (~1.1 GB of images, ~37 MB of segmentation masks) from CaltechDATA and
install it as DEST/$FOLDER/ with CUB_200_2011/... and segmentations/...
DEST is the parent data folder (the project's --data-root). Afterwards, when create_folds.py sits
next to this script, it runs 'create_folds.py --dataset cub' and '--dataset cub5'.

Requires: curl, tar (gzip), md5sum (or md5) when a checksum is set.

Environment variables:
  CUB_IMAGES_URL         default: https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz
  CUB_IMAGES_MD5         default: 97eceeb196236b17998738112f37df78
  CUB_SEGMENTATIONS_URL  default: https://data.caltech.edu/records/65de6-vp158/files/segmentations.tgz
  CUB_SEGMENTATIONS_MD5  default: empty (no published checksum is known; not verified)

$COMMON_HELP"

main() {
    parse_destination "$USAGE" "$@"
    require_tools curl tar gzip
    local dest
    dest=$(absolute_dir "$1")
    remove_stale_staging "$dest" "$FOLDER"
    if already_installed "$dest" "$FOLDER"; then
        info "$dest/$FOLDER is already installed; nothing to do."
        return 0
    fi
    mkdir -p -- "$dest/.downloads"
    fetch "$dest/.downloads" CUB_200_2011.tgz CUB_IMAGES_URL CUB_IMAGES_MD5
    fetch "$dest/.downloads" segmentations.tgz CUB_SEGMENTATIONS_URL CUB_SEGMENTATIONS_MD5

    install_traps
    STAGING_ROOT=$(make_staging "$dest" "$FOLDER")
    extract "$dest/.downloads/CUB_200_2011.tgz" "$STAGING_ROOT/$FOLDER"
    extract "$dest/.downloads/segmentations.tgz" "$STAGING_ROOT/$FOLDER"
    require_layout "$STAGING_ROOT/$FOLDER" CUB_200_2011/images CUB_200_2011/classes.txt \
        CUB_200_2011/images.txt CUB_200_2011/image_class_labels.txt \
        CUB_200_2011/train_test_split.txt segmentations
    make_folds "$SCRIPT_DIR" "$STAGING_ROOT" cub cub5
    install_folder "$dest" "$FOLDER" CUB_200_2011.tgz segmentations.tgz
}

main "$@"

#!/usr/bin/env bash
# Download and install Oxford Flowers 102 (images, segmentation trimaps, labels and splits).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=dependencies/download_lib.sh
source "$SCRIPT_DIR/dependencies/download_lib.sh"

FOLDER="Oxford-flowers-102"
OXF_BASE_URL="https://www.robots.ox.ac.uk/~vgg/data/flowers/102"
OXF_IMAGES_URL=${OXF_IMAGES_URL:-$OXF_BASE_URL/102flowers.tgz}
OXF_IMAGES_MD5=${OXF_IMAGES_MD5-52808999861908f626f3c1f4e79d11fa}
OXF_SEGMENTATIONS_URL=${OXF_SEGMENTATIONS_URL:-$OXF_BASE_URL/102segmentations.tgz}
# No published checksum is known for 102segmentations.tgz: verification is skipped unless one is given.
OXF_SEGMENTATIONS_MD5=${OXF_SEGMENTATIONS_MD5-}
OXF_LABELS_URL=${OXF_LABELS_URL:-$OXF_BASE_URL/imagelabels.mat}
OXF_LABELS_MD5=${OXF_LABELS_MD5-e0620be6f572b9609742df49c70aed4d}
OXF_SETID_URL=${OXF_SETID_URL:-$OXF_BASE_URL/setid.mat}
OXF_SETID_MD5=${OXF_SETID_MD5-a5357ecc9cb78c4bef273ce3793fc85c}

USAGE="Usage: bash $(basename -- "$0") DEST

Download Oxford Flowers 102 (~329 MB of images, ~194 MB of trimaps) from the VGG site and install
it as DEST/$FOLDER/ with jpg/, segmim/, imagelabels.mat and setid.mat.
DEST is the parent data folder (the project's --data-root). Afterwards, when create_folds.py sits
next to this script, it runs 'create_folds.py --dataset oxf', which also writes the binary masks
(segmim_bin/).

Requires: curl, tar (gzip), md5sum (or md5) when a checksum is set.

Environment variables:
  OXF_IMAGES_URL         default: $OXF_BASE_URL/102flowers.tgz
  OXF_IMAGES_MD5         default: 52808999861908f626f3c1f4e79d11fa
  OXF_SEGMENTATIONS_URL  default: $OXF_BASE_URL/102segmentations.tgz
  OXF_SEGMENTATIONS_MD5  default: empty (no published checksum is known; not verified)
  OXF_LABELS_URL         default: $OXF_BASE_URL/imagelabels.mat
  OXF_LABELS_MD5         default: e0620be6f572b9609742df49c70aed4d
  OXF_SETID_URL          default: $OXF_BASE_URL/setid.mat
  OXF_SETID_MD5          default: a5357ecc9cb78c4bef273ce3793fc85c

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
    local downloads=$dest/.downloads
    mkdir -p -- "$downloads"
    fetch "$downloads" 102flowers.tgz OXF_IMAGES_URL OXF_IMAGES_MD5
    fetch "$downloads" 102segmentations.tgz OXF_SEGMENTATIONS_URL OXF_SEGMENTATIONS_MD5
    fetch "$downloads" imagelabels.mat OXF_LABELS_URL OXF_LABELS_MD5
    fetch "$downloads" setid.mat OXF_SETID_URL OXF_SETID_MD5

    install_traps
    STAGING_ROOT=$(make_staging "$dest" "$FOLDER")
    extract "$downloads/102flowers.tgz" "$STAGING_ROOT/$FOLDER"
    extract "$downloads/102segmentations.tgz" "$STAGING_ROOT/$FOLDER"
    cp -- "$downloads/imagelabels.mat" "$downloads/setid.mat" "$STAGING_ROOT/$FOLDER/"
    require_layout "$STAGING_ROOT/$FOLDER" jpg segmim imagelabels.mat setid.mat
    make_folds "$SCRIPT_DIR" "$STAGING_ROOT" oxf
    install_folder "$dest" "$FOLDER" 102flowers.tgz 102segmentations.tgz imagelabels.mat setid.mat
}

main "$@"

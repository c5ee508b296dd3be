# shellcheck shell=bash
# Functions shared by the dataset download scripts (sourced, not executed).
#
# A dataset is installed in three stages, each safe to interrupt:
#   1. every file is downloaded into DEST/.downloads/<name>.part (resumable; a .part that already
#      holds the whole file is not fetched again) and renamed to DEST/.downloads/<name> once
#      complete and checked against its md5 (when one is known);
#   2. the archives are extracted into a fresh staging data root
#      DEST/.staging-<folder>.<host>.<pid>.XXXXXX/ (named after the machine and process that own it,
#      so that a later run can remove it once that process is gone), the expected layout is checked
#      and the folds step runs on that staging data root;
#   3. the marker <folder>/.complete is written inside the staging area and the folder is moved
#      into DEST in one rename, so a folder in DEST is either complete or absent.
# A later run finds DEST/<folder>/.complete and does nothing.

STAGING_ROOT=""

# Print a message (one line per argument) on stderr.
info() {
    printf '%s\n' "$@" >&2
}

# Print an error (one line per argument) on stderr and exit with status 1.
die() {
    printf 'error: %s\n' "$1" >&2
    shift
    if (($#)); then
        printf '  %s\n' "$@" >&2
    fi
    exit 1
}

# Exit with a message unless every named command is on PATH.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but was not found on PATH." \
            "Install it (e.g. with your system package manager) and rerun."
    done
}

# Print the md5 digest of a file.
md5_of() {
    if command -v md5sum >/dev/null 2>&1; then
        md5sum -- "$1" | cut -d ' ' -f 1
    elif command -v md5 >/dev/null 2>&1; then
        md5 -q -- "$1"
    else
        die "'md5sum' (or 'md5') is required to verify checksums but was not found on PATH." \
            "Install it, or set the *_MD5 variables to an empty value to skip verification."
    fi
}

# Print the absolute path of a directory, creating it first when needed.
absolute_dir() {
    mkdir -p -- "$1" || die "could not create the destination folder '$1'."
    (cd -- "$1" && pwd)
}

# Handle the arguments common to every script: print the usage text given as $1 for -h/--help,
# reject anything but exactly one destination folder.
parse_destination() {
    local usage=$1
    shift
    if (($# == 1)) && [[ $1 == -h || $1 == --help ]]; then
        printf '%s\n' "$usage"
        exit 0
    fi
    if (($# != 1)) || [[ -z $1 || $1 == -* ]]; then
        printf '%s\n' "$usage" >&2
        exit 2
    fi
}

# Succeed when DEST/FOLDER is already installed; fail when FOLDER exists without its marker.
already_installed() {
    local dest=$1 folder=$2
    if [[ -f $dest/$folder/.complete ]]; then
        return 0
    fi
    if [[ -e $dest/$folder ]]; then
        die "'$dest/$folder' exists but has no .complete marker (an older or foreign copy)." \
            "Remove or rename it, then rerun this script."
    fi
    return 1
}

# Check FILE (downloaded as NAME) against the md5 held in the variable named MD5_VAR (empty =
# skip); on a mismatch remove FILE and exit with a message naming NAME, its URL and the variables.
verify_md5() {
    local file=$1 name=$2 url_var=$3 md5_var=$4
    local expected=${!md5_var}
    local actual
    if [[ -z $expected ]]; then
        info "No checksum for $name ($md5_var is empty); not verifying it."
        return 0
    fi
    actual=$(md5_of "$file")
    if [[ $actual != "$expected" ]]; then
        rm -f -- "$file"
        die "checksum mismatch for $name" \
            "URL: ${!url_var}" \
            "expected md5: $expected" \
            "actual md5:   $actual" \
            "The corrupt file was deleted. Rerun this script to download it again." \
            "If your mirror ($url_var) serves a different version on purpose, set $md5_var to its md5" \
            "(or to an empty value to skip the check)."
    fi
}

# Print the size in bytes that the server announces for URL (nothing when it announces none or
# answers the request for the headers with an error).
remote_size() {
    local headers
    headers=$(curl -sfLI -- "$1" 2>/dev/null) || return 0
    printf '%s\n' "$headers" | tr -d '\r' |
        awk '/^HTTP\// { size = "" } tolower($1) == "content-length:" { size = $2 }
             END { if (size ~ /^[0-9]+$/) print size }'
}

# Print what the partial download PART of URL holds: "complete" when its size is the size the
# server announces or, when the server announces none, when its md5 is EXPECTED (empty: unknown);
# "oversized" when it is larger than the remote file; "partial" otherwise (also when absent).
part_state() {
    local part=$1 url=$2 expected=$3
    local size remote
    if [[ ! -s $part ]]; then
        echo partial
        return 0
    fi
    size=$(($(wc -c <"$part")))
    remote=$(remote_size "$url")
    if [[ -n $remote ]]; then
        if ((size == remote)); then
            echo complete
        elif ((size > remote)); then
            echo oversized
        else
            echo partial
        fi
    elif [[ -n $expected && $(md5_of "$part") == "$expected" ]]; then
        echo complete
    else
        echo partial
    fi
}

# Download URL into PART, resuming it. An HTTP 416 answer (no bytes left after the end of PART)
# means PART is already complete. On any other failure exit with advice naming NAME and URL_VAR.
download() {
    local url=$1 part=$2 name=$3 url_var=$4
    local code
    if code=$(curl -fL --retry 3 -C - --progress-bar -w '%{http_code}' -o "$part" -- "$url"); then
        return 0
    fi
    if [[ $code == 416 ]]; then
        info "The server has no bytes after the end of $part (HTTP 416): taking it as complete."
        return 0
    fi
    local advice=("Check your connection and rerun this script (the download resumes where it stopped)."
        "If the file moved, set $url_var to a working URL (file:///path for a local copy).")
    if [[ -s $part ]]; then
        advice+=("If resuming keeps failing, delete the partial file '$part' and rerun.")
    else
        rm -f -- "$part"
    fi
    die "could not download $name" "URL: $url" "${advice[@]}"
}

# Download the URL held in the variable named URL_VAR into DIR/NAME (resuming DIR/NAME.part unless
# it is already complete) and verify it against the md5 held in MD5_VAR. A file already in DIR is
# only re-verified.
fetch() {
    local dir=$1 name=$2 url_var=$3 md5_var=$4
    local url=${!url_var}
    local file=$dir/$name
    local state
    [[ -n $url ]] || die "no URL for $name: $url_var is empty." "Set $url_var to a working URL."
    if [[ -f $file ]]; then
        info "Found $file; not downloading it again."
        verify_md5 "$file" "$name" "$url_var" "$md5_var"
        return 0
    fi
    state=$(part_state "$file.part" "$url" "${!md5_var}")
    if [[ $state == oversized ]]; then
        info "$file.part is larger than the file at $url (did it change?); downloading it again."
        rm -f -- "$file.part"
    fi
    if [[ $state == complete ]]; then
        info "Found the complete download $file.part; not downloading it again."
    else
        info "Downloading $name from $url"
        download "$url" "$file.part" "$name" "$url_var"
    fi
    verify_md5 "$file.part" "$name" "$url_var" "$md5_var"
    mv -- "$file.part" "$file"
}

# Remove the staging data root, if any (EXIT trap).
remove_staging() {
    if [[ -n $STAGING_ROOT && -d $STAGING_ROOT ]]; then
        rm -rf -- "$STAGING_ROOT"
    fi
}

# Create a fresh staging data root inside DEST for FOLDER and print its path. Its name records
# its owner, this machine and this script's process id, for remove_stale_staging.
make_staging() {
    local dest=$1 folder=$2
    mktemp -d "$dest/.staging-$folder.$(uname -n).$$.XXXXXX" ||
        die "could not create a staging folder in '$dest'."
}

# Succeed when process PID is running on this machine, whoever owns it.
process_running() {
    kill -0 "$1" 2>/dev/null || ps -p "$1" >/dev/null 2>&1
}

# Remove the staging folders of FOLDER in DEST whose owner process is gone from this machine (a
# run killed during extraction or the folds step), and those without an owner in their name (made
# before owners were recorded). Leave those owned by a running process or by another machine.
remove_stale_staging() {
    local dest=$1 folder=$2
    local dir rest owner host pid
    for dir in "$dest/.staging-$folder."*/; do
        [[ -d $dir ]] || continue
        dir=${dir%/}
        rest=${dir##*/.staging-"$folder".}
        if [[ $rest == *.* ]]; then
            owner=${rest%.*}
            host=${owner%.*}
            pid=${owner##*.}
            if [[ $host != "$(uname -n)" ]] || process_running "$pid"; then
                info "Leaving $dir: it belongs to process $pid on $host, which may still be running." \
                    "If no download script is running there, delete it."
                continue
            fi
        fi
        info "Removing $dir, left by an interrupted run."
        rm -rf -- "$dir"
    done
}

# Extract ARCHIVE (.zip, .tgz or .tar.gz) into DIR.
extract() {
    local archive=$1 dir=$2
    local status=0
    info "Extracting $(basename -- "$archive")"
    mkdir -p -- "$dir"
    case $archive in
        *.zip) unzip -q -o "$archive" -d "$dir" || status=$? ;;
        *.tgz | *.tar.gz) tar -xzf "$archive" -C "$dir" || status=$? ;;
        *) die "do not know how to extract '$archive'." ;;
    esac
    if ((status != 0)); then
        die "could not extract '$archive' (it may be corrupt, truncated or a web page)." \
            "Delete it and rerun this script to download it again. If the server answers with a web" \
            "page instead of the archive, fetch the file by hand and set the matching *_URL variable" \
            "to file:///path/to/it."
    fi
}

# Exit with a message unless every path (relative to ROOT) exists.
require_layout() {
    local root=$1
    shift
    local path
    for path in "$@"; do
        [[ -e $root/$path ]] || die "unexpected archive content: '$path' is missing after extraction." \
            "Check that the download URLs point at the right files, delete them from" \
            "'$(dirname -- "$root")/.downloads' if needed, and rerun this script."
    done
}

# Run create_folds.py (next to SCRIPT_DIR) for each dataset name on DATA_ROOT, unless SKIP_FOLDS=1.
make_folds() {
    local script_dir=$1 data_root=$2
    shift 2
    local python=${PYTHON:-python3}
    local name
    if [[ ${SKIP_FOLDS:-0} == 1 ]]; then
        info "SKIP_FOLDS=1: skipping the folds step."
        return 0
    fi
    if [[ ! -f $script_dir/create_folds.py ]]; then
        info "create_folds.py not found next to this script; skipping the folds step."
        return 0
    fi
    for name in "$@"; do
        info "Creating the folds: $python create_folds.py --dataset $name"
        if ! (cd -- "$script_dir" && "$python" create_folds.py --dataset "$name" --data-root "$data_root"); then
            die "the folds step failed: $python create_folds.py --dataset $name --data-root <data root>" \
                "The downloaded files are kept; fix the problem and rerun this script, or rerun it with" \
                "SKIP_FOLDS=1 and run create_folds.py yourself later."
        fi
    done
}

# Mark STAGING_ROOT/FOLDER complete, move it to DEST/FOLDER and drop the downloads unless
# KEEP_ARCHIVES=1. The remaining arguments are the downloaded file names.
install_folder() {
    local dest=$1 folder=$2
    shift 2
    local name
    touch -- "$STAGING_ROOT/$folder/.complete"
    mv -- "$STAGING_ROOT/$folder" "$dest/$folder"
    remove_staging
    if [[ ${KEEP_ARCHIVES:-0} != 1 ]]; then
        for name in "$@"; do
            rm -f -- "$dest/.downloads/$name"
        done
        rmdir -- "$dest/.downloads" 2>/dev/null || true
    fi
    info "Done: $dest/$folder"
}

# Remove the staging area on exit, including on interruption.
install_traps() {
    trap remove_staging EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Help text shared by every script.
# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_HELP="Common environment variables:
  *_URL           override a download URL (http(s)://, or file:///path for a local copy).
  *_MD5           override an expected md5; an empty value skips the check.
  SKIP_FOLDS=1    do not run create_folds.py after extraction.
  KEEP_ARCHIVES=1 keep the downloaded files in DEST/.downloads/ after installation.
  PYTHON          Python interpreter used for create_folds.py (default: python3).

Downloads go to DEST/.downloads/ and resume when the script is rerun. Archives are extracted
into a staging folder DEST/.staging-* (one left by a killed run is removed by the next run); the
dataset folder appears in DEST only once complete (it then holds a .complete marker) and a later
run does nothing. When create_folds.py sits next to this script it is run on the new data
(skipped with SKIP_FOLDS=1; then run 'python3 create_folds.py --dataset NAME --data-root DEST'
yourself later)."

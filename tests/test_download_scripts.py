"""Tests of the dataset download scripts on tiny fake archives served from the local machine."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepmil.registry import DATASETS as REGISTRY
from helpers import REPO

GLAS_INNER = "Warwick QU Dataset (Released 2016_07_08)"
MD5_ZERO = "0" * 32

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "curl", "unzip", "tar", "gzip")),
    reason="the download scripts need bash, curl, unzip, tar and gzip",
)


@dataclass(frozen=True)
class Source:
    """One downloaded file: its name, its variable prefix and its content.

    `members` maps archive member paths to bytes for an archive; `content` is the bytes of a plain
    file that is copied as is into the dataset folder.
    """

    prefix: str
    name: str
    members: dict | None = None
    content: bytes | None = None


@dataclass(frozen=True)
class Dataset:
    """A download script with the fake files it fetches."""

    script: str
    folder: str
    sources: tuple[Source, ...]


DATASETS = {
    "glas": Dataset(
        script="download-glas-dataset.sh",
        folder="GlaS-2015",
        sources=(
            Source(
                "GLAS",
                "warwick_qu_dataset_released_2016_07_08.zip",
                members={
                    f"{GLAS_INNER}/train_1.bmp": b"BM train 1",
                    f"{GLAS_INNER}/train_1_anno.bmp": b"BM train 1 anno",
                    f"{GLAS_INNER}/testA_1.bmp": b"BM testA 1",
                    f"{GLAS_INNER}/testA_1_anno.bmp": b"BM testA 1 anno",
                    f"{GLAS_INNER}/testB_1.bmp": b"BM testB 1",
                    f"{GLAS_INNER}/testB_1_anno.bmp": b"BM testB 1 anno",
                    f"{GLAS_INNER}/Grade.csv": (
                        b"name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)\n"
                        b"testA_1,4,benign,adenomatous\ntestB_1,2,malignant,moderately differentiated\n"
                        b"train_1,1,malignant,healthy\n"
                    ),
                },
            ),
        ),
    ),
    "cub": Dataset(
        script="download-caltech-ucsd-birds-200-2011-dataset.sh",
        folder="Caltech-UCSD-Birds-200-2011",
        sources=(
            Source(
                "CUB_IMAGES",
                "CUB_200_2011.tgz",
                members={
                    "attributes.txt": b"1 has_bill_shape::curved\n",
                    "CUB_200_2011/images/001.Black_footed_Albatross/a_1.jpg": b"jpeg a 1",
                    "CUB_200_2011/images/002.Laysan_Albatross/b_2.jpg": b"jpeg b 2",
                    "CUB_200_2011/classes.txt": b"1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n",
                    "CUB_200_2011/images.txt": (
                        b"1 001.Black_footed_Albatross/a_1.jpg\n2 002.Laysan_Albatross/b_2.jpg\n"
                    ),
                    "CUB_200_2011/image_class_labels.txt": b"1 1\n2 2\n",
                    "CUB_200_2011/train_test_split.txt": b"1 1\n2 0\n",
                },
            ),
            Source(
                "CUB_SEGMENTATIONS",
                "segmentations.tgz",
                members={
                    "segmentations/001.Black_footed_Albatross/a_1.png": b"png a 1",
                    "segmentations/002.Laysan_Albatross/b_2.png": b"png b 2",
                },
            ),
        ),
    ),
    "oxf": Dataset(
        script="download-Oxford-flowers-102-dataset.sh",
        folder="Oxford-flowers-102",
        sources=(
            Source(
                "OXF_IMAGES",
                "102flowers.tgz",
                members={"jpg/image_00001.jpg": b"jpeg 1", "jpg/image_00002.jpg": b"jpeg 2"},
            ),
            Source(
                "OXF_SEGMENTATIONS",
                "102segmentations.tgz",
                members={
                    "segmim/segmim_00001.jpg": b"trimap 1",
                    "segmim/segmim_00002.jpg": b"trimap 2",
                },
            ),
            Source("OXF_LABELS", "imagelabels.mat", content=b"MATLAB placeholder: labels " * 8),
            Source("OXF_SETID", "setid.mat", content=b"MATLAB placeholder: setid " * 8),
        ),
    ),
}

OWN_VARIABLES = ("SKIP_FOLDS", "KEEP_ARCHIVES", "PYTHON") + tuple(
    f"{source.prefix}_{kind}"
    for dataset in DATASETS.values()
    for source in dataset.sources
    for kind in ("URL", "MD5")
)


def archive_bytes(name: str, members: dict) -> bytes:
    """Return a .zip or .tgz archive holding `members` (path -> bytes)."""
    buffer = io.BytesIO()
    if name.endswith(".zip"):
        with zipfile.ZipFile(buffer, "w") as archive:
            for path, data in members.items():
                archive.writestr(path, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for path, data in members.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def source_bytes(source: Source) -> bytes:
    """Return the bytes the server offers for `source`."""
    if source.members is None:
        return source.content
    return archive_bytes(source.name, source.members)


def write_sources(dataset: Dataset, directory: Path) -> dict[str, Path]:
    """Write the fake files of `dataset` into `directory`; return prefix -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for source in dataset.sources:
        path = directory / source.name
        path.write_bytes(source_bytes(source))
        paths[source.prefix] = path
    return paths


def md5_of(path: Path) -> str:
    """Return the md5 hex digest of a file."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def source_env(paths: dict[str, Path], base_url: str | None = None) -> dict[str, str]:
    """Return the URL and MD5 overrides for files served as file:// URLs or under `base_url`."""
    env = {}
    for prefix, path in paths.items():
        env[f"{prefix}_URL"] = path.as_uri() if base_url is None else f"{base_url}/{path.name}"
        env[f"{prefix}_MD5"] = md5_of(path)
    return env


def expected_files(dataset: Dataset) -> dict[str, bytes]:
    """Return the files (path relative to DEST -> bytes) an installation must hold."""
    files = {}
    for source in dataset.sources:
        if source.members is None:
            files[f"{dataset.folder}/{source.name}"] = source.content
        else:
            for path, data in source.members.items():
                files[f"{dataset.folder}/{path}"] = data
    return files


def run_script(script: Path, dest: Path, overrides: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a download script on `dest` with a clean environment plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if key not in OWN_VARIABLES}
    env.update({"SKIP_FOLDS": "1", "NO_PROXY": "*", "no_proxy": "*"})
    env.update(overrides)
    return subprocess.run(
        ["bash", str(script), str(dest)], env=env, capture_output=True, text=True, timeout=60
    )


def assert_not_installed(dataset: Dataset, dest: Path) -> None:
    """Check that nothing in `dest` looks like a complete or half-extracted dataset."""
    assert not (dest / dataset.folder).exists()
    assert not list(dest.rglob(".complete"))
    assert not list(dest.glob(".staging-*"))
    assert not list(dest.rglob("*.part"))


class QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that does not log requests."""

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve a fresh folder over HTTP on 127.0.0.1; yield (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dest(tmp_path):
    """Destination data root, with a space in its path to exercise quoting."""
    return tmp_path / "data root"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_installs_layout_from_file_urls_and_second_run_does_nothing(name, tmp_path, dest):
    dataset = DATASETS[name]
    env = source_env(write_sources(dataset, tmp_path / "src"))
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative
    assert (dest / dataset.folder / ".complete").is_file()
    assert not (dest / ".downloads").exists()
    assert not list(dest.glob(".staging-*"))

    marker_time = (dest / dataset.folder / ".complete").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "src")
    again = run_script(REPO / dataset.script, dest, env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert (dest / dataset.folder / ".complete").stat().st_mtime_ns == marker_time
    assert not (dest / ".downloads").exists()


def test_installs_over_http_and_keeps_archives_on_request(http_root, dest):
    root, base_url = http_root
    dataset = DATASETS["cub"]
    paths = write_sources(dataset, root)
    env = source_env(paths, base_url) | {"KEEP_ARCHIVES": "1"}
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative
    for path in paths.values():
        assert (dest / ".downloads" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("name", "prefix"), [("glas", "GLAS"), ("cub", "CUB_SEGMENTATIONS"), ("oxf", "OXF_SETID")]
)
def test_wrong_md5_fails_without_installing(name, prefix, tmp_path, dest):
    dataset = DATASETS[name]
    env = source_env(write_sources(dataset, tmp_path / "src")) | {f"{prefix}_MD5": MD5_ZERO}
    result = run_script(REPO / dataset.script, dest, env)
    file_name = next(source.name for source in dataset.sources if source.prefix == prefix)
    assert result.returncode != 0
    assert f"checksum mismatch for {file_name}\n" in result.stderr
    assert env[f"{prefix}_URL"] in result.stderr
    assert f"{prefix}_MD5" in result.stderr
    assert_not_installed(dataset, dest)
    assert not (dest / ".downloads" / file_name).exists()


def test_missing_file_url_fails_cleanly(tmp_path, dest):
    dataset = DATASETS["oxf"]
    env = source_env(write_sources(dataset, tmp_path / "src"))
    missing = (tmp_path / "src" / "no-such-file.tgz").as_uri()
    result = run_script(REPO / dataset.script, dest, env | {"OXF_SEGMENTATIONS_URL": missing})
    assert result.returncode != 0
    assert "could not download 102segmentations.tgz" in result.stderr
    assert missing in result.stderr
    assert "OXF_SEGMENTATIONS_URL" in result.stderr
    assert_not_installed(dataset, dest)


def test_http_404_fails_cleanly(http_root, dest):
    root, base_url = http_root
    dataset = DATASETS["glas"]
    env = source_env(write_sources(dataset, root), base_url)
    env["GLAS_URL"] = f"{base_url}/moved.zip"
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode != 0
    assert "could not download warwick_qu_dataset_released_2016_07_08.zip" in result.stderr
    assert env["GLAS_URL"] in result.stderr
    assert_not_installed(dataset, dest)


def test_resumes_a_partial_download(tmp_path, dest):
    dataset = DATASETS["oxf"]
    env = source_env(write_sources(dataset, tmp_path / "src")) | {"OXF_SETID_MD5": ""}
    source = (tmp_path / "src" / "setid.mat").read_bytes()
    head = b"#" * 40
    (dest / ".downloads").mkdir(parents=True)
    (dest / ".downloads" / "setid.mat.part").write_bytes(head)
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    assert (dest / dataset.folder / "setid.mat").read_bytes() == head + source[len(head) :]


def test_folder_without_marker_is_left_alone(tmp_path, dest):
    dataset = DATASETS["cub"]
    env = source_env(write_sources(dataset, tmp_path / "src"))
    foreign = dest / dataset.folder / "mine.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("keep me")
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode != 0
    assert "has no .complete marker" in result.stderr
    assert foreign.read_text() == "keep me"
    assert sorted(path.name for path in dest.iterdir()) == [dataset.folder]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_help_and_usage(name):
    script = REPO / DATASETS[name].script
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for source in DATASETS[name].sources:
        assert f"{source.prefix}_URL" in shown.stdout
        assert f"{source.prefix}_MD5" in shown.stdout
    assert "SKIP_FOLDS" in shown.stdout
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "Usage:" in missing.stderr


def copy_scripts(target: Path, create_folds: str) -> Path:
    """Copy the scripts next to a stand-in create_folds.py; return the copied folder."""
    (target / "dependencies").mkdir(parents=True)
    for dataset in DATASETS.values():
        shutil.copy2(REPO / dataset.script, target / dataset.script)
    shutil.copy2(
        REPO / "dependencies" / "download_lib.sh", target / "dependencies" / "download_lib.sh"
    )
    (target / "create_folds.py").write_text(create_folds)
    return target


RECORDING_CREATE_FOLDS = """
import argparse, json, os, pathlib, sys
parser = argparse.ArgumentParser()
parser.add_argument("--dataset")
parser.add_argument("--data-root")
args = parser.parse_args()
root = pathlib.Path(args.data_root)
record = {
    "dataset": args.dataset,
    "parent": str(root.parent),
    "data_root": root.name,
    "cwd": os.getcwd(),
    "has_images_txt": (root / "Caltech-UCSD-Birds-200-2011/CUB_200_2011/images.txt").is_file(),
}
with open(os.environ["FOLDS_LOG"], "a") as log:
    print(json.dumps(record), file=log)
sys.exit(int(os.environ.get("FOLDS_EXIT", "0")))
"""


def test_folds_step_runs_on_the_extracted_data(tmp_path, dest):
    dataset = DATASETS["cub"]
    scripts = copy_scripts(tmp_path / "repo", RECORDING_CREATE_FOLDS)
    log = tmp_path / "folds.log"
    env = source_env(write_sources(dataset, tmp_path / "src"))
    env |= {"SKIP_FOLDS": "0", "PYTHON": shutil.which("python3") or "python", "FOLDS_LOG": str(log)}
    result = run_script(scripts / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [record["dataset"] for record in records] == ["cub", "cub5"]
    for record in records:
        assert record["parent"] == str(dest)
        assert record["data_root"].startswith(f".staging-{dataset.folder}.")
        assert record["cwd"] == str(scripts)
        assert record["has_images_txt"]
    assert (dest / dataset.folder / ".complete").is_file()


def test_failed_folds_step_installs_nothing_and_keeps_downloads(tmp_path, dest):
    dataset = DATASETS["cub"]
    scripts = copy_scripts(tmp_path / "repo", RECORDING_CREATE_FOLDS)
    env = source_env(write_sources(dataset, tmp_path / "src"))
    env |= {
        "SKIP_FOLDS": "0",
        "PYTHON": shutil.which("python3") or "python",
        "FOLDS_LOG": str(tmp_path / "folds.log"),
        "FOLDS_EXIT": "1",
    }
    result = run_script(scripts / dataset.script, dest, env)
    assert result.returncode != 0
    assert "the folds step failed" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "folds.log").read_text().splitlines()]
    assert [record["dataset"] for record in records] == ["cub"]
    assert_not_installed(dataset, dest)
    assert sorted(path.name for path in (dest / ".downloads").iterdir()) == [
        "CUB_200_2011.tgz",
        "segmentations.tgz",
    ]

    shutil.rmtree(tmp_path / "src")
    retry = run_script(scripts / dataset.script, dest, env | {"FOLDS_EXIT": "0"})
    assert retry.returncode == 0, retry.stderr
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative


class RangeHandler(QuietHandler):
    """Static file handler that honours `Range: bytes=START-[END]` requests and records every request.

    A range starting at or after the end of the file gets 416 (Range Not Satisfiable), as real
    servers answer; HEAD gets 405 when the server's `refuse_head` is set (a server announcing no
    size). Each request is appended to the server's `requests` as (method, path, Range header).
    """

    timeout = 10

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, None))
        if self.server.refuse_head:
            self.send_error(405)
            return
        super().do_HEAD()

    def do_GET(self):
        asked = self.headers.get("Range")
        self.server.requests.append(("GET", self.path, asked))
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked or "")
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        start = int(match[1])
        end = min(int(match[2]), len(data) - 1) if match[2] else len(data) - 1
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


@dataclass
class RangeServer:
    """A running RangeHandler server: its folder, base URL and server object."""

    root: Path
    base_url: str
    server: ThreadingHTTPServer

    def requests_for(self, name: str) -> list[tuple]:
        """Return the requests made so far for the file `name`."""
        return [request for request in self.server.requests if request[1] == f"/{name}"]


@pytest.fixture
def range_http(tmp_path):
    """Serve a fresh folder with RangeHandler on 127.0.0.1 (answering HEAD until told otherwise)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    server.daemon_threads = True
    server.requests = []
    server.refuse_head = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield RangeServer(root, f"http://127.0.0.1:{server.server_address[1]}", server)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def setid_over_http(served: RangeServer, dest: Path, part: bytes) -> tuple[dict[str, str], bytes]:
    """Serve the Oxford files and leave `part` as DEST/.downloads/setid.mat.part.

    Return the URL and MD5 overrides and the bytes of the served setid.mat.
    """
    env = source_env(write_sources(DATASETS["oxf"], served.root), served.base_url)
    (dest / ".downloads").mkdir(parents=True)
    (dest / ".downloads" / "setid.mat.part").write_bytes(part)
    return env, (served.root / "setid.mat").read_bytes()


@pytest.mark.parametrize(
    ("refuse_head", "with_md5", "reply"),
    [(False, True, "size"), (True, True, "md5"), (True, False, "416")],
    ids=["size-matches", "md5-matches", "server-answers-416"],
)
def test_complete_part_is_not_downloaded_again_over_http(
    range_http, dest, refuse_head, with_md5, reply
):
    range_http.server.refuse_head = refuse_head
    env, setid = setid_over_http(range_http, dest, DATASETS["oxf"].sources[3].content)
    if not with_md5:
        env["OXF_SETID_MD5"] = ""
    result = run_script(REPO / DATASETS["oxf"].script, dest, env)
    assert result.returncode == 0, result.stderr
    assert (dest / "Oxford-flowers-102" / "setid.mat").read_bytes() == setid
    gets = [request for request in range_http.requests_for("setid.mat") if request[0] == "GET"]
    if reply == "416":
        assert gets == [("GET", "/setid.mat", f"bytes={len(setid)}-")]
        assert "(HTTP 416): taking it as complete" in result.stderr
    else:
        assert gets == []
        assert f"Found the complete download {dest}/.downloads/setid.mat.part" in result.stderr


@pytest.mark.parametrize("refuse_head", [False, True], ids=["size-known", "size-unknown"])
def test_partial_part_resumes_over_http(range_http, dest, refuse_head):
    range_http.server.refuse_head = refuse_head
    setid = DATASETS["oxf"].sources[3].content
    env, _ = setid_over_http(range_http, dest, setid[:40])
    result = run_script(REPO / DATASETS["oxf"].script, dest, env)
    assert result.returncode == 0, result.stderr
    assert (dest / "Oxford-flowers-102" / "setid.mat").read_bytes() == setid
    gets = [request for request in range_http.requests_for("setid.mat") if request[0] == "GET"]
    assert gets == [("GET", "/setid.mat", "bytes=40-")]


def test_part_larger_than_the_remote_file_is_downloaded_again(range_http, dest):
    setid = DATASETS["oxf"].sources[3].content
    env, _ = setid_over_http(range_http, dest, setid + b"from an older, longer version")
    env["OXF_SETID_MD5"] = ""
    result = run_script(REPO / DATASETS["oxf"].script, dest, env)
    assert result.returncode == 0, result.stderr
    assert "setid.mat.part is larger than the file at" in result.stderr
    assert (dest / "Oxford-flowers-102" / "setid.mat").read_bytes() == setid
    gets = [request for request in range_http.requests_for("setid.mat") if request[0] == "GET"]
    assert gets == [("GET", "/setid.mat", None)]


@pytest.mark.parametrize("refuse_head", [False, True], ids=["size-known", "size-unknown"])
def test_corrupt_complete_part_fails_then_rerun_downloads_it_again(range_http, dest, refuse_head):
    range_http.server.refuse_head = refuse_head
    setid = DATASETS["oxf"].sources[3].content
    env, _ = setid_over_http(range_http, dest, b"X" * len(setid))
    result = run_script(REPO / DATASETS["oxf"].script, dest, env)
    assert result.returncode != 0
    assert "checksum mismatch for setid.mat\n" in result.stderr
    assert f"actual md5:   {hashlib.md5(b'X' * len(setid)).hexdigest()}" in result.stderr
    assert "The corrupt file was deleted. Rerun this script" in result.stderr
    assert_not_installed(DATASETS["oxf"], dest)
    assert not (dest / ".downloads" / "setid.mat").exists()

    retry = run_script(REPO / DATASETS["oxf"].script, dest, env)
    assert retry.returncode == 0, retry.stderr
    for relative, data in expected_files(DATASETS["oxf"]).items():
        assert (dest / relative).read_bytes() == data, relative
    assert [request for request in range_http.requests_for("setid.mat") if request[0] == "GET"][
        -1
    ] == ("GET", "/setid.mat", None)


BLOCKING_CREATE_FOLDS = """
import os, pathlib, time
pathlib.Path(os.environ["FOLDS_STARTED"]).touch()
time.sleep(60)
"""


@pytest.fixture
def blocked_glas_run(tmp_path, dest):
    """Start download-glas-dataset.sh on DEST, stopped in its folds step; yield (process, staging, env).

    `env` holds the URL and MD5 overrides of the files the run fetched, for further runs on DEST.

    The run is a process group of its own, killed with SIGKILL at teardown if still running.
    """
    dataset = DATASETS["glas"]
    scripts = copy_scripts(tmp_path / "repo", BLOCKING_CREATE_FOLDS)
    started = tmp_path / "folds-started"
    sources = source_env(write_sources(dataset, tmp_path / "src"))
    env = {key: value for key, value in os.environ.items() if key not in OWN_VARIABLES}
    env |= sources | {"PYTHON": shutil.which("python3") or "python", "FOLDS_STARTED": str(started)}
    process = subprocess.Popen(
        ["bash", str(scripts / dataset.script), str(dest)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert process.poll() is None, "the download script ended before its folds step"
            assert time.monotonic() < deadline, "the download script did not reach its folds step"
            time.sleep(0.05)
        (staging,) = dest.glob(f".staging-{dataset.folder}.*")
        assert (staging / dataset.folder / GLAS_INNER / "Grade.csv").is_file()
        yield process, staging, sources
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def kill_run(process: subprocess.Popen) -> None:
    """SIGKILL a run started by blocked_glas_run (its whole process group) and wait for it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def test_staging_folder_of_a_killed_run_is_removed_by_the_next_run(blocked_glas_run, dest):
    process, staging, env = blocked_glas_run
    kill_run(process)
    assert staging.is_dir()
    dataset = DATASETS["glas"]
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    assert f"Removing {staging}, left by an interrupted run." in result.stderr
    assert not list(dest.glob(".staging-*"))
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative


def test_staging_folder_of_a_running_script_is_left_alone(blocked_glas_run, dest):
    process, staging, env = blocked_glas_run
    dataset = DATASETS["glas"]
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    owner = f"it belongs to process {process.pid} on {os.uname().nodename}"
    assert f"Leaving {staging}: {owner}" in result.stderr
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative
        assert (staging / relative).read_bytes() == data, relative
    assert list(dest.glob(".staging-*")) == [staging]

    kill_run(process)
    again = run_script(REPO / dataset.script, dest, env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert f"Removing {staging}, left by an interrupted run." in again.stderr
    assert not list(dest.glob(".staging-*"))


def dead_pid() -> int:
    """Return the process id of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("owner", "removed"),
    [
        (lambda: "", True),
        (lambda: f"{os.uname().nodename}.{dead_pid()}.", True),
        (lambda: f"{os.uname().nodename}.1.", False),
        (lambda: f"elsewhere.example.{dead_pid()}.", False),
    ],
    ids=["no-owner", "dead-process", "running-process", "other-machine"],
)
def test_leftover_staging_folders_are_removed_only_when_stale(owner, removed, tmp_path, dest):
    dataset = DATASETS["glas"]
    leftover = dest / f".staging-{dataset.folder}.{owner()}Ab12Cd"
    (leftover / dataset.folder).mkdir(parents=True)
    (leftover / dataset.folder / "half.bmp").write_bytes(b"half extracted")
    env = source_env(write_sources(dataset, tmp_path / "src"))
    result = run_script(REPO / dataset.script, dest, env)
    assert result.returncode == 0, result.stderr
    for relative, data in expected_files(dataset).items():
        assert (dest / relative).read_bytes() == data, relative
    if removed:
        assert f"Removing {leftover}, left by an interrupted run." in result.stderr
        assert not leftover.exists()
    else:
        assert f"Leaving {leftover}: it belongs to process" in result.stderr
        assert (leftover / dataset.folder / "half.bmp").read_bytes() == b"half extracted"


def test_the_dataset_registry_names_the_script_that_downloads_each_dataset():
    downloaded = {
        row.download: row.folder.split("/")[0] for row in REGISTRY.values() if row.download
    }
    assert downloaded == {dataset.script: dataset.folder for dataset in DATASETS.values()}
    assert all((REPO / script).is_file() for script in downloaded)
    assert REGISTRY["synthetic"].download is None

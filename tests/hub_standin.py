"""A stand-in of the Hugging Face Hub on 127.0.0.1, for the tests that download by hub id.

`huggingface_hub` (snapshot_download, hf_hub_download, HfFileSystem, HfApi.*_info) and `datasets`
(load_dataset, streaming too) talk to it through HF_ENDPOINT as they talk to huggingface.co: the
same routes, the same headers and the same error codes (huggingface_hub 2.4's `hf_raise_for_status`
turns X-Error-Code into RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError). Git
LFS files are redirected, as on the hub, to a CDN: here a second port, so that the client sees a
host other than the hub's and reads the file's metadata from the redirect itself. The stand-in
never announces Xet storage, as the hub answers for a repository stored without Xet.

- `HubRepo`: one repository (files, one made-up commit sha); `build_test_repos` makes the test
  suite's (mamba-130m in both layouts, gpt-neox-20b's tokenizer, the Pile, both lambadas).
- `HubStandIn`: the server (a context manager); every request is logged (`requests`).
- `client_env`: the environment of a subprocess that uses the stand-in: hub endpoint, offline mode
  off, every cache under one folder, proxies pointing at the stand-in (a request for any other
  host reaches it and is logged), and `refuse_non_loopback_connections` installed at start-up.

Only the standard library is imported at module level: `conftest.py` imports this module in every
test session, and subprocesses load it from `sitecustomize` (`client_env`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property, partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

MODEL, DATASET = "model", "dataset"
# Files the hub's default .gitattributes sends to Git LFS (the subset these repositories hold).
LFS_SUFFIXES = (".bin", ".safetensors", ".parquet", ".zst", ".pt", ".arrow")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
CREATED_AT = "2023-12-01T00:00:00.000Z"
BLOCKED_LOG_VARIABLE = "HUB_STANDIN_BLOCKED_LOG"


# --- repositories ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        """The git blob id: of the content, or for an LFS file of its pointer file (what git stores)."""
        stored = self.lfs_pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    def tree_entry(self, expand: bool = False, commit: str = "") -> dict:
        entry = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.lfs_pointer)}
        if expand:
            entry["lastCommit"] = _last_commit(commit)
        return entry


def _last_commit(commit: str) -> dict:
    return {"id": commit, "title": "Upload", "date": LAST_MODIFIED}


@dataclass
class HubRepo:
    """A repository with a single commit on `main`; its sha is made up from the content, so it is
    the same in every session."""

    repo_type: str
    repo_id: str
    files: dict[str, HubFile] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, repo_type: str, repo_id: str, folder: Path) -> "HubRepo":
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
        }
        return cls.from_contents(repo_type, repo_id, files)

    @classmethod
    def from_contents(cls, repo_type: str, repo_id: str, contents: dict[str, bytes]) -> "HubRepo":
        contents = {".gitattributes": GITATTRIBUTES.encode(), **contents}
        return cls(repo_type, repo_id, {path: HubFile(path, data) for path, data in sorted(contents.items())})

    @cached_property
    def commit(self) -> str:
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}\n".encode())
        for path, file in sorted(self.files.items()):
            digest.update(f"{path} {file.git_oid}\n".encode())
        return digest.hexdigest()

    def resolve(self, revision: str) -> Optional[str]:
        """The commit of a revision: the branch `main` or the commit sha itself; None otherwise."""
        return self.commit if revision in ("main", "refs/heads/main", self.commit) else None

    @cached_property
    def directories(self) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in self.files for depth in range(1, path.count("/") + 1)}

    def directory_entry(self, path: str, expand: bool = False) -> dict:
        oid = hashlib.sha1(f"tree {self.commit} {path}".encode()).hexdigest()
        entry = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = _last_commit(self.commit)
        return entry

    def entry(self, path: str, expand: bool = False) -> Optional[dict]:
        if path in self.files:
            return self.files[path].tree_entry(expand, self.commit)
        if path in self.directories:
            return self.directory_entry(path, expand)
        return None

    def tree(self, folder: str, recursive: bool, expand: bool = False) -> list[dict]:
        """The entries under `folder` ("" = the root), folders first, as the hub lists them."""
        prefix = f"{folder}/" if folder else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        folders = [self.directory_entry(path, expand) for path in sorted(self.directories) if listed(path)]
        files = [file.tree_entry(expand, self.commit) for path, file in self.files.items() if listed(path)]
        return folders + files

    def info(self, blobs: bool = False, expand: Optional[list[str]] = None) -> dict:
        """What /api/models/{id} or /api/datasets/{id} answers (a subset of the hub's fields)."""
        siblings = []
        for path, file in self.files.items():
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(file.data), blobId=file.git_oid)
                if file.lfs:
                    sibling["lfs"] = {"sha256": file.sha256, "size": len(file.data), "pointerSize": len(file.lfs_pointer)}
            siblings.append(sibling)
        info = {
            "_id": self.commit[:24],
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": self.commit,
            "lastModified": LAST_MODIFIED,
            "createdAt": CREATED_AT,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(file.data) for file in self.files.values()),
        }
        if self.repo_type == MODEL:
            info["modelId"] = self.repo_id
        if expand:  # the hub then answers only the properties asked for
            info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
        return info


# --- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as the stand-in saw it. `route` is resolve, info, tree, paths-info, cdn,
    foreign (a request for another host, sent through the proxy setting) or other."""

    method: str
    target: str
    status: int
    route: str
    repo: Optional[tuple[str, str]] = None  # (repo_type, repo_id)
    revision: Optional[str] = None
    filename: Optional[str] = None
    byte_range: Optional[str] = None  # the Range header, when the client sent one


RESOLVE = re.compile(r"/(?P<datasets>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")
API_REPO = re.compile(r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?")
REVISION = re.compile(r"/revision/(?P<revision>[^/]+)")
TREE = re.compile(r"/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?")
PATHS_INFO = re.compile(r"/paths-info/(?P<revision>[^/]+)")
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CDN = re.compile(r"/repos/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/(?P<sha256>[0-9a-f]{64})")


class HubStandIn:
    """The hub on 127.0.0.1 (a free port) and its CDN on another; `with HubStandIn(repos) as hub:`
    starts both and stops them at the end, whatever happens."""

    def __init__(self, repos: list[HubRepo]):
        self.repos = {(repo.repo_type, repo.repo_id): repo for repo in repos}
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # lifecycle

    def start(self) -> "HubStandIn":
        for role in ("hub", "cdn"):
            handler = partial(_Handler, self, role)
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True  # a client that keeps its connection open must not hold up stop()
            thread = threading.Thread(target=server.serve_forever, name=f"hub-standin-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers, self._threads = [], []

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def viewer_host(self) -> str:
        """The dataset viewer's host as datasets derives it from HF_ENDPOINT (datasets-server.<host>)."""
        return f"datasets-server.{urlsplit(self.endpoint).hostname}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # the request log

    def record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def mark(self) -> int:
        """A position in the log: `requests(since=mark)` is what came after it."""
        with self._lock:
            return len(self._log)

    def requests(self, since: int = 0) -> list[Request]:
        with self._lock:
            return list(self._log[since:])

    def downloads(self, since: int = 0) -> set[tuple[str, str, str]]:
        """(repo_type, repo_id, filename) of every file whose content (or part) was sent: by the hub,
        or for an LFS file by the CDN it redirects to."""
        return {
            (*request.repo, request.filename)
            for request in self.requests(since)
            if request.route in ("resolve", "cdn") and request.method == "GET" and request.status in (200, 206)
        }

    def foreign_hosts(self, since: int = 0) -> set[str]:
        """The hosts other than the hub that clients asked for (through the proxy settings)."""
        return {urlsplit(request.filename).hostname for request in self.requests(since) if request.route == "foreign"}

    def repo(self, repo_type: str, repo_id: str) -> Optional[HubRepo]:
        return self.repos.get((repo_type, repo_id))

    def lfs_file(self, repo_type: str, repo_id: str, sha256: str) -> Optional[HubFile]:
        repo = self.repo(repo_type, repo_id)
        return next((file for file in repo.files.values() if file.lfs and file.sha256 == sha256), None) if repo else None


class _Handler(BaseHTTPRequestHandler):
    """One connection to the hub (role "hub") or to its CDN (role "cdn")."""

    protocol_version = "HTTP/1.1"  # keep-alive and ranges, as clients expect of the hub
    server_version = "hub-standin"
    timeout = 30  # an idle keep-alive connection ends its thread

    def __init__(self, hub: HubStandIn, role: str, *args, **kwargs):
        self.hub, self.role = hub, role
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args) -> None:  # the request log replaces stderr lines
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        # Read the body whatever the route, so that the connection stays usable (keep-alive).
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._dispatch()

    def do_CONNECT(self) -> None:  # HTTPS through the proxy setting: another host, never served
        self._answer_foreign(urlsplit(f"https://{self.path}"))

    # routing

    def _dispatch(self) -> None:
        if self.path.startswith(("http://", "https://")):  # an absolute URL: sent to us as a proxy
            return self._answer_foreign(urlsplit(self.path))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.role == "cdn":
            return self._answer_cdn(url.path)
        if url.path == "/api/agent-harnesses":  # huggingface_hub's user-agent detection
            return self._json(200, {"standardEnvVars": [], "harnesses": {}}, route="other")
        if url.path.startswith("/api/telemetry/"):
            return self._send(200, b"", route="other")
        if match := RESOLVE.fullmatch(url.path):
            repo_type = DATASET if match["datasets"] else MODEL
            return self._answer_resolve(repo_type, match["repo"], unquote(match["revision"]), unquote(match["filename"]))
        if match := API_REPO.fullmatch(url.path):
            return self._answer_api(match["kind"][:-1], match["repo"], match["rest"] or "", query)
        self._error(404, route="other", message="Sorry, we can't find the page you are looking for.")

    def _answer_api(self, repo_type: str, repo_id: str, rest: str, query: dict) -> None:
        expand = _flag(query, "expand")
        if rest == "" or (match := REVISION.fullmatch(rest)):
            revision = unquote(match["revision"]) if rest else "main"
            repo, commit = self._repo_at(repo_type, repo_id, revision, route="info")
            if repo is not None:
                fields = [value for value in query.get("expand", []) if value.lower() not in ("true", "false")]
                info = repo.info(blobs=_flag(query, "blobs"), expand=fields or None)
                self._json(200, info, route="info", repo=(repo_type, repo_id), revision=revision)
        elif match := TREE.fullmatch(rest):
            revision, folder = unquote(match["revision"]), unquote(match["path"] or "").strip("/")
            repo, commit = self._repo_at(repo_type, repo_id, revision, route="tree")
            if repo is None:
                return
            where = dict(route="tree", repo=(repo_type, repo_id), revision=revision, filename=folder or None)
            if folder and folder not in repo.directories:
                return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision!r}", commit=commit, **where)
            self._json(200, repo.tree(folder, _flag(query, "recursive"), expand), commit=commit, **where)
        elif (match := PATHS_INFO.fullmatch(rest)) and self.command == "POST":
            revision = unquote(match["revision"])
            paths, expand = self._paths_info_request()
            repo, commit = self._repo_at(repo_type, repo_id, revision, route="paths-info")
            if repo is not None:
                entries = [entry for path in paths if (entry := repo.entry(path.strip("/"), expand)) is not None]
                self._json(200, entries, route="paths-info", repo=(repo_type, repo_id), revision=revision, commit=commit)
        else:
            self._error(404, route="other", message="Sorry, we can't find the page you are looking for.")

    def _paths_info_request(self) -> tuple[list[str], bool]:
        """huggingface_hub posts a form (paths=..&paths=..&expand=..); JSON is accepted too."""
        body = self.body.decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            data = json.loads(body or "{}")
            return list(data.get("paths", [])), bool(data.get("expand"))
        form = parse_qs(body)
        return form.get("paths", []), _flag(form, "expand")

    def _repo_at(self, repo_type: str, repo_id: str, revision: str, route: str):
        """(repo, commit), or (None, None) after answering as the hub does: an unknown repository is
        401 RepoNotFound to an anonymous client (the hub does not tell private from missing), an
        unknown revision 404 RevisionNotFound."""
        repo = self.hub.repo(repo_type, repo_id)
        where = dict(route=route, repo=(repo_type, repo_id), revision=revision)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", **where)
            return None, None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", **where)
            return None, None
        return repo, commit

    def _answer_resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        where = dict(route="resolve", repo=(repo_type, repo_id), revision=revision, filename=filename)
        repo, commit = self._repo_at(repo_type, repo_id, revision, route="resolve")
        if repo is None:
            return
        file = repo.files.get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit=commit, **where)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if file.lfs:
            # As the hub: a redirect to the CDN whose own headers say what the file is.
            headers.update({
                "Location": f"{self.hub.cdn}/repos/{repo_type}s/{repo_id}/{file.sha256}?filename={quote(Path(filename).name)}",
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(len(file.data)),
                "ETag": f'"{file.sha256}"',
            })
            return self._send(302, b"Found. Redirecting to the CDN", headers=headers, **where)
        self._send_content(file.data, {**headers, "ETag": f'"{file.git_oid}"'}, **where)

    def _answer_cdn(self, path: str) -> None:
        """The CDN: /repos/{type}s/{owner}/{name}/{sha256}, the content of an LFS file, ranges too."""
        match = CDN.fullmatch(path)
        file = self.hub.lfs_file(match["kind"][:-1], match["repo"], match["sha256"]) if match else None
        if file is None:
            return self._send(404, b"NoSuchKey", route="cdn", filename=path)
        headers = {"ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        self._send_content(file.data, headers, route="cdn", repo=(match["kind"][:-1], match["repo"]), filename=file.path)

    def _answer_foreign(self, url) -> None:
        """A request for another host, sent here by the proxy settings of `client_env`. Only
        datasets' call to the dataset viewer (https://datasets-server.<hub host>) is expected: it is
        answered as the viewer answers for a dataset it has not processed, so that datasets falls
        back to the dataset card, as it does then."""
        target = f"{url.scheme}://{url.netloc}{url.path}"
        if self.command != "CONNECT" and url.hostname and url.hostname.startswith("datasets-server."):
            return self._json(404, {"error": "Not found."}, route="foreign", filename=target)
        self._send(403, b"the hub stand-in serves the hub only", route="foreign", filename=target, close=True)

    # responses

    def _send_content(self, data: bytes, headers: dict, **where) -> None:
        """200 with the content, or 206 with the part a Range header asks for (416 beyond the end)."""
        requested = self.headers.get("Range")
        match = RANGE.fullmatch(requested.strip()) if requested else None
        if match is None or match.groups() == ("", ""):
            content_type = headers.get("Content-Type", _content_type(data))
            return self._send(200, data, headers={**headers, "Content-Type": content_type}, **where)
        size = len(data)
        first, last = match.groups()
        if first == "":  # the last N bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            return self._send(416, b"", headers={**headers, "Content-Range": f"bytes */{size}"}, byte_range=requested, **where)
        part_headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}", "Content-Type": "application/octet-stream"}
        self._send(206, data[start : end + 1], headers=part_headers, byte_range=requested, **where)

    def _json(self, status: int, payload, commit: Optional[str] = None, **where) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps(payload).encode(), headers=headers, **where)

    def _error(self, status: int, code: Optional[str] = None, message: str = "", commit: Optional[str] = None, **where) -> None:
        """The hub's error answer: X-Error-Code / X-Error-Message (what huggingface_hub reads) and a
        JSON body {"error": ...}."""
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers=headers, **where)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: Optional[dict] = None,
        route: str = "other",
        repo=None,
        revision=None,
        filename=None,
        byte_range=None,
        close: bool = False,
    ) -> None:
        """Log the request, then answer it; the route and the rest describe it for the log."""
        self.hub.record(Request(self.command, self.path, status, route, repo, revision, filename, byte_range))
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # HEAD too: the size a GET would get
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _flag(query: dict, name: str) -> bool:
    return any(value.lower() in ("true", "1") for value in query.get(name, []))


def _content_type(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


# --- clients -----------------------------------------------------------------------------------


def client_env(base: dict, endpoint: str, home: Path) -> dict:
    """The environment of a subprocess that uses the hub at `endpoint`.

    huggingface_hub and datasets read these at import time, hence subprocesses. Offline mode is
    switched off (the Makefile switches it on for every other test); every cache is under `home`,
    so that nothing reads or fills the user's; no token is sent. The proxy settings send a request
    for any host but 127.0.0.1 to the stand-in, which logs it (datasets asks the dataset viewer at
    datasets-server.<hub host>); a connection that ignores them is refused and logged by
    `refuse_non_loopback_connections` (sitecustomize, `blocked_log(home)`).
    """
    home.mkdir(parents=True, exist_ok=True)
    startup = home / "startup"
    startup.mkdir(exist_ok=True)
    (startup / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(module=str(Path(__file__).resolve())), encoding="utf-8")
    env = {name: value for name, value in base.items() if not name.upper().startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env = {name: value for name, value in env.items() if name.upper() not in _PROXY_VARIABLES}
    proxies = {name: endpoint for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")}
    python_path = [str(startup), *filter(None, [base.get("PYTHONPATH")])]
    return {
        **env,
        **proxies,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONPATH": os.pathsep.join(python_path),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home / "hf"),
        "HF_HUB_CACHE": str(home / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "TOKENIZERS_PARALLELISM": "false",
        # datasets counts downloads with a request to s3.amazonaws.com; the proxy would refuse it.
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        BLOCKED_LOG_VARIABLE: str(blocked_log(home)),
    }


_PROXY_VARIABLES = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
_SITECUSTOMIZE = '''"""Written by hub_standin.client_env: refuse connections to anything but loopback."""
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location("hub_standin_guard", {module!r})
_guard = sys.modules["hub_standin_guard"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
_guard.refuse_non_loopback_connections()
'''


def blocked_log(home: Path) -> Path:
    """Where the subprocesses of `client_env(..., home)` note each connection they were refused."""
    return home / "blocked-connections.log"


def refuse_non_loopback_connections() -> None:
    """Make name lookups and connections to anything but loopback fail, and note them in the file
    named by $HUB_STANDIN_BLOCKED_LOG: a test then knows that nothing left the machine (a lookup of
    another name would itself be a DNS query)."""
    log = os.environ.get(BLOCKED_LOG_VARIABLE)
    real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str):
        if log:
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {what}\n")
        return OSError(f"hub stand-in: refused {what} (tests only reach 127.0.0.1)")

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, str(refuse(f"lookup of {host!r}")))
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise refuse(f"connection to {address!r}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise refuse(f"connection to {address!r}")
        return real_connect_ex(sock, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


def _loopback(host) -> bool:
    if host is None:
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


# --- the test suite's repositories -------------------------------------------------------------

MAMBA = "state-spaces/mamba-130m"
MAMBA_HF = "state-spaces/mamba-130m-hf"
NEOX = "EleutherAI/gpt-neox-20b"
PILE = "monology/pile-uncopyrighted"
LAMBADA_OPENAI = "EleutherAI/lambada_openai"
LAMBADA_STANDARD = "cimec/lambada"


@dataclass
class StandInRepos:
    """The repositories the stand-in serves, and the MambaForCausalLM whose weights both Mamba
    repositories hold (the reference of parity tests)."""

    repos: list[HubRepo]
    reference_model: object


def build_test_repos(folder: Path, seed: int = 0) -> StandInRepos:
    """Small, seeded versions of every repository the default `lm_eval --tasks lambada` run reads."""
    import helpers_models

    model = helpers_models.random_hf_model(helpers_models.hf_config(num_hidden_layers=2), seed=seed)
    repos = [
        HubRepo.from_folder(MODEL, MAMBA, _mamba_ssm_repo(model, folder / "mamba-130m")),
        HubRepo.from_folder(MODEL, MAMBA_HF, _transformers_repo(model, folder / "mamba-130m-hf")),
        HubRepo.from_folder(MODEL, NEOX, _tokenizer_repo(folder / "gpt-neox-20b")),
        HubRepo.from_contents(DATASET, PILE, _pile_files(seed)),
        HubRepo.from_contents(DATASET, LAMBADA_OPENAI, _lambada_openai_files(seed)),
        HubRepo.from_contents(DATASET, LAMBADA_STANDARD, _lambada_standard_files(seed)),
    ]
    return StandInRepos(repos, model)


def _mamba_ssm_repo(model, folder: Path) -> Path:
    """mamba_ssm's layout, as state-spaces/mamba-130m: config.json (unpadded vocabulary) and
    pytorch_model.bin, no tokenizer files."""
    import helpers_models

    helpers_models.save_mamba_ssm_layout(model, folder, "bin", vocab_size=helpers_models.TOKENIZER_VOCAB)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "tie_embeddings": True}, indent=2), encoding="utf-8")
    return folder


def _transformers_repo(model, folder: Path) -> Path:
    """transformers' layout, as state-spaces/mamba-130m-hf: model.safetensors and the tokenizer."""
    import helpers_models

    helpers_models.save_transformers_layout(model, folder, "safetensors")
    _save_tokenizer_files(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# mamba-130m-hf (test stand-in)\n", encoding="utf-8")
    return folder


def _tokenizer_repo(folder: Path) -> Path:
    """EleutherAI/gpt-neox-20b as the package uses it: tokenizer files and a config.json."""
    from transformers import GPTNeoXConfig

    import helpers_models

    _save_tokenizer_files(folder)
    config = GPTNeoXConfig(vocab_size=helpers_models.PADDED_VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64)
    config.save_pretrained(folder)
    return folder


def _save_tokenizer_files(folder: Path) -> None:
    """The byte-level test tokenizer under the three names the hub's tokenizer repos use."""
    import helpers_models

    helpers_models.save_tokenizer(folder)
    special = {name: helpers_models.EOS_TOKEN for name in ("bos_token", "eos_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


# Documents whose last word names a place mentioned earlier: lambada-style, predictable.
_NAMES = ("anna", "ben", "clara", "david", "emma", "felix", "grace", "henry")
_THINGS = ("cat", "dog", "kite", "book", "lamp", "boat")
_PLACES = ("garden", "kitchen", "harbour", "library", "market", "station")


def lambada_documents(seed: int, count: int) -> list[str]:
    import random

    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        name, thing, place = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_PLACES)
        documents.append(f"{name} left the {thing} in the {place} . later {name} went back for the {thing} in the {place}")
    return documents


def _pile_files(seed: int) -> dict[str, bytes]:
    """monology/pile-uncopyrighted: zstd JSON lines with `text` and `meta`, in the real repo's files
    (train/00..29.jsonl.zst, val.jsonl.zst, test.jsonl.zst; one train file here). Its card has no
    `configs`: datasets finds the splits by itself."""
    card = {"license": "other", "pretty_name": "Pile Uncopyrighted", "task_categories": ["text-generation"],
            "language": ["en"]}
    return {
        "README.md": _dataset_card(card, "Pile Uncopyrighted"),
        "val.jsonl.zst": _pile_split(seed + 1),
        "test.jsonl.zst": _pile_split(seed + 2),
        "train/00.jsonl.zst": _pile_split(seed + 3),
    }


def _pile_split(seed: int, count: int = 16) -> bytes:
    import zstandard

    lines = [json.dumps({"text": text, "meta": {"pile_set_name": "Pile-CC"}}) for text in lambada_documents(seed, count)]
    return zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode())


def _lambada_openai_files(seed: int, count: int = 24) -> dict[str, bytes]:
    """EleutherAI/lambada_openai as converted to Parquet: one folder per config ({config}/test-*),
    `default` the default config (two of the real repo's six configs here)."""
    configs = ("default", "en")
    columns = {"text": lambada_documents(seed + 10, count)}
    card = {
        "pretty_name": "LAMBADA OpenAI",
        "license": "mit",
        "dataset_info": [_dataset_info(name, {"test": columns}) for name in configs],
        "configs": [
            {"config_name": name, "data_files": [{"split": "test", "path": f"{name}/test-*"}], **default}
            for name, default in zip(configs, ({"default": True}, {}))
        ],
    }
    parquet = {f"{name}/test-00000-of-00001.parquet": _parquet(columns) for name in configs}
    return {"README.md": _dataset_card(card, "LAMBADA OpenAI"), **parquet}


def _lambada_standard_files(seed: int, count: int = 24) -> dict[str, bytes]:
    """cimec/lambada as converted to Parquet: one config, plain_text (the default), fields text and
    domain, files plain_text/{split}-*."""
    splits = {
        split: {"text": lambada_documents(seed + 20 + offset, count), "domain": [""] * count}
        for offset, split in enumerate(("train", "test", "validation"))
    }
    card = {
        "pretty_name": "LAMBADA",
        "license": ["cc-by-4.0"],
        "dataset_info": _dataset_info("plain_text", splits),
        "configs": [{
            "config_name": "plain_text",
            "data_files": [{"split": split, "path": f"plain_text/{split}-*"} for split in splits],
            "default": True,
        }],
    }
    parquet = {f"plain_text/{split}-00000-of-00001.parquet": _parquet(columns) for split, columns in splits.items()}
    return {"README.md": _dataset_card(card, "LAMBADA"), **parquet}


def _dataset_info(config: str, splits: dict[str, dict[str, list[str]]]) -> dict:
    """A config's `dataset_info` in a card: string features, and per split its size (num_bytes
    counts the text; datasets checks only num_examples)."""
    features = [{"name": name, "dtype": "string"} for name in next(iter(splits.values()))]
    sizes = [
        {"name": split, "num_bytes": sum(len(v.encode()) for values in columns.values() for v in values),
         "num_examples": len(next(iter(columns.values())))}
        for split, columns in splits.items()
    ]
    return {"config_name": config, "features": features, "splits": sizes}


def _dataset_card(front_matter: dict, title: str) -> bytes:
    """README.md as the hub holds it: YAML front matter, then the card's text."""
    import yaml

    return f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n# {title} (test stand-in)\n".encode()


def _parquet(columns: dict[str, list[str]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()

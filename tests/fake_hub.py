"""A minimal Hugging Face Hub served on 127.0.0.1, for end-to-end push tests that never leave the machine.

It implements the endpoints `huggingface_hub` calls for `create_repo`, `create_branch`, `upload_folder` /
`create_commit` and YAML validation, with both upload paths of a commit:

- regular files: the preupload answer says `"regular"`, the content travels base64-encoded in the commit;
- large (LFS) files: the preupload answer says `"lfs"`, the client asks the LFS batch endpoint
  (`POST /{repo}.git/info/lfs/objects/batch`) where to put each object, PUTs the bytes there, calls the verify
  action, then commits an `lfsFile` pointer (path + sha256) that the fake resolves to the stored bytes.

A file goes LFS like on the real Hub for a model repo: when its name matches the default `.gitattributes` of a model
repo (`*.safetensors`, `*.bin`, `*.pt`, ...), when its first 512 bytes hold a NUL byte (binary, e.g. a PNG), or when
it is at least `lfs_threshold` bytes (10 MB on the Hub). `huggingface_hub` uploads LFS objects through Xet when
`hf_xet` is installed; the fixture turns Xet off (`HF_HUB_DISABLE_XET`) so that the legacy LFS protocol, which this
fake implements, is the one exercised.

Every request (method, path, headers, body), every committed file and every uploaded byte is recorded, so a test can
assert the exact list of files a push sent and grep all of it for a token.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

# The LFS patterns of the default `.gitattributes` of a Hub model repo that an hf_distill export can hit.
REPO_TYPES = ("models", "datasets")  # the `/api/{models,datasets}/...` routes it serves, the same way for both
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.npy", "*.npz", "*.h5")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub:
    """The fake Hub. Use as a context manager (or through the `fake_hub` fixture of `tests/conftest.py`).

    Attributes:
        endpoint: `http://127.0.0.1:PORT`.
        requests: every request received, in order (header names lower-cased).
        unknown: `(method, path)` of the requests it does not implement (answered 404).
        created: payloads of `create_repo`.
        branches: `(repo_id, branch)` created.
        commits: `{"repo_id", "repo_type", "revision", "header", "operations"}` per commit (model or dataset repo).
        files: `{repo_id: {path in repo: bytes}}`, the state of each repo after all commits.
        uploaded: `{path in repo: mode}` (`"regular"` or `"lfs"`) of every file committed.
        lfs_objects: `{sha256: bytes}` received on the LFS upload URL.
    """

    def __init__(self, lfs_threshold: int = 10 * 1024 * 1024):
        self.lfs_threshold = lfs_threshold
        self.requests: list[Request] = []
        self.unknown: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.uploaded: dict[str, str] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.verified: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                hub.handle(self, "GET", b"")

            def do_HEAD(self):
                hub.handle(self, "HEAD", b"")

            def do_POST(self):
                hub.handle(self, "POST", self._body())

            def do_PUT(self):
                hub.handle(self, "PUT", self._body())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------------ what was sent

    def all_bytes(self) -> bytes:
        """Every byte the clients sent, to grep for secrets: paths, header values (but the `Authorization` one),
        request bodies, and the decoded content of every committed file (regular files travel base64-encoded)."""
        parts = []
        for request in self.requests:
            parts.append(request.path.encode())
            parts.extend(value.encode() for name, value in request.headers.items() if name != "authorization")
            parts.append(request.body)
        parts.extend(data for files in self.files.values() for data in files.values())
        parts.extend(self.lfs_objects.values())
        return b"\n".join(parts)

    def authorizations(self) -> set[str]:
        """The distinct `Authorization` headers received (requests without one are not counted)."""
        return {r.headers["authorization"] for r in self.requests if "authorization" in r.headers}

    # ---------------------------------------------------------------------------------------------------- handling

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        if size >= self.lfs_threshold or b"\x00" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS):
            return "lfs"
        return "regular"

    def handle(self, handler: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        path = unquote(handler.path.split("?")[0])
        with self._lock:
            self.requests.append(Request(method, path, {k.lower(): v for k, v in handler.headers.items()}, body))
        parts = path.strip("/").split("/")
        # POST /api/{models|datasets}/{namespace}/{name}/{action}/...: the repository endpoints
        repo_call = method == "POST" and len(parts) >= 6 and parts[0] == "api" and parts[1] in REPO_TYPES
        action, repo_id = (parts[4], f"{parts[2]}/{parts[3]}") if repo_call else (None, None)
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            return self.reply(handler, 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry
            return self.reply(handler, 200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/validate-yaml":
            return self.reply(handler, 200, {"errors": [], "warnings": []})
        if action == "branch" and len(parts) == 6:
            self.branches.append((repo_id, parts[5]))
            return self.reply(handler, 200, {})
        if action == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": self.upload_mode(f["path"], f["size"], base64.b64decode(f["sample"])),
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return self.reply(handler, 200, {"files": modes})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            payload = json.loads(body)
            objects = []
            for obj in payload["objects"]:
                href = f"{self.endpoint}/lfs-upload/{obj['oid']}"
                objects.append(
                    {
                        "oid": obj["oid"],
                        "size": obj["size"],
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": href},
                            "verify": {"href": f"{self.endpoint}/lfs-verify/{obj['oid']}"},
                        },
                    }
                )
            return self.reply(handler, 200, {"transfer": "basic", "objects": objects})
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self.reply(handler, 400, {"error": "content does not match its sha256"})
            self.lfs_objects[parts[1]] = body
            return self.reply(handler, 200, {})
        if method == "POST" and len(parts) == 2 and parts[0] == "lfs-verify":
            payload = json.loads(body)
            if payload.get("oid") not in self.lfs_objects:
                return self.reply(handler, 404, {"error": "object not uploaded"})
            self.verified.append(payload["oid"])
            return self.reply(handler, 200, {})
        if action == "commit":
            return self.commit(handler, repo_id, "/".join(parts[5:]), body)
        self.unknown.append((method, path))
        return self.reply(handler, 404, {"error": f"fake hub: no {method} {path}"})

    def commit(self, handler, repo_id: str, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line]
        repo_type = handler.path.strip("/").split("/")[1].removesuffix("s")  # "model" or "dataset"
        commit = {"repo_id": repo_id, "repo_type": repo_type, "revision": revision, "header": lines[0]}
        commit["operations"] = lines[1:]
        added = {}
        for op in lines[1:]:
            value = op["value"]
            if op["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = (base64.b64decode(value["content"]), "regular")
            elif op["key"] == "lfsFile" and value.get("algo") == "sha256" and value["oid"] in self.lfs_objects:
                added[value["path"]] = (self.lfs_objects[value["oid"]], "lfs")
            else:
                return self.reply(handler, 400, {"error": f"fake hub cannot apply {op}"})
        self.commits.append(commit)
        repo_files = self.files.setdefault(repo_id, {})
        for path, (data, mode) in added.items():
            repo_files[path] = data
            self.uploaded[path] = mode
        oid = f"{len(self.commits):040x}"
        url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        return self.reply(handler, 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

    @staticmethod
    def reply(handler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

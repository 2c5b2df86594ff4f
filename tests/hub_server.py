"""A small Hugging Face Hub-compatible HTTP server for offline upload tests (stdlib only).

It speaks the subset of the Hub API that huggingface_hub 2.x uses to publish a folder without Xet:
whoami, repo create / info / refs, branch creation, README metadata validation, preupload, the git-LFS
batch API (upload + verify) and NDJSON commits (to a branch or as a pull request). State lives in memory;
`faults` makes chosen endpoints fail, `requests` records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_fake_token_for_tests_0123456789"
USER = "tester"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, int | str] = {}  # endpoint name → status code, or "drop" to cut the connection
        self.puts: list[str] = []
        self.drop_oids: set[str] = set()  # LFS uploads of these objects lose their connection
        self.forbidden_namespaces = {"someone-else"}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["refs"][ref]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, code: str | None = None) -> None:
                self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def _fault(self, name: str) -> bool:
                fault = hub.faults.get(name)
                if fault is None:
                    return False
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return True
                self._error(int(fault), f"injected fault on {name}")
                return True

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append((method, path))
                body = self._body()
                for pattern, name in ROUTES:
                    m = re.fullmatch(pattern, f"{method} {path}")
                    if m:
                        if name not in ("lfs_put", "lfs_verify") and not self._authorized():
                            return self._error(401, "Invalid credentials in Authorization header")
                        if self._fault(name):
                            return None
                        return getattr(self, name)(body, query, **m.groupdict())
                return self._error(404, f"no route {method} {path}")

            def whoami(self, body, query):
                self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

            def create_repo(self, body, query):
                req = json.loads(body)
                repo_id = f"{req.get('organization') or USER}/{req['name']}"
                if repo_id.split("/")[0] in hub.forbidden_namespaces:
                    return self._error(403, "You don't have the rights to create a model under this namespace")
                if repo_id in hub.repos:
                    return self._send(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                hub.repos[repo_id] = {
                    "private": req.get("visibility") == "private" or bool(req.get("private")),
                    "refs": {"main": {}},
                    "commits": 0,
                    "prs": [],
                }
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _repo(self, ns, name):
                repo = hub.repos.get(f"{ns}/{name}")
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                return repo

            def repo_info(self, body, query, ns, name, rev=None):
                repo = self._repo(ns, name)
                if repo is None:
                    return None
                ref = rev or "main"
                if ref not in repo["refs"]:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                files = repo["refs"][ref]
                self._send(200, {"id": f"{ns}/{name}", "sha": f"{repo['commits']:040x}", "private": repo["private"],
                                 "siblings": [{"rfilename": f} for f in sorted(files)]})  # fmt: skip

            def refs(self, body, query, ns, name):
                repo = self._repo(ns, name)
                if repo is not None:
                    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": "0" * 40} for b in repo["refs"]]
                    self._send(200, {"branches": branches, "tags": [], "converts": []})

            def branch(self, body, query, ns, name, branch):
                repo = self._repo(ns, name)
                if repo is None:
                    return
                if branch in repo["refs"]:
                    return self._error(409, "Reference already exists")
                repo["refs"][branch] = dict(repo["refs"]["main"])
                self._send(200, {})

            def validate_yaml(self, body, query):
                content = json.loads(body)["content"]
                if "license: not-a-license" in content:
                    return self._send(400, {"errors": [{"message": '"license" must be one of the known licenses'}]})
                self._send(200, {"errors": [], "warnings": []})

            def preupload(self, body, query, ns, name, rev):
                repo = self._repo(ns, name)
                if repo is None:
                    return
                files = repo["refs"].get(rev, {})
                out = []
                for f in json.loads(body)["files"]:
                    lfs = f["path"].endswith((".safetensors", ".png", ".bin"))
                    existing = files.get(f["path"])
                    oid = None
                    if existing is not None:
                        oid = (hashlib.sha256(existing).hexdigest() if lfs
                               else hashlib.sha1(b"blob %d\0" % len(existing) + existing).hexdigest())  # fmt: skip
                    out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                "oid": oid})  # fmt: skip
                self._send(200, {"files": out, "commitOid": "0" * 40})

            def lfs_batch(self, body, query, ns, name):
                req = json.loads(body)
                objects = []
                for obj in req["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs:
                        entry["actions"] = {
                            "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                            "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}", "header": {}},
                        }
                    objects.append(entry)
                self._send(200, {"transfer": "basic", "objects": objects})

            def lfs_put(self, body, query, oid):
                if oid in hub.drop_oids:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, "sha256 mismatch")
                hub.puts.append(oid)
                hub.lfs[oid] = body
                self._send(200, {})

            def lfs_verify(self, body, query, oid):
                if oid not in hub.lfs:
                    return self._error(404, "object not found")
                self._send(200, {})

            def commit(self, body, query, ns, name, rev):
                repo = self._repo(ns, name)
                if repo is None:
                    return None
                create_pr = query.get("create_pr") == ["1"]
                if not create_pr and rev not in repo["refs"]:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                target = dict(repo["refs"].get(rev, {}))
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        target[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            return self._error(422, f"LFS object {value['oid']} was never uploaded")
                        target[value["path"]] = hub.lfs[value["oid"]]
                repo["commits"] += 1
                sha = f"{repo['commits']:040x}"
                payload = {"commitUrl": f"{hub.url}/{ns}/{name}/commit/{sha}", "commitOid": sha}
                if create_pr:
                    number = len(repo["prs"]) + 1
                    repo["prs"].append(number)
                    repo["refs"][f"refs/pr/{number}"] = target
                    payload["pullRequestUrl"] = f"{hub.url}/{ns}/{name}/discussions/{number}"
                else:
                    repo["refs"][rev] = target
                self._send(200, payload)

        return Handler


_REPO = r"(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"
ROUTES = [
    (r"GET /api/whoami-v2", "whoami"),
    (r"POST /api/repos/create", "create_repo"),
    (rf"GET /api/models/{_REPO}/refs", "refs"),
    (rf"GET /api/models/{_REPO}(?:/revision/(?P<rev>.+))?", "repo_info"),
    (rf"POST /api/models/{_REPO}/branch/(?P<branch>.+)", "branch"),
    (r"POST /api/validate-yaml", "validate_yaml"),
    (rf"POST /api/models/{_REPO}/preupload/(?P<rev>.+)", "preupload"),
    (rf"POST /{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    (r"PUT /lfs-upload/(?P<oid>\w+)", "lfs_put"),
    (r"POST /lfs-verify/(?P<oid>\w+)", "lfs_verify"),
    (rf"POST /api/models/{_REPO}/commit/(?P<rev>.+)", "commit"),
]

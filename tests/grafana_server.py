"""`FakeGrafana`: a real HTTP server on 127.0.0.1 that answers the part of Grafana's HTTP API we use.

    with FakeGrafana(tokens={"admin-token": "Admin"}) as grafana:   # started on a free port
        client = GrafanaClient(grafana.url, "admin-token")
        ...
        grafana.folders / grafana.datasources / grafana.dashboards / grafana.annotations  # what it holds
        grafana.fail_next(2, 503)       # the next two API requests get 503 (nothing is done)
        grafana.lose_next_answers(1)    # the next request is done, then the connection closes unanswered
        grafana.stop(); grafana.start() # refuse connections for a while; the port and the state stay

State lives in memory, as Grafana 10.x/11.x would hold it in organization 1, and every request is checked
as Grafana checks it; a request Grafana would refuse gets Grafana's status and a JSON `{"message": ...}`:

- Authentication: `Authorization: Bearer <token>` with a token of `tokens` (token → role), else 401.
  Roles as Grafana's basic roles: a Viewer may only read (not data sources), an Editor may also write
  folders, dashboards and annotations, only an Admin may read or write data sources; else 403.
- Bodies of POST/PUT/PATCH must be JSON objects (else 400 "bad request data").
- Folders: a title is required, a uid is at most 40 characters of `[A-Za-z0-9_-]`; a duplicate uid or
  title is 409; `PUT` needs the current `version` unless `overwrite` is true (412 version-mismatch).
- Data sources: name and a known type (`KNOWN_TYPES`) required, access `proxy` or `direct`, name and uid
  unique (409); `secureJsonData` is kept apart and never returned (only `secureJsonFields`); an update
  without a secret keeps the stored one; a read-only data source cannot be updated (403); `version`
  counts updates.
- Dashboards (`POST /api/dashboards/db`): `dashboard` must be an object with a `title`; the fake also
  requires a valid `uid` (Grafana would invent one; our pushes must not depend on that); `folderUid` must
  name a folder (400); an `id` that matches no dashboard is 404; without `overwrite`, a stale `version`
  is 412 version-mismatch and another dashboard with the same title in the folder is 412 name-exists
  (with `overwrite`, Grafana takes that dashboard over, keeping its uid, and so does the fake). Every
  save bumps `version`, whether or not anything changed, as Grafana does.
- Annotations: `text` required; `time` defaults to now and `timeEnd` to `time`; a `timeEnd` before
  `time` is swapped; tags must be strings. `GET` filters by every `tags` (or any, with `matchAny=true`),
  `type=annotation`, `from`/`to` and `limit` (100 by default), newest first. `PATCH` changes only what
  it is given, and `"tags": []` removes every tag, as in Grafana.

Served from a sub-path (`prefix`), the `url`s it answers hold that prefix, as Grafana's do.

Not emulated: nested folders, permissions per folder, dashboard versions history, the `/apis` routes.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.servers import RestartableHttpServer

KNOWN_TYPES = frozenset(
    {"prometheus", "postgres", "grafana-postgresql-datasource", "mysql", "loki", "elasticsearch", "testdata"}
)
_UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_ROLES = {"Viewer": 0, "Editor": 1, "Admin": 2}


@dataclass(frozen=True)
class ApiRequest:
    """One request as received and answered. `json` is the parsed body (None when absent or not JSON)."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    json: Any
    status: int = 0


class _Reply(Exception):
    """Ends a handler with this status and body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(code: int, message: str, **extra: Any) -> _Reply:
    return _Reply(code, {"message": message, **extra})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


class FakeGrafana(RestartableHttpServer):
    """An in-memory Grafana HTTP API on 127.0.0.1 (see the module docstring). Thread-safe; started on
    construction; `stop()` and `start()` keep the port and the state."""

    _thread_name = "fake-grafana"

    def __init__(
        self, *, tokens: Mapping[str, str] | None = None, version: str = "11.3.0", prefix: str = ""
    ) -> None:
        super().__init__()
        self.prefix = prefix.rstrip("/")  # served from a sub-path, as with Grafana's `serve_from_sub_path`
        self.tokens = dict(tokens if tokens is not None else {"admin-token": "Admin"})
        for role in self.tokens.values():
            assert role in _ROLES, role
        self.version = version
        self._lock = threading.Lock()
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, str]] = {}  # data source uid → its secureJsonData
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid → {"dashboard", "folderUid", "created", ...}
        self.annotations: dict[int, dict[str, Any]] = {}
        self._ids = {"folder": 0, "datasource": 0, "dashboard": 0, "annotation": 0}
        self._requests: list[ApiRequest] = []
        self._failures_left = 0
        self._failure_status = 503
        self._failure_headers: dict[str, str] = {}
        self._answers_to_lose = 0
        self.start()

    # -- control ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>` and the prefix, without a trailing slash."""
        return f"http://127.0.0.1:{self._port}{self.prefix}"

    @property
    def requests(self) -> list[ApiRequest]:
        """Every API request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def writes(self) -> list[ApiRequest]:
        """The requests that changed something (POST, PUT, PATCH, DELETE answered 2xx)."""
        return [r for r in self.requests if r.method != "GET" and 200 <= r.status < 300]

    def fail_next(self, count: int, status: int = 503, *, headers: Mapping[str, str] | None = None) -> None:
        """Answer the next `count` API requests with `status` (and `headers`, such as Retry-After), doing
        nothing."""
        with self._lock:
            self._failures_left, self._failure_status = count, status
            self._failure_headers = dict(headers or {})

    def lose_next_answers(self, count: int) -> None:
        """Carry out the next `count` requests, then close their connections without answering (a response
        lost on the way back)."""
        with self._lock:
            self._answers_to_lose = count

    # -- dispatch --------------------------------------------------------------------------------------------

    def _routes(self) -> list[tuple[str, re.Pattern[str], int, Callable[..., Any]]]:
        """(method, path pattern, role needed, handler); a handler gets the path's groups, then the
        query and the body."""
        viewer, editor, admin = _ROLES["Viewer"], _ROLES["Editor"], _ROLES["Admin"]
        routes: list[tuple[str, str, int, Callable[..., Any]]] = [
            ("GET", r"/api/folders", viewer, self._list_folders),
            ("POST", r"/api/folders", editor, self._create_folder),
            ("GET", r"/api/folders/([^/]+)", viewer, self._get_folder),
            ("PUT", r"/api/folders/([^/]+)", editor, self._update_folder),
            ("GET", r"/api/datasources", admin, self._list_datasources),
            ("POST", r"/api/datasources", admin, self._create_datasource),
            ("GET", r"/api/datasources/uid/([^/]+)", admin, self._get_datasource_by_uid),
            ("PUT", r"/api/datasources/uid/([^/]+)", admin, self._update_datasource),
            ("GET", r"/api/datasources/name/([^/]+)", admin, self._get_datasource_by_name),
            ("GET", r"/api/dashboards/uid/([^/]+)", viewer, self._get_dashboard),
            ("POST", r"/api/dashboards/db", editor, self._save_dashboard),
            ("GET", r"/api/annotations", viewer, self._find_annotations),
            ("POST", r"/api/annotations", editor, self._create_annotation),
            ("PATCH", r"/api/annotations/(\d+)", editor, self._patch_annotation),
        ]
        return [(method, re.compile(f"^{path}$"), role, handler) for method, path, role, handler in routes]

    def _answer(
        self, method: str, target: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Any, dict[str, str], bool]:
        """(status, JSON body, extra headers, whether to lose the answer) for one request."""
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        if self.prefix:
            path = path.removeprefix(self.prefix) if path.startswith(self.prefix + "/") else "/not-served"
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        authorization = headers.get("authorization")
        request = ApiRequest(method, path, query, authorization, parsed)
        lose, extra_headers = False, {}
        with self._lock:
            try:
                if path == "/api/health":
                    raise _Reply(200, {"commit": "fake", "database": "ok", "version": self.version})
                if self._failures_left > 0:
                    self._failures_left -= 1
                    extra_headers = self._failure_headers
                    raise _error(self._failure_status, "failure injected by the fake Grafana")
                role = self._authenticate(authorization)
                status, body = self._dispatch(method, path, query, raw, parsed, role)
                if self._answers_to_lose > 0:
                    self._answers_to_lose -= 1
                    lose = True
            except _Reply as reply:
                status, body = reply.status, reply.body
            except Exception as exc:  # a bug of the fake: answer as Grafana answers its own, and say what
                status, body = 500, {"message": f"fake Grafana failed: {type(exc).__name__}: {exc}"}
            self._requests.append(
                ApiRequest(method, path, query, request.authorization, parsed, status if not lose else 0)
            )
        return status, body, extra_headers, lose

    def _authenticate(self, authorization: str | None) -> int:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer" or token not in self.tokens:
            raise _error(401, "Invalid API key", messageId="api-key.invalid", statusCode=401, traceID="")
        return _ROLES[self.tokens[token]]

    def _dispatch(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, parsed: Any, role: int
    ) -> tuple[int, Any]:
        path_matched = False
        for route_method, pattern, needed, handler in self._routes():
            match = pattern.match(path)
            if match is None:
                continue
            path_matched = True
            if route_method != method:
                continue
            if role < needed:
                raise _error(
                    403,
                    "You'll need additional permissions to perform this action.",
                    title="Access denied",
                )
            if method in ("POST", "PUT", "PATCH") and not isinstance(parsed, dict):
                raise _error(400, "bad request data")
            groups = [unquote(group) for group in match.groups()]
            return 200, handler(*groups, query=query, body=parsed or {})
        if path_matched:
            raise _error(405, "Method Not Allowed")
        raise _error(404, "Not found")

    def _next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    # -- folders ---------------------------------------------------------------------------------------------

    def _list_folders(self, *, query: Any, body: Any) -> list[dict[str, Any]]:
        return [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]

    def _get_folder(self, uid: str, *, query: Any, body: Any) -> dict[str, Any]:
        if uid not in self.folders:
            raise _error(404, "Folder not found", status="not-found")
        return copy.deepcopy(self.folders[uid])

    def _create_folder(self, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        title = body.get("title")
        if not isinstance(title, str) or not title.strip():
            raise _error(400, "folder title cannot be empty")
        uid = body.get("uid") or f"f{self._ids['folder'] + 1:08d}"
        if not isinstance(uid, str) or not _UID.match(uid):
            raise _error(400, "uid contains illegal characters or is longer than 40 characters")
        if uid in self.folders:
            raise _error(409, "a folder with the same uid already exists")
        if any(f["title"] == title for f in self.folders.values()):
            raise _error(409, "a folder or dashboard in the general folder with the same name already exists")
        now = _now_iso()
        folder = {
            "id": self._next_id("folder"),
            "uid": uid,
            "title": title,
            "url": f"{self.prefix}/dashboards/f/{uid}/{_slug(title)}",
            "hasAcl": False,
            "canSave": True,
            "canEdit": True,
            "canAdmin": True,
            "createdBy": "service-account",
            "created": now,
            "updatedBy": "service-account",
            "updated": now,
            "version": 1,
        }
        self.folders[uid] = folder
        return copy.deepcopy(folder)

    def _update_folder(self, uid: str, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        folder = self.folders.get(uid)
        if folder is None:
            raise _error(404, "Folder not found", status="not-found")
        title = body.get("title")
        if not isinstance(title, str) or not title.strip():
            raise _error(400, "folder title cannot be empty")
        if not body.get("overwrite") and body.get("version") != folder["version"]:
            raise _error(412, "the folder has been changed by someone else", status="version-mismatch")
        if any(f["title"] == title and f["uid"] != uid for f in self.folders.values()):
            raise _error(409, "a folder or dashboard in the general folder with the same name already exists")
        folder.update(
            title=title,
            url=f"{self.prefix}/dashboards/f/{uid}/{_slug(title)}",
            version=folder["version"] + 1,
            updated=_now_iso(),
        )
        return copy.deepcopy(folder)

    # -- data sources ----------------------------------------------------------------------------------------

    def _list_datasources(self, *, query: Any, body: Any) -> list[dict[str, Any]]:
        return [copy.deepcopy(ds) for ds in self.datasources.values()]

    def _get_datasource_by_uid(self, uid: str, *, query: Any, body: Any) -> dict[str, Any]:
        if uid not in self.datasources:
            raise _error(404, "Data source not found")
        return copy.deepcopy(self.datasources[uid])

    def _get_datasource_by_name(self, name: str, *, query: Any, body: Any) -> dict[str, Any]:
        for datasource in self.datasources.values():
            if datasource["name"] == name:
                return copy.deepcopy(datasource)
        raise _error(404, "Data source not found")

    def _check_datasource(self, body: dict[str, Any], uid: str | None) -> None:
        """Grafana's checks on a data source body; `uid` is the one being updated, if any."""
        name, kind = body.get("name"), body.get("type")
        if not isinstance(name, str) or not name:
            raise _error(400, "bad request data: name is required")
        if kind not in KNOWN_TYPES:
            raise _error(400, f"unknown data source type {kind!r}")
        if body.get("access", "proxy") not in ("proxy", "direct"):
            raise _error(400, "bad request data: access must be proxy or direct")
        for field in ("jsonData", "secureJsonData"):
            if body.get(field) is not None and not isinstance(body[field], dict):
                raise _error(400, f"bad request data: {field} must be an object")
        if any(ds["name"] == name and ds["uid"] != uid for ds in self.datasources.values()):
            raise _error(409, "data source with the same name already exists")

    def _create_datasource(self, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        self._check_datasource(body, None)
        uid = body.get("uid") or f"ds{self._ids['datasource'] + 1:08d}"
        if not isinstance(uid, str) or not _UID.match(uid):
            raise _error(400, "uid contains illegal characters or is longer than 40 characters")
        if uid in self.datasources:
            raise _error(409, "data source with the same uid already exists")
        datasource = {
            "id": self._next_id("datasource"),
            "uid": uid,
            "orgId": 1,
            "version": 1,
            "readOnly": False,
        }
        self._store_datasource(datasource, body, {})
        return {
            "message": "Datasource added",
            "id": datasource["id"],
            "name": datasource["name"],
            "datasource": copy.deepcopy(datasource),
        }

    def _update_datasource(self, uid: str, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        existing = self.datasources.get(uid)
        if existing is None:
            raise _error(404, "Data source not found")
        if existing["readOnly"]:
            raise _error(403, "Cannot update read-only data source")
        self._check_datasource(body, uid)
        version = body.get("version")
        if isinstance(version, int) and version and version < existing["version"]:
            raise _error(
                409, "Datasource has already been updated by someone else. Please reload and try again"
            )
        new_uid = body.get("uid") or uid
        if new_uid != uid and new_uid in self.datasources:
            raise _error(409, "data source with the same uid already exists")
        del self.datasources[uid]
        secrets = self.secrets.pop(uid, {})
        datasource = {
            "id": existing["id"],
            "uid": new_uid,
            "orgId": 1,
            "version": existing["version"] + 1,
            "readOnly": False,
        }
        self._store_datasource(datasource, body, secrets)
        return {
            "message": "Datasource updated",
            "id": datasource["id"],
            "name": datasource["name"],
            "datasource": copy.deepcopy(datasource),
        }

    def _store_datasource(
        self, datasource: dict[str, Any], body: dict[str, Any], secrets: dict[str, str]
    ) -> None:
        """Fill `datasource` from `body` as Grafana does (a missing field is reset) and store it."""
        secrets = {**secrets, **{k: str(v) for k, v in (body.get("secureJsonData") or {}).items()}}
        datasource.update(
            name=body["name"],
            type=body["type"],
            typeName=body["type"],
            access=body.get("access") or "proxy",
            url=body.get("url") or "",
            user=body.get("user") or "",
            database=body.get("database") or "",
            basicAuth=bool(body.get("basicAuth")),
            basicAuthUser=body.get("basicAuthUser") or "",
            withCredentials=bool(body.get("withCredentials")),
            isDefault=bool(body.get("isDefault")),
            jsonData=copy.deepcopy(body.get("jsonData") or {}),
            secureJsonFields=dict.fromkeys(secrets, True),
        )
        self.datasources[datasource["uid"]] = datasource
        self.secrets[datasource["uid"]] = secrets

    # -- dashboards ------------------------------------------------------------------------------------------

    def _get_dashboard(self, uid: str, *, query: Any, body: Any) -> dict[str, Any]:
        stored = self.dashboards.get(uid)
        if stored is None:
            raise _error(404, "Dashboard not found")
        dashboard = stored["dashboard"]
        folder = self.folders.get(stored["folderUid"] or "")
        return {
            "dashboard": copy.deepcopy(dashboard),
            "meta": {
                "type": "db",
                "canSave": True,
                "canEdit": True,
                "slug": _slug(dashboard["title"]),
                "url": f"{self.prefix}/d/{uid}/{_slug(dashboard['title'])}",
                "version": dashboard["version"],
                "created": stored["created"],
                "updated": stored["updated"],
                "folderId": folder["id"] if folder else 0,
                "folderUid": folder["uid"] if folder else "",
                "folderTitle": folder["title"] if folder else "General",
                "folderUrl": folder["url"] if folder else "",
                "provisioned": False,
            },
        }

    def _save_dashboard(self, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict):
            raise _error(400, "bad request data: dashboard must be an object")
        title = dashboard.get("title")
        if not isinstance(title, str) or not title.strip():
            raise _error(400, "Dashboard title cannot be empty", status="empty-name")
        uid = dashboard.get("uid")
        if not isinstance(uid, str) or not _UID.match(uid):
            raise _error(400, "the fake Grafana wants a uid of at most 40 characters of [A-Za-z0-9_-]")
        folder_uid = body.get("folderUid") or ""
        folder_id = body.get("folderId") or 0
        if folder_id and not folder_uid:
            folder_uid = next((f["uid"] for f in self.folders.values() if f["id"] == folder_id), None)
            if folder_uid is None:
                raise _error(400, "folder not found")
        if folder_uid and folder_uid not in self.folders:
            raise _error(400, "folder not found")
        overwrite = bool(body.get("overwrite"))
        dashboard_id = dashboard.get("id")
        if dashboard_id is not None and not any(
            stored["dashboard"]["id"] == dashboard_id for stored in self.dashboards.values()
        ):
            raise _error(404, "Dashboard not found", status="not-found")
        existing = self.dashboards.get(uid)
        same_title = next(
            (
                stored
                for other, stored in self.dashboards.items()
                if other != uid
                and stored["folderUid"] == folder_uid
                and stored["dashboard"]["title"] == title
            ),
            None,
        )
        if same_title is not None:
            if not overwrite:
                raise _error(
                    412, "A dashboard with the same name in the folder already exists", status="name-exists"
                )
            # Grafana saves over the dashboard with that title, keeping its uid.
            uid, existing = same_title["dashboard"]["uid"], same_title
        if (
            existing is not None
            and not overwrite
            and dashboard.get("version") != existing["dashboard"]["version"]
        ):
            raise _error(412, "The dashboard has been changed by someone else", status="version-mismatch")
        now = _now_iso()
        saved = copy.deepcopy(dashboard)
        saved["uid"] = uid
        saved["id"] = existing["dashboard"]["id"] if existing else self._next_id("dashboard")
        saved["version"] = existing["dashboard"]["version"] + 1 if existing else 1
        self.dashboards[uid] = {
            "dashboard": saved,
            "folderUid": folder_uid,
            "created": existing["created"] if existing else now,
            "updated": now,
            "message": body.get("message", ""),
        }
        slug = _slug(title)
        return {
            "id": saved["id"],
            "uid": uid,
            "url": f"{self.prefix}/d/{uid}/{slug}",
            "status": "success",
            "version": saved["version"],
            "slug": slug,
            "folderUid": folder_uid,
        }

    # -- annotations -----------------------------------------------------------------------------------------

    def _find_annotations(self, *, query: dict[str, list[str]], body: Any) -> list[dict[str, Any]]:
        def number(name: str, default: int = 0) -> int:
            values = query.get(name)
            try:
                return int(values[-1]) if values else default
            except ValueError:
                return default

        tags = query.get("tags", [])
        match_any = (query.get("matchAny") or ["false"])[-1] == "true"
        kind = (query.get("type") or [""])[-1]
        start, end, limit = number("from"), number("to"), number("limit") or 100
        found = []
        for annotation in self.annotations.values():
            if tags:
                held = set(annotation["tags"])
                if not (any(tag in held for tag in tags) if match_any else all(tag in held for tag in tags)):
                    continue
            if kind == "alert" and not annotation["alertId"]:
                continue
            if kind == "annotation" and annotation["alertId"]:
                continue
            if start and end and not (annotation["time"] <= end and annotation["timeEnd"] >= start):
                continue
            found.append(annotation)
        found.sort(key=lambda a: (a["time"], a["timeEnd"], a["id"]), reverse=True)
        return copy.deepcopy(found[:limit])

    @staticmethod
    def _tags(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
            raise _error(400, "bad request data: tags must be a list of strings")
        return [tag.strip() for tag in value if tag.strip()]

    def _create_annotation(self, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise _error(400, "Failed to save annotation")
        tags = self._tags(body.get("tags") or [])
        start = body.get("time") or _now_ms()
        end = body.get("timeEnd") or start
        if not isinstance(start, int) or not isinstance(end, int):
            raise _error(400, "bad request data: time and timeEnd are epoch milliseconds")
        start, end = min(start, end), max(start, end)
        now, annotation_id = _now_ms(), self._next_id("annotation")
        annotation: dict[str, Any] = {
            "id": annotation_id,
            "alertId": 0,
            "alertName": "",
            "dashboardId": int(body.get("dashboardId") or 0),
            "dashboardUID": body.get("dashboardUID") or "",
            "panelId": int(body.get("panelId") or 0),
            "userId": 1,
            "newState": "",
            "prevState": "",
            "created": now,
            "updated": now,
            "time": start,
            "timeEnd": end,
            "text": text,
            "tags": tags,
            "login": "sa-mia-detector",
            "email": "",
            "avatarUrl": "",
            "data": body.get("data") or {},
        }
        self.annotations[annotation_id] = annotation
        return {"message": "Annotation added", "id": annotation_id}

    def _patch_annotation(self, annotation_id: str, *, query: Any, body: dict[str, Any]) -> dict[str, Any]:
        annotation = self.annotations.get(int(annotation_id))
        if annotation is None:
            raise _error(404, "Annotation not found")
        if body.get("tags") is not None:
            annotation["tags"] = self._tags(body["tags"])
        text = body.get("text")
        if isinstance(text, str) and text:
            annotation["text"] = text
        for field, key in (("time", "time"), ("timeEnd", "timeEnd")):
            value = body.get(field)
            if isinstance(value, int) and value > 0:
                annotation[key] = value
        if annotation["timeEnd"] < annotation["time"]:
            annotation["time"], annotation["timeEnd"] = annotation["timeEnd"], annotation["time"]
        annotation["updated"] = _now_ms()
        return {"message": "Annotation patched"}

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        grafana = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: stop() never waits on keep-alive

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, body, extra_headers, lose = grafana._answer(self.command, self.path, headers, raw)
                if lose:
                    self.close_connection = True
                    return
                content = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in extra_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are recorded; stderr stays quiet

        return Handler

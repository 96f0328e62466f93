"""A small typed client of Grafana's HTTP API: folders, data sources, dashboards and annotations.

This is the only module that imports `grafana_api` (the `grafana-api` package, whose `GrafanaFace` speaks
the HTTP API through `requests`). Everything else of ours sees `GrafanaClient`, plain dicts shaped as
Grafana returns them, and one error type, `GrafanaError`, whose message is one line that names the
operation and Grafana's answer, never the token nor the host.

Targeted: the `/api` endpoints of Grafana 10.x and 11.x, authenticated with a service-account token (or a
legacy API key) as `Authorization: Bearer <token>`:

- `GET /api/folders`, `GET|PUT /api/folders/:uid`, `POST /api/folders`
- `GET|PUT /api/datasources/uid/:uid`, `GET /api/datasources/name/:name`, `POST /api/datasources`
- `GET /api/dashboards/uid/:uid`, `POST /api/dashboards/db`
- `GET|POST /api/annotations`, `PATCH /api/annotations/:id`

Where `grafana-api` 1.0.3 (2020) lacks an endpoint (data sources by uid) or gets one wrong (its partial
annotation update sends `"tags": []`, which Grafana reads as "remove every tag"; its annotation search does
not encode tags), the request goes through its generic `GrafanaAPI` request methods instead. Its error
handling is bypassed too: a response hook on its `requests` session turns every 4xx and 5xx into our
error, keeping the status, Grafana's message and any Retry-After, before `grafana-api` misreads a body that
is not JSON (a proxy's error page).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from grafana_api.grafana_api import GrafanaException
from grafana_api.grafana_face import GrafanaFace

from detector.http import GrafanaAddress, retry_after_seconds

# Statuses that say "try again later"; every other 4xx says the request itself (or the token) is wrong.
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# How much of Grafana's error message goes into ours.
_MESSAGE_CHARS = 200
# The OS-level reason inside a requests connection error: "[Errno 111] Connection refused".
_ERRNO = re.compile(r"\[Errno -?\d+\][^'\"()]*")

_T = TypeVar("_T")


class GrafanaError(Exception):
    """A Grafana request failed. `status` is the HTTP status, or None when no answer came (connection
    refused, timeout, TLS failure, a body that is not JSON); `retry_after` the seconds Grafana (or a proxy)
    asked to wait, if it did. The message is one line without the token."""

    def __init__(self, detail: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"Grafana: {detail}")
        self.detail = detail  # the message without the leading "Grafana: "
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Whether the same request may succeed later: no answer, a timeout, 429 or a 5xx."""
        return self.status is None or self.status >= 500 or self.status in _TRANSIENT_STATUSES


class _Refused(Exception):
    """Raised from the session's response hook for an error status, before `grafana_api` reads the body
    (it indexes text bodies as if they were JSON objects)."""

    def __init__(self, status: int, detail: str, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


def _refuse_errors(response: Any, *args: Any, **kwargs: Any) -> None:
    """A `requests` response hook: turn a 4xx or 5xx into `_Refused` with Grafana's message."""
    status = int(response.status_code)
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise _Refused(status, _detail(body), retry_after_seconds(response.headers.get("Retry-After")))


class GrafanaClient:
    """Grafana's HTTP API at `url`, authenticated with a service-account `token` (role Admin to manage
    data sources; Editor suffices for folders, dashboards and annotations). `timeout` is per request in
    seconds; `verify` checks TLS certificates. Not safe for concurrent use from several threads."""

    def __init__(self, url: str, token: str, *, timeout: float = 10.0, verify: bool = True) -> None:
        if not token:
            raise ValueError("the Grafana token is empty")
        self.address = GrafanaAddress.parse(url)
        self._token = token
        self._face = GrafanaFace(
            token,
            host=self.address.host,
            port=self.address.port,
            url_path_prefix=self.address.url_path_prefix,
            protocol=self.address.protocol,
            verify=verify,
            timeout=timeout,
        )
        self._face.api.s.hooks["response"].append(_refuse_errors)

    def __repr__(self) -> str:
        return f"GrafanaClient({self.address.base_url!r})"

    # -- folders ---------------------------------------------------------------------------------------------

    def folders(self) -> list[dict[str, Any]]:
        """Every folder (at the top level, on Grafana 11 with nested folders): `{id, uid, title}`s."""
        return _objects(self._call("list folders", self._face.folder.get_all_folders))

    def folder(self, uid: str) -> dict[str, Any] | None:
        """The folder `uid` (`{id, uid, title, version, ...}`), or None when there is none."""
        return self._find(f"get folder {uid}", lambda: self._face.folder.get_folder(_segment(uid)))

    def create_folder(self, title: str, uid: str) -> dict[str, Any]:
        """Create a folder; return it as Grafana stored it."""
        return _object(
            self._call(f"create folder {uid}", lambda: self._face.folder.create_folder(title, uid))
        )

    def rename_folder(self, uid: str, title: str) -> dict[str, Any]:
        """Give the folder `uid` the title `title`, whatever its version; return it."""
        return _object(
            self._call(
                f"update folder {uid}",
                lambda: self._face.folder.update_folder(_segment(uid), title, overwrite=True),
            )
        )

    # -- data sources ----------------------------------------------------------------------------------------

    def datasource(self, uid: str) -> dict[str, Any] | None:
        """The data source `uid` (secure fields listed in `secureJsonFields`, never returned), or None."""
        return self._find(
            f"get data source {uid}", lambda: self._face.api.GET(f"/datasources/uid/{_segment(uid)}")
        )

    def datasource_by_name(self, name: str) -> dict[str, Any] | None:
        """The data source named `name`, or None."""
        return self._find(
            f"get data source {name!r}", lambda: self._face.datasource.find_datasource(_segment(name))
        )

    def create_datasource(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a data source from `body` (`name`, `type`, `uid`, `url`, `access`, `jsonData`,
        `secureJsonData`, ...); return it as stored (Grafana's `datasource` member of its answer)."""
        answer = _object(
            self._call(
                f"create data source {body.get('uid') or body.get('name')}",
                lambda: self._face.datasource.create_datasource(dict(body)),
            )
        )
        return _object(answer.get("datasource", answer))

    def update_datasource(self, uid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the data source `uid` with `body` (secure fields not in `body` keep their values);
        return it as stored."""
        answer = _object(
            self._call(
                f"update data source {uid}",
                lambda: self._face.api.PUT(f"/datasources/uid/{_segment(uid)}", json=dict(body)),
            )
        )
        return _object(answer.get("datasource", answer))

    # -- dashboards ------------------------------------------------------------------------------------------

    def dashboard(self, uid: str) -> dict[str, Any] | None:
        """`{"dashboard": ..., "meta": {"folderUid": ..., "version": ...}}` for `uid`, or None."""
        return self._find(f"get dashboard {uid}", lambda: self._face.dashboard.get_dashboard(_segment(uid)))

    def save_dashboard(
        self, dashboard: Mapping[str, Any], folder_uid: str, *, overwrite: bool = True, message: str = ""
    ) -> dict[str, Any]:
        """Create or replace a dashboard (by its `uid`) in the folder `folder_uid`; return Grafana's answer
        (`{id, uid, url, status, version, slug}`)."""
        body: dict[str, Any] = {"dashboard": dict(dashboard), "folderUid": folder_uid, "overwrite": overwrite}
        if message:
            body["message"] = message
        return _object(
            self._call(
                f"save dashboard {dashboard.get('uid')}", lambda: self._face.dashboard.update_dashboard(body)
            )
        )

    # -- annotations -----------------------------------------------------------------------------------------

    def find_annotations(self, tags: Sequence[str], *, limit: int = 100) -> list[dict[str, Any]]:
        """Annotations (not alerting state changes) carrying every one of `tags`, newest first."""
        query = urlencode([("tags", tag) for tag in tags] + [("type", "annotation"), ("limit", limit)])
        return _objects(self._call("find annotations", lambda: self._face.api.GET(f"/annotations?{query}")))

    def create_annotation(
        self, *, time_ms: int, tags: Sequence[str], text: str, time_end_ms: int | None = None
    ) -> int:
        """Create an organization annotation (a region when `time_end_ms` is later than `time_ms`); return
        its id."""
        body: dict[str, Any] = {"time": time_ms, "tags": list(tags), "text": text}
        if time_end_ms is not None:
            body["timeEnd"] = time_end_ms
        answer = _object(
            self._call("create annotation", lambda: self._face.api.POST("/annotations", json=body))
        )
        annotation_id = answer.get("id")
        if not isinstance(annotation_id, int):
            raise GrafanaError("create annotation: the answer has no id")
        return annotation_id

    def patch_annotation(
        self,
        annotation_id: int,
        *,
        text: str | None = None,
        tags: Sequence[str] | None = None,
        time_end_ms: int | None = None,
    ) -> None:
        """Change only the given fields of annotation `annotation_id` (`tags` replaces them all)."""
        body: dict[str, Any] = {}
        if text is not None:
            body["text"] = text
        if tags is not None:
            body["tags"] = list(tags)
        if time_end_ms is not None:
            body["timeEnd"] = time_end_ms
        if body:
            self._call(
                f"update annotation {annotation_id}",
                lambda: self._face.api.PATCH(f"/annotations/{int(annotation_id)}", json=body),
            )

    # -- plumbing --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._face.api.s.close()

    def _find(self, what: str, call: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            return _object(self._call(what, call))
        except GrafanaError as exc:
            if exc.status == 404:
                return None
            raise

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one `grafana_api` request; turn whatever it raises into a one-line `GrafanaError`."""
        try:
            return call()
        except _Refused as refused:
            status, detail = refused.status, refused.detail
            if status == 401:
                detail = f"{detail or 'Unauthorized'} (the token was refused)"
            message = self._scrub(f"{what}: HTTP {status} {detail}".rstrip())
            raise GrafanaError(message, status=status, retry_after=refused.retry_after) from None
        except GrafanaException as exc:  # not reached while the hook answers every error status first
            raise GrafanaError(
                self._scrub(f"{what}: HTTP {exc.status_code}"), status=int(exc.status_code)
            ) from None
        except OSError as exc:  # requests' errors (connection, timeout, TLS, a body that is not JSON)
            if isinstance(exc, ValueError):
                raise GrafanaError(
                    self._scrub(f"{what}: the answer is not JSON (is the URL Grafana's?)")
                ) from None
            reason = _ERRNO.search(str(exc))
            why = f"{type(exc).__name__}: {reason.group(0).strip()}" if reason else type(exc).__name__
            raise GrafanaError(self._scrub(f"{what}: no answer ({why})")) from None

    def _scrub(self, message: str) -> str:
        """One line, and the token masked should Grafana ever echo it."""
        if len(self._token) >= 4:
            message = message.replace(self._token, "***")
        return " ".join(message.split())


def _segment(value: str) -> str:
    """`value` as one URL path segment (a name may hold `/` or spaces)."""
    return quote(value, safe="")


def _detail(response: Any) -> str:
    """Grafana's error message out of an error body (JSON `{"message": ...}`, or text)."""
    if isinstance(response, dict):
        message = response.get("message") or response.get("error") or ""
        return str(message)[:_MESSAGE_CHARS]
    return str(response or "")[:_MESSAGE_CHARS]


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GrafanaError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _objects(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise GrafanaError(f"expected a JSON list of objects, got {type(value).__name__}")
    return value


__all__ = ["GrafanaAddress", "GrafanaClient", "GrafanaError"]

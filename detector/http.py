"""HTTP conventions shared by the receivers' sinks and the Grafana client: a Retry-After header, and where
Grafana listens."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class GrafanaAddress:
    """Where Grafana listens, split as `GrafanaFace` takes it: `url_path_prefix` is empty or ends in `/`
    (`https://example.com/grafana` → host `example.com`, port None, prefix `grafana/`)."""

    protocol: str
    host: str
    port: int | None
    url_path_prefix: str

    @classmethod
    def parse(cls, url: str) -> GrafanaAddress:
        """Split a base URL such as `http://127.0.0.1:3000` or `https://ops.example/grafana/`; raise
        `ValueError` (one line) for anything else: another scheme, credentials, a query or a fragment."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid Grafana URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the Grafana URL must look like http(s)://host[:port][/path]")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the Grafana URL must not hold credentials: the token authenticates")
        if parts.query or parts.fragment:
            raise ValueError("the Grafana URL must not have a query or a fragment")
        host = parts.hostname
        if ":" in host:  # IPv6: GrafanaFace joins host and port as they are
            host = f"[{host}]"
        path = parts.path.strip("/")
        return cls(parts.scheme, host, port, f"{path}/" if path else "")

    @property
    def base_url(self) -> str:
        """The URL Grafana's pages are under, without a trailing slash."""
        return f"{self._origin}/{self.url_path_prefix}".rstrip("/")

    def link(self, path: str) -> str:
        """An absolute URL for a `url` Grafana answered (`/d/uid/slug`, which already holds the sub-path
        when Grafana serves from one)."""
        if self.url_path_prefix and path.startswith(f"/{self.url_path_prefix}"):
            return f"{self._origin}{path}"
        return f"{self.base_url}{path}"

    @property
    def _origin(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.protocol}://{self.host}{port}"

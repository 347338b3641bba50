"""Provision the dashboards into a running Grafana with grafana-client.

Every failure an operator can cause is one :class:`PushError` whose message says what to fix:
a URL that is not Grafana's, a server that cannot be reached, a token Grafana refuses or that
lacks the Editor role, and a dashboard that already exists in Grafana with other content
(Grafana's "version conflict"): by default an existing dashboard is never replaced, since it
may hold edits made in the UI; ``overwrite=True`` replaces it with the generated one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlparse

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from dashboards.build import rendered
from dashboards.catalog import DASHBOARDS

FOLDER_UID = "kvhead"
FOLDER_TITLE = "kvhead"
TIMEOUT_S = 10.0


class PushError(RuntimeError):
    """A push that cannot go on; the message names the cause and the fix."""


@dataclass(frozen=True)
class Pushed:
    uid: str
    title: str
    url: str  # the dashboard's address in Grafana
    version: int


def check_url(url: str) -> str:
    """The base URL without a trailing slash, or :class:`PushError` for one that cannot be."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PushError(f"--url {url!r} is not an http(s) URL, e.g. http://grafana.example:3000")
    return url.rstrip("/")


def connect(url: str, token: str) -> GrafanaApi:
    """A client whose URL answered as Grafana and accepted ``token``."""
    base = check_url(url)
    api = GrafanaApi.from_url(base, credential=token, timeout=TIMEOUT_S)
    health = _call(base, lambda: api.client.GET("/health"), "its health check")
    if not isinstance(health, dict) or "database" not in health:
        raise PushError(
            f"{base}/api/health did not answer as Grafana: is --url Grafana's base URL?"
        )
    _call(base, lambda: api.organization.get_current_organization(), "the token check")
    return api


def push(url: str, token: str, *, overwrite: bool = False) -> list[Pushed]:
    """Create (or with ``overwrite`` replace) every dashboard in the ``kvhead`` folder."""
    api = connect(url, token)
    base = check_url(url)
    _ensure_folder(api, base)
    texts = rendered()
    done = []
    for spec in DASHBOARDS:
        payload = {
            "dashboard": json.loads(texts[spec.filename]),
            "folderUid": FOLDER_UID,
            "overwrite": overwrite,
            "message": "kvhead dashboards push",
        }
        try:
            reply = api.dashboard.update_dashboard(payload)
        except GrafanaClientError as err:
            if err.status_code == 412:
                raise PushError(_conflict(spec.uid, spec.title, err)) from None
            raise _failure(base, err, f"saving dashboard {spec.uid}") from None
        except (GrafanaException, OSError) as err:
            raise _failure(base, err, f"saving dashboard {spec.uid}") from None
        done.append(Pushed(spec.uid, spec.title, base + reply.get("url", ""), reply["version"]))
    return done


def _ensure_folder(api: GrafanaApi, base: str) -> None:
    try:
        api.folder.get_folder(FOLDER_UID)
        return
    except GrafanaClientError as err:
        if err.status_code != 404:
            raise _failure(base, err, f"reading folder {FOLDER_UID}") from None
    _call(base, lambda: api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID), "folder creation")


def _call(base: str, request, what: str):
    try:
        return request()
    except (GrafanaException, OSError) as err:
        raise _failure(base, err, what) from None


def _failure(base: str, err: Exception, what: str) -> PushError:
    """The operator's view of a failed request."""
    if isinstance(err, GrafanaUnauthorizedError):
        return PushError(
            f"Grafana at {base} refused the token (401) during {what}: pass a valid "
            "service-account token with --token"
        )
    status = getattr(err, "status_code", None)
    if status == 403:
        return PushError(
            f"the token may not do {what} at {base} (403): give its service account the "
            "Editor role (or Admin to create the kvhead folder)"
        )
    if status == 404:
        return PushError(f"{base} answered 404 to {what}: is --url Grafana's base URL?")
    if isinstance(err, GrafanaException) and status:
        return PushError(f"Grafana at {base} failed {what}: {err.message}")
    return PushError(f"cannot reach Grafana at {base} ({what}): {err}")


def _conflict(uid: str, title: str, err: GrafanaClientError) -> str:
    body = err.response if isinstance(err.response, dict) else {}
    reason = body.get("status", "")
    if reason == "name-exists":
        return (
            f"version conflict: another dashboard in folder {FOLDER_UID!r} is titled {title!r}; "
            "rename or delete it, or pass --overwrite"
        )
    return (
        f"version conflict: dashboard {uid!r} already exists in Grafana with other content "
        f"({reason or err.message}); it may hold edits made in the UI, pass --overwrite to "
        "replace it with the generated one"
    )

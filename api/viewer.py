"""The web viewer's static files at ``/viewer/`` (issue 7 §1; R-RT-5, R-CE-8, R-PF-1, R-FE-1).

Served by both roles. These files are the viewer *program* (HTML, JavaScript, WASM codecs, CSS)
and the site's display settings (``config/viewer.toml`` as ``/viewer/config.json``); none of them
holds patient data, which is why the guard lists ``/viewer/`` as public. Every image and header
the viewer shows comes from the same node's DICOMweb routes with the user's bearer token, through
the guard like any other caller.

The bundle is built by ``make setup`` (``npm ci && npm run build`` in ``viewer_assets/``) into
``viewer_assets/dist``. Content-hashed files under ``assets/`` are cached as immutable; the HTML
entry and the settings are revalidated. Precompressed ``.gz`` copies written by the build are
sent to clients that accept gzip.
"""

from __future__ import annotations

import json
import mimetypes
import tomllib
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "viewer_assets" / "dist"
SETTINGS = ROOT / "config" / "viewer.toml"

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# The page may be framed by the HIS (R-FE-1); it sends no referrer (URLs carry study UIDs).
PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
_TYPES = {
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".json": "application/json",
}


#: ``[weasis]`` (R-VW-1 u): ``enabled`` shows the toolbar's weasis:// launch link (off by default).
WEASIS_KEYS = ("enabled",)


class ViewerSettingsError(ValueError):
    """config/viewer.toml is unreadable or malformed; the message names the file and key."""


def load_settings(path: Path = SETTINGS) -> dict[str, Any]:
    """The viewer settings as JSON-able data (missing file: the viewer's built-in defaults)."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ViewerSettingsError(f"{path}: {exc}") from exc
    position = data.get("toolbar", {}).get("position", "top")
    if position not in ("top", "bottom"):
        raise ViewerSettingsError(f"{path}: toolbar.position: must be 'top' or 'bottom', not {position!r}")
    for modality, presets in data.get("presets", {}).items():
        for name, p in presets.items():
            if not isinstance(p, dict) or not all(
                isinstance(p.get(k), int | float) for k in ("window", "level")
            ):
                raise ViewerSettingsError(
                    f"{path}: presets.{modality}.{name}: needs numeric window and level"
                )
            if p["window"] <= 0:
                raise ViewerSettingsError(f"{path}: presets.{modality}.{name}.window: must be > 0")
    origins = data.get("embed", {}).get("origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ViewerSettingsError(
            f"{path}: embed.origins: must be a list of origins like 'https://his.example'"
        )
    weasis = data.get("weasis", {})
    if not isinstance(weasis, dict):
        raise ViewerSettingsError(f"{path}: weasis: must be a table")
    for key, value in weasis.items():
        if key not in WEASIS_KEYS:
            raise ViewerSettingsError(f"{path}: weasis.{key}: unknown key (known: {', '.join(WEASIS_KEYS)})")
        if not isinstance(value, bool):
            raise ViewerSettingsError(f"{path}: weasis.{key}: must be true or false")
    json.dumps(data)  # TOML dates have no JSON form: fail here, not per request
    return data


def public_settings(data: dict[str, Any]) -> dict[str, Any]:
    """What browsers see: everything but the send targets (whether any is configured only; the
    viewer asks ``GET /api/v1/send/targets`` for those offered to its user, R-VW-1 u)."""
    out = {k: v for k, v in data.items() if k != "send"}
    out["send"] = {"configured": bool(data.get("send", {}).get("targets"))}
    return out


def _file(request: Request, dist: Path, rel: str) -> Response:
    target = (dist / rel).resolve()
    if not target.is_relative_to(dist.resolve()) or not target.is_file():
        return JSONResponse({"error": "not_found", "error_description": f"no viewer file {rel!r}"}, 404)
    media = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    cache = IMMUTABLE if rel.startswith("assets/") else REVALIDATE
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding", **PAGE_HEADERS}
    gz = target.with_name(target.name + ".gz")
    if "gzip" in request.headers.get("accept-encoding", "") and gz.is_file():
        headers["Content-Encoding"] = "gzip"
        return FileResponse(gz, media_type=media, headers=headers)
    return FileResponse(target, media_type=media, headers=headers)


def routes(dist: Path | None = None, settings: Path | None = None) -> list[Route]:
    """``/viewer/`` routes; the settings file is read once, here, so a bad file fails the start."""
    root = dist or DIST
    data = load_settings(settings or SETTINGS)
    from api.send import targets_from  # (api.send reads these settings too)

    targets_from(data, str(settings or SETTINGS))  # a malformed send target stops the start
    settings_json = public_settings(data)

    async def index(request: Request) -> Response:
        if not (root / "index.html").is_file():
            why = f"the viewer is not built ({root} missing): run `make setup`"
            return JSONResponse({"error": "not_built", "error_description": why}, 503)
        return _file(request, root, "index.html")

    async def redirect(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{request.scope.get('root_path', '')}/viewer/{query}", 308)

    async def config(request: Request) -> Response:
        return JSONResponse(settings_json, headers={"Cache-Control": REVALIDATE})

    async def asset(request: Request) -> Response:
        return _file(request, root, request.path_params["path"])

    return [
        Route("/viewer", redirect, methods=["GET"]),
        Route("/viewer/", index, methods=["GET"]),
        Route("/viewer/config.json", config, methods=["GET"]),
        Route("/viewer/{path:path}", asset, methods=["GET"]),
    ]

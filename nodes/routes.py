"""HTTP routes for the front end: a network file's summary and its preview image.

``GET /loha/info?name=<name in the loras list>`` answers JSON (the `loha.summary`
summary, its text, and whether a preview exists); ``GET /loha/preview?name=…``
answers the image. Both read only files inside the "loras" folders (`files`):
bad names get 400, names that lead nowhere inside get 404, unreadable networks 422.
Answers name files relative to their folder, never by the server's paths.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

import loha
from loha.errors import LohaError
from loha.summary import render, summarize

from . import files, host


def info_payload(name: str, roots: list[str]) -> dict:
    """What /loha/info answers for `name`; the file is named as the browser knows it."""
    summary = summarize(loha.load(files.resolve(name, roots)))
    summary["file"] = name
    return {"name": name, "summary": summary, "text": render(summary),
            "preview": files.preview(name, roots) is not None}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def info(request: web.Request) -> web.Response:
    roots = host.lora_roots()
    try:
        payload = await asyncio.to_thread(info_payload, request.query.get("name", ""), roots)
    except files.Refused as exc:
        return _error(exc.status, str(exc))
    except LohaError as exc:  # names the file by its server path: answered relative to the folder
        return _error(422, files.relative_to_roots(str(exc), roots))
    return web.json_response(payload)


async def preview(request: web.Request) -> web.StreamResponse:
    try:
        path = files.preview(request.query.get("name", ""), host.lora_roots())
    except files.Refused as exc:
        return _error(exc.status, str(exc))
    if path is None:
        return _error(404, "no preview image")
    return web.FileResponse(path, headers={"Content-Type": files.content_type(path), "Cache-Control": "no-cache"})


ROUTES = {"/loha/info": info, "/loha/preview": preview}


def register(routes) -> None:
    """Add the GET routes to a route table (ComfyUI's server mirrors them under /api)."""
    for path, handler in ROUTES.items():
        routes.get(path)(handler)

"""OHIF's way to the PACS, ``/proxy/dicom/...``: asynchronous, with the app's PACS credentials and timeout.

MONAI Label's own proxy asks the PACS with blocking ``requests`` calls on the server's event loop and no timeout:
every other request (``/info``, Slicer's calls) waited while the PACS answered one viewer request, and a PACS that
accepted a connection and never answered stopped the server for good. This proxy takes over its paths
(``/proxy/dicom/wado|qido|stow/...`` with MONAI Label's URL prefixes, and ``/proxy/dicom/...``) and asks the PACS with
httpx without blocking the loop, streaming the answer back. It gives up after ``--conf dicomweb_timeout`` seconds
without an answer (504) and answers 502 when the PACS cannot be reached. Only the headers a DICOMweb exchange needs go
to the PACS, never the viewer's own credentials or cookies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from monailabel.config import settings as monailabel_settings

__all__ = ["PROXY_PATH", "install_dicomweb_proxy"]

logger = logging.getLogger(__name__)

PROXY_PATH = "/proxy/dicom"
FORWARDED_REQUEST_HEADERS = ("accept", "content-type")  # what QIDO/WADO/STOW requests need
FORWARDED_ANSWER_HEADERS = ("content-type", "content-disposition", "etag", "last-modified", "cache-control")


def _prefix(operation: str) -> str | None:
    return {
        "qido": monailabel_settings.MONAI_LABEL_QIDO_PREFIX,
        "wado": monailabel_settings.MONAI_LABEL_WADO_PREFIX,
        "stow": monailabel_settings.MONAI_LABEL_STOW_PREFIX,
    }[operation]


def pacs_path(path: str) -> str:
    """The PACS path of a proxy path: ``qido/studies`` -> ``studies`` (or ``<QIDO prefix>/studies``); a path
    without an operation passes as it is. Metadata asked through QIDO is a WADO request (some OHIF versions).

    ``ValueError`` (400) for a path that would climb out of the DICOMweb root (``..``), also once the PACS decodes
    it again (``%2e%2e``, sent double-encoded): with the server's PACS account behind it, that would reach the PACS's
    other APIs (Orthanc's REST API and its administration). DICOMweb paths hold no ``%``; each segment goes to the
    PACS percent-encoded, so it decodes back to what was checked."""
    if any(part in (".", "..") or "%" in part for part in path.replace("\\", "/").split("/")):
        raise ValueError(f"The DICOMweb proxy path {path!r:.200} leaves the PACS's DICOMweb root: refused")
    operation, _, rest = path.partition("/")
    if operation not in ("qido", "wado", "stow"):
        return path
    if operation == "qido" and rest.endswith("metadata"):
        operation = "wado"
    prefix = _prefix(operation)
    return f"{prefix.strip('/')}/{rest}" if prefix else rest


def install_dicomweb_proxy(studies: str, auth: tuple[str, str] | None, timeout: float) -> None:
    """Put this proxy to ``studies`` ahead of MONAI Label's ``/proxy/dicom`` routes on the running server (the first
    matching route answers, so MONAI Label's are never reached)."""
    from monailabel.app import app as server

    ours = _router(studies.rstrip("/"), auth, timeout).routes
    names = {route.name for route in ours}
    kept = [r for r in server.router.routes if getattr(r, "name", None) not in names]  # a reload replaces ours
    server.router.routes[:] = ours + kept
    logger.info("OHIF reaches the PACS through %s (timeout %g s)", PROXY_PATH, timeout)


def _router(studies: str, auth: tuple[str, str] | None, timeout: float) -> APIRouter:
    router = APIRouter(prefix=PROXY_PATH, include_in_schema=False)

    @router.api_route("/{path:path}", methods=["GET", "POST"], name="medsam3_dicomweb_proxy")
    async def proxy(request: Request, path: str) -> StreamingResponse:
        url = f"{studies}/{'/'.join(quote(part, safe='') for part in pacs_path(path).split('/'))}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        client = httpx.AsyncClient(timeout=timeout, auth=auth)
        outgoing = client.build_request(
            request.method,
            url,
            params=request.query_params.multi_items(),
            headers=headers,
            content=await request.body(),
        )
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.TimeoutException as error:
            await client.aclose()
            raise HTTPException(504, f"The PACS did not answer {path} within {timeout:g} s ({error!r})") from error
        except httpx.HTTPError as error:
            await client.aclose()
            raise HTTPException(502, f"The PACS could not be reached for {path}: {error!r}") from error

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_bytes():
                    yield chunk
            finally:  # also when the viewer leaves or the PACS stalls mid-answer
                await answer.aclose()
                await client.aclose()

        kept = {k: v for k, v in answer.headers.items() if k.lower() in FORWARDED_ANSWER_HEADERS}
        return StreamingResponse(body(), answer.status_code, kept)

    return router

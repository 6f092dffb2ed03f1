"""The search service over HTTP (FastAPI + uvicorn, the ``serve`` extra) and the ``serve`` verb.

Importing this module needs the extra; the runner imports it only for ``serve``.

Endpoints (all errors are ``{"error": "..."}`` with a 4xx code; the server keeps serving):

- ``POST /search``: multipart ``image`` (+ ``k``, ``rerank``, ``bbx`` = ``x1,y1,x2,y2``) or JSON
  ``{"id": ..., "k": ..., "rerank": ...}`` → ``{"query", "results": [{"id", "score",
  "landmark_id"?}], "timing_ms": {"embed", "search", "rerank", "queue"}}``;
- ``POST /search/batch``: multipart ``images`` (several files, each with an optional ``bbx``
  field in the same order) or JSON ``{"ids": [...]}`` → ``{"results": [{"query", "results"}],
  "timing_ms"}``;
- ``GET /`` the page (``templates/search.html``), ``GET /thumb/{id}?size=160`` a JPEG
  thumbnail, ``GET /health``, ``GET /info``.

Handlers are ``async`` only to read the request; decoding, the net and the search run in
the thread pool, off the event loop (`SearchService` serialises the net).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from retrieval.service import (
    Limits,
    RequestError,
    SearchService,
    dataset_table,
    decode_image,
    image_table,
    load_service,
    parse_bbx,
    parse_k,
)

logger = logging.getLogger(__name__)

PAGE = "search.html"


def _page() -> str:
    return resources.files("retrieval").joinpath("templates", PAGE).read_text(encoding="utf-8")


def create_app(service: SearchService) -> FastAPI:
    """The ASGI app answering for ``service``."""
    limits = service.limits
    app = FastAPI(title="landmark-retrieval search", docs_url="/docs", redoc_url=None)
    page = _page()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    async def _read_json(request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > 1 << 20:
            raise RequestError("JSON body over 1 MiB", 413)
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"body: malformed JSON ({err})") from None
        if not isinstance(data, dict):
            raise RequestError("body: expected a JSON object")
        return data

    async def _read_form(request: Request, n_files: int) -> Any:
        size = request.headers.get("content-length")
        budget = n_files * limits.max_bytes + (1 << 20)
        if size is not None and size.isdigit() and int(size) > budget:
            raise RequestError(f"request of {size} bytes, over the limit of {budget}", 413)
        try:
            return await request.form(max_files=n_files, max_fields=4 * n_files + 8)
        except HTTPException as err:
            raise RequestError(f"multipart body: {err.detail}") from None

    async def _upload(value: Any, name: str) -> bytes:
        if not isinstance(value, UploadFile):
            raise RequestError(f"{name}: expected a file upload")
        return await value.read(limits.max_bytes + 1)

    def _decode(files: list[tuple[bytes, str, str]]) -> list:
        images = []
        for data, label, bbx in files:
            img = decode_image(data, limits, label)
            images.append((img, parse_bbx(bbx, img.size)))
        return images

    def _kind(request: Request) -> str:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return "json"
        if ctype == "multipart/form-data":
            return "form"
        raise RequestError(f"content type {ctype or 'none'!r}: send multipart/form-data (an image) or "
                           "application/json (an indexed id)", 415)

    def _query(label: str, img: Any, bbx: Any) -> dict[str, Any]:
        return {"filename": label, "width": img.width, "height": img.height, "bbx": list(bbx) if bbx else None}

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        if _kind(request) == "json":
            data = await _read_json(request)
            if "id" not in data:
                raise RequestError("body: expected {\"id\": <an indexed id>}")
            k, method = parse_k(data.get("k"), limits), service.check_method(data.get("rerank"))
            results, timing = await run_in_threadpool(service.search_ids, [data["id"]], k, method)
            return {"query": {"id": data["id"]}, "results": results[0], "timing_ms": timing}
        form = await _read_form(request, 1)
        if "image" not in form:
            raise RequestError("multipart body: no 'image' file field")
        k, method = parse_k(form.get("k"), limits), service.check_method(form.get("rerank"))
        upload = form["image"]
        label = getattr(upload, "filename", None) or "image"
        data = await _upload(upload, "image")
        images = await run_in_threadpool(_decode, [(data, f"image {label!r}", form.get("bbx"))])
        results, timing = await run_in_threadpool(service.search_images, images, k, method)
        img, bbx = images[0]
        return {"query": _query(label, img, bbx), "results": results[0], "timing_ms": timing}

    @app.post("/search/batch")
    async def search_batch(request: Request) -> dict[str, Any]:
        if _kind(request) == "json":
            data = await _read_json(request)
            ids = data.get("ids")
            if not isinstance(ids, list) or not ids:
                raise RequestError("body: expected {\"ids\": [<indexed ids>]}")
            if len(ids) > limits.max_batch:
                raise RequestError(f"ids: {len(ids)} ids, over the limit of {limits.max_batch}", 413)
            k, method = parse_k(data.get("k"), limits), service.check_method(data.get("rerank"))
            results, timing = await run_in_threadpool(service.search_ids, ids, k, method)
            return {"results": [{"query": {"id": i}, "results": r} for i, r in zip(ids, results, strict=True)],
                    "timing_ms": timing}
        form = await _read_form(request, limits.max_batch)
        uploads = form.getlist("images") or form.getlist("image")
        if not uploads:
            raise RequestError("multipart body: no 'images' file fields")
        boxes = form.getlist("bbx")
        if boxes and len(boxes) != len(uploads):
            raise RequestError(f"bbx: {len(boxes)} boxes for {len(uploads)} images (send one per image, "
                               "empty for none)")
        k, method = parse_k(form.get("k"), limits), service.check_method(form.get("rerank"))
        files = []
        for n, upload in enumerate(uploads):
            label = getattr(upload, "filename", None) or f"images[{n}]"
            files.append((await _upload(upload, f"images[{n}]"), f"images[{n}] {label!r}",
                          boxes[n] if boxes else None))
        images = await run_in_threadpool(_decode, files)
        results, timing = await run_in_threadpool(service.search_images, images, k, method)
        return {"results": [{"query": _query(getattr(u, "filename", "") or "", img, bbx), "results": r}
                            for u, (img, bbx), r in zip(uploads, images, results, strict=True)],
                "timing_ms": timing}

    @app.get("/thumb/{image_id:path}")
    async def thumb(image_id: str, size: int = 160) -> Response:
        data = await run_in_threadpool(service.thumbnail, image_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "index_size": len(service.ids)}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


def build_service(exp: Any, checkpoint: Path | None, features: Path, images: Path | None,
                  methods: list[str], device: str | torch.device = "cpu", limits: Limits | None = None,
                  index: Path | None = None) -> SearchService:
    """The service of an experiment: its net (``checkpoint``, else the one that extracted ``features``,
    else the params' pretrained net), thumbnails from ``images`` or the experiment's dataset, and a
    saved ``index`` of ``features`` when given."""
    from retrieval.features import read_features
    from retrieval.models import load_checkpoint

    if checkpoint is None:
        recorded = read_features(features)[2].get("checkpoint") or ""
        if recorded and Path(recorded).is_file():
            checkpoint = Path(recorded)
            logger.info("serving with %s, the checkpoint %s was extracted with", checkpoint, features.name)
    net = load_checkpoint(checkpoint) if checkpoint is not None else exp.make_net(None)()
    table = image_table(images) if images is not None else dataset_table(exp.dataset())
    return load_service(net, features, table=table, methods=methods, params=exp.params,
                        limits=limits or Limits(), device=device, index=index)


def serve(exp: Any, checkpoint: Path | None, features: Path, images: Path | None, host: str = "127.0.0.1",
          port: int = 8000, methods: list[str] | None = None, device: str | torch.device = "cpu",
          index: Path | None = None) -> None:
    """Build the service and answer on ``host:port`` until interrupted (logs also to ``serve.log``)."""
    import uvicorn
    service = build_service(exp, checkpoint, features, images, list(methods or ["none"]), device, index=index)
    handler = logging.FileHandler(exp.out_root / "serve.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("retrieval", "uvicorn", "uvicorn.access"):
        logging.getLogger(name).addHandler(handler)
    logger.info("serving %s on http://%s:%d/", features, host, port)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")

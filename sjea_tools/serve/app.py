"""The FastAPI app: the search page (static files of this package) and the JSON API it uses.

Every endpoint is a plain `def`: FastAPI runs it in its thread pool, so concurrent clients search
in parallel on the one LoadedStore (FAISS and NumPy release the GIL). Every error is JSON
{"error": "one message"} with a 4xx status; the schema is at /openapi.json, browsable at /docs.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import List, Literal, Optional, Sequence
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SjeaError
from ..index import ForeignIndexError
from ..store import StoreDamagedError
from ..store.sources import ForeignSourceError
from .duplicates_route import add_duplicates_routes
from .media import (MAX_PIXELS, MAX_UPLOAD_BYTES, THUMB_SIZES, BadImage, Forbidden, Missing, TooLarge, item_file,
                    read_limited, thumbnail_png, upload_file)
from .state import StaleStore, StoreHolder, UnknownItem
from .tree import NoTree

STATIC = Path(__file__).parent / "static"
MAX_K = 1000
MAX_IDS = 100
MAX_MEMBERS = 500
# Room for the multipart envelope around an upload of exactly the byte limit.
MULTIPART_SLACK = 64 << 10
# A store damaged on disk (a segment deleted while serving) is the server's state, not a bad request.
STATUS = ((UnknownItem, 404), (Missing, 404), (NoTree, 404), (Forbidden, 403), (TooLarge, 413), (StaleStore, 409),
          (StoreDamagedError, 409), (ForeignSourceError, 409), (ForeignIndexError, 409), (BadImage, 400),
          (SjeaError, 400))
Mode = Literal["per-level", "hierarchical", "both"]
Within = Literal["score", "groups"]


def create_app(store, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               run=None, onnx=None, allowed_hosts: Optional[Sequence[str]] = None) -> FastAPI:
    """The app serving one store (a path, or a StoreHolder to share one): page at /, API under /api.
    allowed_hosts: the Host header values answered (`allowed_host_values`); None answers any (an app
    mounted elsewhere, or a TestClient): `sjea serve` always passes them."""
    holder = store if isinstance(store, StoreHolder) else StoreHolder(store, run=run, onnx=onnx)
    app = FastAPI(title="sjea serve", version="1",
                  description=f"Search the S-JEA embedding store {holder.path.name} by image, by stored id or "
                              "by a list of ids; browse its cluster tree and its near-duplicate groups. "
                              "Errors are {\"error\": message}.")
    app.state.holder, app.state.max_pixels = holder, max_pixels
    _add_error_handlers(app)
    app.add_middleware(UploadLimit, max_body=max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(HeadAsGet)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    _add_search_routes(app, holder, max_upload_bytes, max_pixels)
    _add_item_routes(app, holder, max_pixels)
    _add_page(app)
    _add_photo_routes(app, holder)
    add_duplicates_routes(app, holder)
    return app


# --- errors ----------------------------------------------------------------------------------------

def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def api_message(text: str) -> str:
    """The library's messages name CLI options (--k); the API's parameters have the bare names."""
    return re.sub(r"--(k|mode|level|order|probes|margin|within|id|min-score|threshold)\b",
                  lambda m: m.group(1).replace("-", "_"), text)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SjeaError)
    def sjea_error(request: Request, exc: SjeaError):
        status = next(code for cls, code in STATUS if isinstance(exc, cls))
        return error(status, api_message(str(exc)))

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())
                        if p not in ("query", "path", "body")).lstrip(".")
        got = first.get("input")
        shown = "" if got is None or isinstance(got, (dict, list)) else f" (got {str(got)[:60]!r})"
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}{shown}")

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error(404, f"no such page or endpoint: {request.url.path[:200]} (the API is listed at /docs)")
        if exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            return error(405, f"{request.method} is not allowed on {request.url.path[:200]}"
                              f"{'; use ' + allowed if allowed else ''}")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception):
        # A bug, not a bad request: still one line, never a traceback to the client.
        return error(500, f"internal error ({type(exc).__name__}); the server log has details")


class UploadLimit:
    """Refuses a request body over the limit from its Content-Length before any of it is read, and a
    body without one (chunked) on POST: the multipart parser would spool any size to disk. A
    request with neither header has no body (HTTP/1.1) and goes to its route."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None and b"transfer-encoding" not in headers:
                return await self.app(scope, receive, send)  # no body at all: the route answers (405, 422)
            if length is None or not re.fullmatch(rb"[0-9]{1,15}", length):
                return await error(411, "send the upload with a Content-Length header (browsers and curl do)")(
                    scope, receive, send)
            if int(length) > self.max_body:
                limit = (self.max_body - MULTIPART_SLACK) / 2**20
                return await error(413, f"the upload is larger than the limit of {limit:g} MiB; "
                                        "send a smaller image.")(scope, receive, send)
        await self.app(scope, receive, send)


def allowed_host_values(host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The Host headers a server bound to host:port answers: the bound address and the loopback
    names with the port (a DNS-rebinding page sends its own name), plus the names the user allowed
    (`extra`: a name alone matches it with any port)."""
    names = {f"[{host}]" if ":" in host else host, "localhost", "127.0.0.1", "[::1]"}
    bare = sorted(names) if port == 80 else []  # browsers leave the default port out
    return sorted(f"{n}:{port}" for n in names) + bare + [h.strip().lower() for h in extra if h.strip()]


def host_name(host: str) -> str:
    """'name:port' -> 'name'; '[::1]:80' -> '[::1]'."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0]


class HostCheck:
    """Answers only requests whose Host header is one of `allowed` ('name:port', or a name alone
    for any port); others get 400: a loopback server is not reachable through DNS rebinding."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            if host not in self.allowed and host_name(host) not in self.allowed:
                return await error(400, f"this server does not answer for host '{host[:100]}'; open it at the "
                                        "address it printed, or start it with --allow-host NAME")(scope, receive, send)
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD is answered as GET without the body (FastAPI routes answer only the methods declared)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


# --- search ----------------------------------------------------------------------------------------

def search_options(param):
    """The options every search takes, as `sjea search` spells them, read from the query string
    (param=Query) or from the upload's form fields (param=Form)."""

    def options(k: int = param(10, ge=1, le=MAX_K, description="Results per query (clipped to the store's rows)."),
                mode: Optional[Mode] = param(None, description="per-level, hierarchical or both [default: "
                                             "hierarchical with 2+ levels]."),
                level: Optional[str] = param(None, description="per-level: only these levels: 0, 0,1 or all."),
                order: Optional[str] = param(None, description="hierarchical: the cluster tree's levels, coarse "
                                             "first, e.g. 1,0 (must match the tree)."),
                probes: int = param(1, ge=1, le=1000, description="hierarchical: coarse clusters the answer may "
                                    "come from."),
                margin: float = param(0.0, ge=0.0, le=2.0, description="hierarchical: also search every coarse "
                                      "cluster within this cosine of the nearest (soft gate; 0: hard gate)."),
                within: Within = param("score", description="hierarchical: rank inside the gate by score, or "
                                       "sub-cluster by sub-cluster (groups)."),
                min_score: Optional[float] = param(None, description="Leave out hits scoring below this "
                                                   "(cosine -1..1; ranks are kept)."),
                where: Optional[List[str]] = param(None, description="Only hits where folder=F, label=NAME or "
                                                   "path=GLOB (repeat: all must hold)."),
                exclude_same_folder: bool = param(False, description="Leave out hits in the query's own "
                                                  "folder.")) -> dict:
        return {"k": k, "mode": mode, "level": level or None, "order": order or None, "probes": probes, "margin": margin,
                "within": within, "min_score": min_score, "where": tuple(where or ()),
                "exclude_same_folder": exclude_same_folder}

    return options


def _add_search_routes(app: FastAPI, holder: StoreHolder, max_upload_bytes: int, max_pixels: int) -> None:
    @app.get("/api/search", summary="Search by stored ids", tags=["search"])
    def search_ids(id: List[int] = Query(..., description=f"Stored row(s) to search from (repeat: id=1&id=2; "
                                         f"at most {MAX_IDS})."),
                   opts: dict = Depends(search_options(Query))) -> dict:
        """The neighbours of stored rows: the fields of `sjea search --id N --json` (+ cluster_path)."""
        if len(id) > MAX_IDS:
            raise BadImage(f"at most {MAX_IDS} ids per request, not {len(id)}.")
        loaded = holder.current()
        ids = [loaded.check_id(i) for i in id]
        # a Response skips FastAPI's validation and encoding of the result (~0.2 ms of GIL per request)
        return JSONResponse(loaded.search(ids=ids, **opts))

    @app.post("/api/search/image", summary="Search by uploaded images", tags=["search"])
    def search_image(file: List[UploadFile] = File(..., description=f"An image (jpg, png, ...) up to "
                                                   f"{max_upload_bytes / 2**20:g} MiB and {max_pixels:,} pixels; "
                                                   f"repeat for several (at most {MAX_IDS}, the size limit is "
                                                   "for them all)."),
                     opts: dict = Depends(search_options(Form))) -> dict:
        """The neighbours of uploaded images, embedded with the store's own model and preprocessing,
        in one batch: a result per image, in upload order."""
        if len(file) > MAX_IDS:
            raise BadImage(f"at most {MAX_IDS} images per request, not {len(file)}.")
        data = [read_limited(f.file, max_upload_bytes) for f in file]
        loaded = holder.current()
        names = [Path(f.filename or "image").name[:200] for f in file]
        with ExitStack() as stack:
            paths = [stack.enter_context(upload_file(d, max_pixels)) for d in data]
            try:
                res = loaded.search(files=[str(p) for p in paths], **opts)
            except SjeaError as e:  # the client named its files; the server's temp paths are not its business
                text = str(e)
                for p, name in zip(paths, names):
                    text = text.replace(str(p), f"upload:{name}").replace(p.name, name)
                e.args = (text,)
                raise
        for r, name in zip(res["results"], names, strict=True):
            r["query"], r["query_file"] = f"upload:{name}", None
        return JSONResponse(res)


def row_id(loaded, text: str) -> int:
    """A row number written in ASCII digits only ("²", Arabic-Indic or fullwidth digits are not
    ids, though str.isdigit accepts them), else 404."""
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise UnknownItem(f"item ids are row numbers 0..{loaded.n - 1}, not '{text[:80]}'.")
    return loaded.check_id(text)


# --- items, clusters, info ----------------------------------------------------------------------

def _add_item_routes(app: FastAPI, holder: StoreHolder, max_pixels: int) -> None:
    @app.get("/api/info", summary="Store info", tags=["store"])
    def info() -> dict:
        """Rows, levels, dims, model, index kinds, whether image search and the cluster tree are available."""
        loaded = holder.current()
        return {**loaded.info(), "loads": holder.loads}

    @app.get("/api/items/{item_id}", summary="An item's metadata", tags=["items"])
    def item(item_id: str) -> dict:
        """Path (relative to the store's image root), class label, cluster path, thumbnail URL."""
        loaded = holder.current()
        return loaded.item(row_id(loaded, item_id))

    @app.get("/api/items/{item_id}/thumbnail", summary="An item's thumbnail (PNG)", tags=["items"],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(item_id: str, size: int = Query(128, ge=THUMB_SIZES[0], le=THUMB_SIZES[1])) -> Response:
        """At most size x size pixels; only files that are rows of the store, inside its image root."""
        loaded = holder.current()
        i = row_id(loaded, item_id)
        png = thumbnail_png(item_file(loaded.root, loaded.paths[i], i), size, max_pixels)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get("/api/clusters", summary="The cluster tree's top level", tags=["clusters"])
    def clusters() -> dict:
        """Level-0 clusters with sizes and example ids (nearest their centre)."""
        return holder.current().cluster_roots()

    @app.get("/api/clusters/{depth}/{node}", summary="A cluster: sub-clusters and members", tags=["clusters"])
    def cluster(depth: int, node: int, offset: int = Query(0, ge=0),
                limit: int = Query(60, ge=1, le=MAX_MEMBERS)) -> dict:
        """One node of the tree: its parent, its sub-clusters (with examples) and a page of member ids."""
        return holder.current().cluster_node(depth, node, offset, limit)


def _add_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# --- photos: originals, browsing every row, cluster names --------------------------------------------

# What a browser is told each stored format is; any other file is not served as an original.
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "BMP": "image/bmp",
               "TIFF": "image/tiff", "WEBP": "image/webp"}
MAX_BROWSE = 500


def original_response(path: Path, item_id: int) -> StreamingResponse:
    """The stored file as it is, streamed from one open handle (checked to be an image from that
    same handle, so a file swapped after the check is never what is sent)."""
    from PIL import Image

    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise Missing(f"the image file of item {item_id} is no longer in the store's image root.") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: only the header is read here
            with Image.open(handle, formats=tuple(MEDIA_TYPES)) as img:
                kind = img.format
        size = os.fstat(handle.fileno()).st_size
        handle.seek(0)
    except Exception:  # noqa: BLE001 - any failure to read a header means "not an image"
        handle.close()
        raise BadImage(f"the file of item {item_id} is not an image it can serve "
                       f"({', '.join(MEDIA_TYPES).lower()}).") from None

    def chunks():
        with handle:
            while block := handle.read(1 << 20):
                yield block

    name = quote(path.name)
    return StreamingResponse(chunks(), media_type=MEDIA_TYPES.get(kind, "application/octet-stream"),
                             headers={"Content-Length": str(size), "X-Content-Type-Options": "nosniff",
                                      "Content-Disposition": f"inline; filename*=UTF-8''{name}",
                                      "Cache-Control": "max-age=60"})


def _add_photo_routes(app: FastAPI, holder: StoreHolder) -> None:
    names_cache: dict = {}

    @app.get("/api/items/{item_id}/original", summary="An item's original file, full size", tags=["items"],
             response_class=Response, responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
    def original(item_id: str) -> StreamingResponse:
        """The stored photo as it is on disk: only rows of the store, inside its image root, image files only."""
        loaded = holder.current()
        i = loaded.check_id(item_id)
        return original_response(item_file(loaded.root, loaded.paths[i], i), i)

    @app.get("/api/items", summary="Every stored row, a page at a time", tags=["items"])
    def items(offset: int = Query(0, ge=0, description="First row of the page."),
              limit: int = Query(60, ge=1, le=MAX_BROWSE, description="Rows per page.")) -> dict:
        """Rows offset..offset+limit in store order: each item's id, path, label, cluster path and thumbnail."""
        loaded = holder.current()
        rows = range(offset, min(offset + limit, loaded.n))
        return {"total": loaded.n, "offset": offset,
                "items": [{**loaded.item(i), "original": f"/api/items/{i}/original"} for i in rows]}

    @app.get("/api/clusters/names", summary="Each cluster named by its majority folder", tags=["clusters"])
    def cluster_names() -> dict:
        """Per depth, per cluster id: the first sub-folder most of its rows come from, how many of them
        do (count) and its size, e.g. {"name": "cat", "count": 12, "size": 14}."""
        from .tree import cluster_names as names

        loaded = holder.current()
        key = (id(loaded), loaded.fingerprint)
        if key not in names_cache:
            names_cache.clear()  # one store version at a time
            names_cache[key] = names(loaded.tree, loaded.tree_note, loaded.paths)
        return names_cache[key]

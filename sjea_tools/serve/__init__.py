"""`sjea serve`: a search page and JSON API over one store (docs/serve.md).

    from sjea_tools.serve import create_app, serve, serve_in_thread
    serve("emb.h5", host="127.0.0.1", port=8000)      # blocks, as `sjea serve emb.h5`
    url, stop = serve_in_thread("emb.h5")            # a running server on a free port

Modules: `state` (the store loaded once per fingerprint), `media` (upload checks, thumbnails,
files by id only), `tree` (cluster-tree nodes), `app` (FastAPI routes and JSON errors), `server`
(uvicorn on a checked socket), `static/` (the page: plain HTML, CSS and JS, no build step).
"""

from __future__ import annotations

from .app import create_app
from .server import serve, serve_in_thread

__all__ = ["create_app", "serve", "serve_in_thread"]

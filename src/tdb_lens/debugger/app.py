"""The debugger's web app: a FastAPI JSON API around one `Investigation`, plus the static front end
shipped in this package (``static/``: plain HTML/CSS/JS, no build step, nothing fetched from a CDN).

Every request carries the whole state (prompts, target, interventions, trace), so the front end
can keep it in the URL. Model calls are serialised with a lock: concurrent clients get exactly
the results they would get one after the other. Requests never name files; prompts are capped
(`MAX_TOKENS` tokens). Bad requests get a 400 with a one-line reason. Any bind other than the
loopback interface needs the access token (query ``?token=``, header ``X-TDB-Token`` or the cookie
the first authorised page load sets).
"""

from __future__ import annotations

import hmac
import secrets
import threading
from importlib import resources
from typing import Any, Optional

from pydantic import BaseModel, Field

from .columns import DebuggerError
from .investigation import Investigation

MAX_CHARS = 20_000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class InterventionIn(BaseModel):
    node: str = Field(max_length=200)
    method: str = Field("zero", max_length=16)
    value: Optional[float] = None
    quantile: Optional[float] = None


class TraceIn(BaseModel):
    node: str = Field(max_length=200)
    through: Optional[str] = Field(None, max_length=2)


class StateIn(BaseModel):
    prompt: str = Field(max_length=MAX_CHARS)
    other_prompt: Optional[str] = Field(None, max_length=MAX_CHARS)
    target: Optional[str] = Field(None, max_length=200)
    distractor: Optional[str] = Field(None, max_length=200)
    interventions: list[InterventionIn] = Field(default_factory=list, max_length=64)
    trace: Optional[TraceIn] = None


class TableIn(StateIn):
    k: int = Field(10, ge=1, le=100)


class NodeIn(StateIn):
    node: str = Field(max_length=200)


class AttentionIn(StateIn):
    layer: int = Field(ge=0)
    head: int = Field(ge=0)


class SearchIn(BaseModel):
    query: str = Field(min_length=1, max_length=500)
    k: int = Field(10, ge=1, le=100)


class GenerateIn(StateIn):
    max_new_tokens: int = Field(20, ge=1, le=100)


class ThreadLocalStore:
    """An explanation store opened once per server thread (SQLite connections stay in their thread);
    every attribute is the thread's own `ExplanationStore`'s."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    def current(self):
        """This thread's `ExplanationStore` (functions typed for a store take this one)."""
        return self._store()

    def _store(self):
        s = getattr(self._local, "store", None)
        if s is None:
            from ..explain.store import ExplanationStore

            s = self._local.store = ExplanationStore(self.path)
        return s

    def __getattr__(self, name: str):
        return getattr(self._store(), name)


def needs_token(host: str) -> bool:
    """True when binding ``host`` exposes the app beyond this machine."""
    return host not in LOOPBACK


def _require_token(app, token: str) -> None:
    """Refuse (403) every request without ``token`` (query ``?token=``, header or cookie)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        given = (request.query_params.get("token") or request.headers.get("x-tdb-token")
                 or request.cookies.get("tdb_token") or "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "missing or wrong access token (open the URL the server printed)"}, 403)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie("tdb_token", token, httponly=True, samesite="strict")
        return response


def _static_routes(app) -> None:
    """The page and its two files, shipped in the package (a fixed list: no path from a request)."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    static = resources.files("tdb_lens.debugger") / "static"

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (static / "index.html").read_text(encoding="utf-8")

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:  # a fixed list: nothing from the request reaches the file system
            return JSONResponse({"detail": f"no static file {name!r}"}, 404)
        return Response((static / name).read_text(encoding="utf-8"), media_type=files[name])


def create_app(inv: Investigation, token: Optional[str] = None):
    """The FastAPI app serving ``inv`` (its model, SAEs, store and harvests). ``token``: required
    on every request when given (pass one whenever the app is bound to anything but loopback)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    if inv.store is not None and not isinstance(inv.store, ThreadLocalStore):
        if getattr(inv.store, "path", ":memory:") == ":memory:":
            raise DebuggerError("the web app needs an explanation store on disk (SQLite connections are per thread)")
        inv.store = ThreadLocalStore(inv.store.path)
    app = FastAPI(title="tdb_lens debugger", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    _static_routes(app)

    if token is not None:
        _require_token(app, token)

    @app.exception_handler(DebuggerError)
    async def bad_request(request: Request, exc: DebuggerError):
        return JSONResponse({"detail": str(exc).splitlines()[0] if str(exc) else "bad request"}, 400)

    def run(state: StateIn, fn) -> Any:
        with lock:
            inv.load_state(state.model_dump())
            try:
                return fn()
            except (KeyError, IndexError) as e:
                raise DebuggerError(str(e).strip("'\"")) from None

    @app.get("/api/info")
    def info() -> dict:
        cfg = inv.model.cfg
        from .units import _harvests

        with lock:
            hooks = sorted(_harvests(inv))
        return {"model": getattr(cfg, "model_name", type(inv.model).__name__), "n_layers": cfg.n_layers,
                "n_heads": cfg.n_heads, "store": inv.store is not None, "harvests": hooks,
                "max_tokens": inv.max_tokens, "saes": list(_sae_sites(inv)),
                "explainer": getattr(inv.explainer, "name", "top-tokens"), "scores": list(inv.scores)}

    @app.post("/api/table")
    def table(req: TableIn) -> dict:
        return run(req, lambda: inv.node_table(k=req.k).as_dict())

    @app.post("/api/logits")
    def logits(req: StateIn) -> dict:
        return run(req, lambda: inv.logits().as_dict())

    @app.post("/api/unit")
    def unit(req: NodeIn) -> dict:
        return run(req, lambda: inv.unit(req.node).as_dict())

    @app.post("/api/attention")
    def attention(req: AttentionIn) -> dict:
        def go():
            v = inv.attention(req.layer, req.head)
            return {"layer": req.layer, "head": req.head, "tokens": v.tokens, "pattern": v.pattern.tolist()}

        return run(req, go)

    @app.post("/api/search")
    def search(req: SearchIn) -> dict:
        with lock:
            return inv.search(req.query, req.k).as_dict()

    @app.post("/api/explain")
    def explain(req: NodeIn) -> dict:
        return run(req, lambda: inv.explain(req.node).as_dict())

    @app.post("/api/generate")
    def generate(req: GenerateIn) -> dict:
        return run(req, lambda: inv.generate(req.max_new_tokens))

    return app


def _sae_sites(inv) -> list[str]:
    from ..sae.attach import attached_saes

    return list(attached_saes(inv.model))


def new_token() -> str:
    return secrets.token_urlsafe(24)


class BackgroundServer:
    """The app served by uvicorn in a daemon thread (``url``; ``stop()``), e.g. to show it in a notebook."""

    def __init__(self, inv: Investigation, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None) -> None:
        import time

        import uvicorn

        if needs_token(host) and token is None:
            token = new_token()
        self.token = token
        self.server = uvicorn.Server(uvicorn.Config(create_app(inv, token), host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(1200):
            if self.server.started:
                break
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError(f"the debugger server did not start on {host}:{port}")
        bound = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{bound}/" + (f"?token={token}" if token else "")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def _repr_html_(self) -> str:
        """The app in an iframe (the notebook's browser must reach ``url``)."""
        return f"<iframe src='{self.url}' width='100%' height='800' style='border:1px solid #ddd'></iframe>"

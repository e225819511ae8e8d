"""The review page's HTTP side: a Starlette app over Piles (what is where, the moves).

Security, in the order a request meets it: the Host header must name this machine (a DNS
rebinding page cannot reach it under its own name); beyond loopback every request carries the
token (a query parameter once, then an HttpOnly cookie); every state change is a POST with the
page's CSRF value in a header (a cross-site form cannot set one) and, when the browser sends an
Origin, one that matches the Host.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..stats import report as stats_report
from ..status import read_status, status_line, summary_line
from ..taste import BY, Ledger
from .piles import Piles, ReviewError
from .thumbnails import Thumbnails

STATIC = Path(__file__).resolve().parent / "static"
PAGE_SIZE_LIMIT = 500
TOKEN_COOKIE = "sdxld_review_token"
MAX_BODY = 1_000_000


class Guard:
    """Host, token and CSRF checks around the app (pure ASGI, so it also guards static files)."""

    def __init__(self, app, allowed_hosts: set[str], token: str | None, csrf: str):
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.token = token
        self.csrf = csrf

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        problem = self._problem(request)
        if problem:
            return await PlainTextResponse(problem[1], status_code=problem[0])(scope, receive, send)
        if self.token and request.query_params.get("token"):
            # The token came in the printed URL: keep it in a cookie and drop it from the address bar.
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _problem(self, request: Request) -> tuple[int, str] | None:
        host = _host_name(request.headers.get("host", ""))
        if host not in self.allowed_hosts:
            return 421, (f"this review page does not answer to the host name {host[:100]!r}; open it by this "
                         "machine's name or address, or add the name to review.hosts in config.yaml")
        if self.token:
            offered = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                       or request.headers.get("x-review-token") or "")
            if not hmac.compare_digest(offered.encode(), self.token.encode()):
                return 401, "this review page needs its token: open the URL `sdxld review` printed (…/?token=…)"
        if request.method not in ("GET", "HEAD"):
            if request.method != "POST":
                return 405, "only GET and POST"
            if not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(), self.csrf.encode()):
                return 403, "refused: a change must come from the review page itself (no CSRF value)"
            origin = request.headers.get("origin")
            if origin and _host_name(origin.split("://", 1)[-1]) != host:
                return 403, f"refused: a request from another site ({origin[:100]})"
        return None


def _host_name(host: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1', '[::1]:8765' -> '::1', 'Example.org' -> 'example.org'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(layout, *, allowed_hosts: set[str], token: str | None = None, taste_since: float | None = None,
               learning: str = "") -> Starlette:
    piles = Piles(layout)
    taste = TasteView(layout, piles, taste_since, learning)
    csrf = secrets.token_urlsafe(24)
    thumbnails = Thumbnails(layout.state / "thumbnails")

    def page(request: Request) -> Response:
        html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{CSRF}}", csrf)
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})

    def pile(request: Request) -> Response:
        name = request.path_params["pile"]
        items = piles.items(name)
        if request.query_params.get("order") == "oldest":
            items.reverse()
        character, style = request.query_params.get("character", ""), request.query_params.get("style", "")
        text = request.query_params.get("q", "").casefold()
        loras_seen: dict[str, set[str]] = {"character": set(), "style": set()}
        if character or style or text or request.query_params.get("facets"):
            kept = []
            for item in items:
                record = piles.record(piles.folder(name) / item.name) or {}
                rotated = {u["kind"]: u["name"] for u in record.get("loras", []) if u.get("via") == "rotation"}
                for kind in loras_seen:
                    if kind in rotated:
                        loras_seen[kind].add(rotated[kind])
                if character and rotated.get("character") != character or style and rotated.get("style") != style:
                    continue
                if text and text not in record.get("prompt", "").casefold():
                    continue
                kept.append(item)
            items = kept
        offset = max(0, _int(request.query_params.get("offset"), 0))
        limit = min(PAGE_SIZE_LIMIT, max(1, _int(request.query_params.get("limit"), 100)))
        shown = items[offset:offset + limit]
        # Where each final's stage-1 image is now, for the before/after view.
        stage1_piles = {source: {i.name for i in piles.items(source)} for source in ("done", "stage1", "approved")} \
            if name == "final" else {}
        return JSONResponse({
            "pile": name, "total": len(items), "offset": offset,
            "items": [{"name": i.name, "mtime": i.mtime, **_extras(piles, name, i.name, stage1_piles)} for i in shown],
            "loras": {kind: sorted(names) for kind, names in loras_seen.items()},
        })

    def record(request: Request) -> Response:
        path = piles.path(request.path_params["pile"], request.path_params["name"])
        return JSONResponse({"name": path.name, "record": piles.record(path)})

    def image(request: Request) -> Response:
        path = piles.path(request.path_params["pile"], request.path_params["name"])
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    def thumbnail(request: Request) -> Response:
        path = piles.path(request.path_params["pile"], request.path_params["name"])
        return FileResponse(thumbnails.get(path), media_type="image/webp", headers={"Cache-Control": "max-age=3600"})

    def status(request: Request) -> Response:
        daemons = read_status(layout.root)
        return JSONResponse({
            "signature": piles.signature(),
            "daemons": [{"line": status_line(d), "pid": d.get("pid"), "host": d.get("host"), "current": d.get("current")}
                        for d in daemons],
            "summary": summary_line(daemons) if len(daemons) > 1 else None,
            "counts": {name: len(piles.items(name)) for name in piles.folders},
        })

    def taste_report(request: Request) -> Response:
        by = request.query_params.get("by") or None
        if by is not None and by not in BY:
            raise ReviewError(f"no such table {by[:40]!r}; one of {', '.join(BY)}", 404)
        return JSONResponse(taste.report(by))

    async def act(request: Request) -> Response:
        verb = request.path_params["verb"]
        actions = {"approve": piles.approve, "reject": piles.reject, "retry": piles.retry}
        if verb == "undo":
            action = piles.undo()
        elif verb in actions:
            names = await _names(request)
            action = actions[verb](names)
        else:
            raise ReviewError(f"no such action {verb[:40]!r}", 404)
        return JSONResponse({"verb": action.verb, "names": action.names,
                             "moved": [[str(s.relative_to(layout.root)), str(d.relative_to(layout.root))] for s, d in action.moves]})

    async def refused(request: Request, err: ReviewError) -> Response:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    routes = [
        Route("/", page),
        Route("/api/pile/{pile}", pile),
        Route("/api/record/{pile}/{name:path}", record),
        Route("/api/status", status),
        Route("/api/taste", taste_report),
        Route("/api/{verb}", act, methods=["POST"]),
        Route("/image/{pile}/{name:path}", image),
        Route("/thumb/{pile}/{name:path}", thumbnail),
        Mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ReviewError: refused},
                     middleware=[Middleware(Guard, allowed_hosts=allowed_hosts, token=token, csrf=csrf)])


class TasteView:
    """The Taste view's numbers: one Ledger, read in full once, then again (new records only)
    whenever a pile or outputs/metadata changed."""

    def __init__(self, layout, piles: Piles, since: float | None, learning: str):
        self.layout, self.piles, self.since, self.learning = layout, piles, since, learning
        self.ledger = Ledger(layout)
        self._seen = None
        self._lock = threading.Lock()

    def report(self, by: str | None) -> dict:
        with self._lock:
            try:
                metadata = self.layout.metadata.stat().st_mtime_ns
            except FileNotFoundError:
                metadata = None
            seen = (self.piles.signature(), metadata)
            if seen != self._seen:
                self.ledger.load()
                self._seen = seen
            return stats_report(self.ledger, by, self.since, self.learning)


def _extras(piles: Piles, pile: str, name: str, stage1_piles: dict[str, set[str]]) -> dict:
    """What a list item needs beyond its name: failed images' error text, the claim's owner."""
    if pile == "failed":
        return {"error": piles.error_text(name)}
    if pile == "processing" and "__" in name:
        owner, shown = name.split("__", 1)
        return {"shown": shown, "owner": owner}
    if pile == "final":
        record = piles.record(piles.folder(pile) / name) or {}
        stage1 = (record.get("files") or {}).get("stage1")
        for source, names in stage1_piles.items():
            if stage1 in names:
                return {"before": [source, stage1]}
    return {}


async def _names(request: Request) -> list[str]:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ReviewError("request too large", 413)
    try:
        names = json.loads(body or b"{}").get("names")
    except (json.JSONDecodeError, AttributeError):
        raise ReviewError("the request is not JSON {\"names\": [...]}", 400) from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ReviewError("names must be a list of file names", 400)
    return names


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default

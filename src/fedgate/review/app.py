"""The review page: a local FastAPI app, server-rendered, that lists held replies and takes
approve / reject decisions.

Security: bound to loopback; a random access token (printed at start-up) is required on
every request, as `?token=` once (then an HttpOnly, SameSite=Strict cookie) or as a Bearer
header; every form carries a CSRF token bound to the item; a POST whose Origin (or
Sec-Fetch-Site) says it came from another site is refused; no page may be framed.

Bound to bytes: the item page shows the SHA-256 of the payload approval would send, checked
against the gate's `review-held` ledger entry; an item whose payload the gate did not hold
cannot be approved here (and the gate refuses to send it anyway: rule `review-tampered`)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from fedgate.audit.wording import audit_words
from fedgate.gate.entries import CLAIMED_PRIVACY
from fedgate.report.wording import bits_text
from fedgate.review.binding import check_held, describe_payload
from fedgate.review.queue import PENDING, QUEUE_FILE, ReviewError, ReviewItem, ReviewQueue

COOKIE = "fedgate_review"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send `Origin: null` on our own POSTs
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
SAME_SITE_FETCH = ("same-origin", "none")


def find_hospitals(root: Path) -> dict[str, Path]:
    """Hospital folders under `root` that have a review queue (or `root` itself)."""
    root = Path(root)
    if (root / QUEUE_FILE).is_file():
        return {root.name: root}
    return {p.parent.name: p.parent for p in sorted(root.glob(f"*/{QUEUE_FILE}"))}


class ReviewSite:
    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        self.token = token or secrets.token_urlsafe(24)
        self._csrf_key = secrets.token_bytes(32)
        self.templates = Environment(
            loader=PackageLoader("fedgate.review", "templates"), autoescape=select_autoescape(["html"])
        )
        self.templates.filters["bits"] = _bits

    def csrf(self, hospital: str, item_id: int) -> str:
        return hmac.new(self._csrf_key, f"{hospital}/{item_id}".encode(), hashlib.sha256).hexdigest()

    def authorised(self, request: Request) -> bool:
        offered = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
        return bool(offered) and hmac.compare_digest(offered.encode(), self.token.encode())

    def folder(self, hospital: str) -> Path:
        hospitals = find_hospitals(self.root)
        if hospital not in hospitals:
            raise HTTPException(404, f"no hospital {hospital!r} under {self.root}")
        return hospitals[hospital]

    def queue(self, hospital: str) -> ReviewQueue:
        return ReviewQueue(self.folder(hospital))

    def item(self, hospital: str, item_id: int) -> ReviewItem:
        queue = self.queue(hospital)
        try:
            item = queue.get(item_id)
        finally:
            queue.close()
        if item is None:
            raise HTTPException(404, f"no item {item_id} for {hospital}")
        return item

    def all_items(self) -> list[tuple[str, ReviewItem]]:
        items: list[tuple[str, ReviewItem]] = []
        for name, folder in find_hospitals(self.root).items():
            queue = ReviewQueue(folder)
            try:
                items += [(name, item) for item in queue.items()]
            finally:
                queue.close()
        return items

    def render(self, template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(template).render(**context))


def _bits(value: object) -> str:
    """Bits as the report writes them ("7,256 bits ≈ 907 bytes"), from the summary's decimal string."""
    try:
        return bits_text(float(str(value)))
    except ValueError:
        return f"{value} bits"


def _cross_site(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        return True
    fetch_site = request.headers.get("sec-fetch-site")
    return fetch_site is not None and fetch_site not in SAME_SITE_FETCH


def create_app(root: Path, token: str | None = None) -> tuple[FastAPI, ReviewSite]:
    site = ReviewSite(root, token)
    app = FastAPI(title="fedgate review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        response = await _guarded(request, call_next)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _guarded(request: Request, call_next: Any) -> Response:
        offered = request.query_params.get("token")
        if offered is not None and hmac.compare_digest(offered.encode(), site.token.encode()):
            redirect = RedirectResponse(request.url.path, status_code=303)  # the token leaves the address bar
            redirect.set_cookie(COOKIE, site.token, httponly=True, samesite="strict")
            return redirect
        if not site.authorised(request):
            return HTMLResponse("<h1>401: open the link with the token printed by `fedgate review`</h1>", 401)
        if request.method != "GET" and _cross_site(request):
            return HTMLResponse("<h1>403: cross-site request refused</h1>", 403)
        response: Response = await call_next(request)
        return response

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        items = site.all_items()
        pending = [(h, i) for h, i in items if i.status == PENDING]
        decided = [(h, i) for h, i in items if i.status != PENDING][:50]
        return site.render("index.html", pending=pending, decided=decided, root=str(site.root))

    @app.get("/items/{hospital}/{item_id}", response_class=HTMLResponse)
    def item_page(hospital: str, item_id: int) -> HTMLResponse:
        item = site.item(hospital, item_id)
        held = check_held(site.folder(hospital), item)
        return site.render(
            "item.html",
            hospital=hospital,
            item=item,
            s=item.summary,
            held=held,
            view=describe_payload(item.payload),
            norms={t.get("name"): t.get("update_l2") for t in item.summary.get("tensors", [])},
            audit=audit_words(item.summary.get("decision", {})),
            claimed=CLAIMED_PRIVACY,
            csrf=site.csrf(hospital, item_id),
        )

    @app.post("/items/{hospital}/{item_id}/decision")
    def decide(
        hospital: str,
        item_id: int,
        action: Annotated[str, Form()],
        reviewer: Annotated[str, Form()],
        csrf: Annotated[str, Form()],
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        if not hmac.compare_digest(csrf, site.csrf(hospital, item_id)):
            raise HTTPException(403, "bad CSRF token: reload the page and try again")
        if action not in ("approve", "reject"):
            raise HTTPException(400, "action must be approve or reject")
        if action == "approve":
            held = check_held(site.folder(hospital), site.item(hospital, item_id))
            if not held.approvable:
                raise HTTPException(409, f"this payload is not one the gate held ({held.status}): reject it")
        queue = site.queue(hospital)
        try:
            queue.decide(item_id, action == "approve", reviewer, reason)
        except ReviewError as err:
            raise HTTPException(409, str(err)) from err
        finally:
            queue.close()
        return RedirectResponse("/", status_code=303)

    return app, site

"""The live state-machine gallery page on the admin listener: GET /gallery serves the page
(no data in it), GET / redirects there; the page polls /admin/gallery for the data."""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

PAGE_PATH = "/gallery"
PAGE_FILE = "gallery_page.html"
# Inline CSS and JS only, fetches to this origin only: the page loads nothing from elsewhere,
# and app-controlled strings it shows cannot pull in a script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_html() -> bytes:
    """The page as shipped in the package (package data next to this module)."""
    return files(__package__).joinpath(PAGE_FILE).read_bytes()


def add_gallery_page(app: web.Application) -> None:
    """Add GET /gallery and GET / (a redirect) to the admin app."""
    # Read once at start: a package installed without its page fails here, not per request.
    body = page_html()

    async def gallery(_: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
        )

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPSeeOther(PAGE_PATH, headers={"Cache-Control": "no-store"})

    app.router.add_get(PAGE_PATH, gallery)
    app.router.add_get("/", root)

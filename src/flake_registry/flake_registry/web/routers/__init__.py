"""The web app's areas, one router module each, in the order of the navigation bar.

A module holds ``router`` (a FastAPI APIRouter) and ``NAV`` (a NavEntry for the
navigation bar, or None). A new page is a new module here and one line in AREAS; the
app includes every area's router and lists every NAV entry.
"""

from __future__ import annotations

from flake_registry.web.routers import (
    api_docs,
    auth,
    chipmap,
    defects,
    downloads,
    flakes,
    labels,
    stacks,
    static,
)

AREAS = (chipmap, flakes, labels, stacks, defects, downloads, auth, api_docs, static)

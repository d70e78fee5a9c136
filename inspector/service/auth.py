"""Bearer-token auth for the routes that score and reload.

Why: a scoring service on the plant network must not let anyone who can reach it score or reload the model; probes
(``/healthz``, ``/readyz``) and Prometheus scraping (``/metrics``) stay open. The token is compared in constant
time; with no token configured, auth is off (``inspector serve`` warns when that is so off localhost).
"""

import hmac

from fastapi import HTTPException, Request

from inspector.service.dependencies import Settings


def require_token(request: Request, settings: Settings) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (when a token is configured)."""
    token = settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

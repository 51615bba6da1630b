"""Add a middleware inside all of an app's others, even once the app has built its stack."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware


def add_innermost_middleware(app: FastAPI, cls: type, options: dict[str, Any]) -> None:
    """Add `cls(app, **options)` inside all of the app's middleware (add_middleware would put
    it outside): vLLM's API-key check answers first, and CORS headers go on its answers."""
    if app.middleware_stack is None:
        app.user_middleware.append(Middleware(cls, **options))
        return
    # vLLM's app has built its stack already, and rebuilding it would instantiate vLLM's
    # middleware twice (its metrics one registers its metrics again): the new one goes in above
    # the stack's exception middleware, the innermost, each middleware keeping the next as .app.
    outer = app.middleware_stack
    while not isinstance(getattr(outer, "app", None), ExceptionMiddleware):
        outer = getattr(outer, "app", None)
        if outer is None:  # not the stack Starlette builds: outside it all, as add_middleware
            app.middleware_stack = cls(app.middleware_stack, **options)
            return
    outer.app = cls(outer.app, **options)

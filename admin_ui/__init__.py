"""Admin pages: server-rendered, basic auth, CSRF-protected forms, no JavaScript needed."""

from admin_ui.routes import admin_app

__all__ = ["admin_app"]

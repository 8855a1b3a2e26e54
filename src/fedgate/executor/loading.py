"""Resolve `MODULE:ATTR` references to Flower apps, with errors a user can act on."""

from __future__ import annotations

import importlib
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedgate.errors import AppLoadError


def _resolve(reference: str, what: str) -> Any:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"{what} {reference!r} must look like MODULE:ATTR, e.g. fedgate_medical.client_app:app")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of foreign code is the user's to fix
        raise AppLoadError(f"cannot import module {module_name!r} for the {what}: {type(err).__name__}: {err}") from err
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise AppLoadError(f"module {module_name!r} has no attribute {attr!r} (the {what})") from err
    return obj


def load_client_app(reference: str) -> ClientApp:
    app = _resolve(reference, "client app")
    if not isinstance(app, ClientApp):
        raise AppLoadError(f"{reference} is a {type(app).__name__}, not a flwr.clientapp.ClientApp")
    return app


def load_server_app(reference: str) -> ServerApp:
    app = _resolve(reference, "server app")
    if not isinstance(app, ServerApp):
        raise AppLoadError(f"{reference} is a {type(app).__name__}, not a flwr.serverapp.ServerApp")
    return app

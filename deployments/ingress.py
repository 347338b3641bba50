"""The OpenAI ingress of Ray Serve LLM plus kvhead's own routes, on one FastAPI app.

Everything OpenAI (chat, completions, models, streaming, errors in OpenAI's JSON shape) is
``ray.serve.llm``'s :class:`OpenAiIngress`; this subclass adds what only kvhead knows and what an
operator's load balancer needs:

- ``GET /health``: 200 when every model has a replica whose engine answers now, else 503: a
  request sent now would be served (Kubernetes readiness, load balancers).
- ``GET /v1/kvhead/heads``: per layer and KV head, dense or stable, the profile's instability,
  device and host pages of the live requests, and the settings (from one replica's worker).
- an overloaded deployment (Serve's queue limit reached) answers 429 instead of 503/500.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException

HEALTH_TIMEOUT_S = 5.0  # a replica that cannot answer a health check this fast is not ready


class KvheadIngress(OpenAiIngress):
    """:class:`OpenAiIngress` with kvhead's routes and a 429 for a full queue."""

    def __init__(self, *args: Any, kvhead: dict[str, dict | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kvhead = kvhead  # each model's plugin settings as configured (preset, overrides)

    async def _process_llm_request(self, body: Any, call_method: str, raw_request=None):
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except BackPressureError as err:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"the server is at its request limit; retry later ({err})",
            ) from None

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        """Refuse messages without a role before vLLM's chat renderer, which raises KeyError on
        them (a 500 found by the schemathesis test); everything else is the parent's."""
        for index, message in enumerate(body.messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role is None and not isinstance(message, dict):
                role = getattr(message, "role", None)
            if not isinstance(role, str):
                raise HTTPException(
                    status.HTTP_400_BAD_REQUEST, f"messages[{index}] has no 'role' string"
                )
        return await super().chat(body, request)

    async def health(self) -> Response:
        """Readiness: every model's deployment has a replica whose engine answers."""
        problems = {}
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any failure means "not ready"
                problems[model_id] = f"{type(err).__name__}: {err}"[:300]
        if problems:
            return JSONResponse(
                {"status": "not ready", "models": problems},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            )
        return JSONResponse({"status": "ready", "models": sorted(self._default_serve_handles)})

    async def heads(self, model: str | None = None) -> Response:
        """Per-head state of one replica of ``model`` (the only model when omitted)."""
        model_id = await self._get_model_id(model)
        handle = self._default_serve_handles[model_id]
        try:
            reports = await handle.collective_rpc.remote("kvhead_heads")
        except Exception as err:
            if "not implemented" in str(err).lower():
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"model {model_id!r} is served without kvhead FlexiCache",
                ) from None
            raise
        return JSONResponse(
            {"model": model_id, "configured": self._kvhead.get(model_id), "workers": reports}
        )


OPENAI_ROUTES = ("models", "model_data", "completions", "chat", "tokenize", "detokenize")
ENDPOINTS = {
    "health": lambda app: app.get("/health"),
    "heads": lambda app: app.get("/v1/kvhead/heads"),
}


async def _openai_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Route-level refusals (unknown model, 429, 503) in OpenAI's error shape, not FastAPI's
    ``{"detail": ...}``, so OpenAI clients raise their typed errors with the message."""
    kinds = {404: "NotFoundError", 429: "RateLimitError", 503: "ServiceUnavailableError"}
    body = {
        "error": {
            "message": str(err.detail),
            "type": kinds.get(err.status_code, "BadRequestError"),
            "param": None,
            "code": err.status_code,
        }
    }
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


def ingress_class() -> type:
    """The Serve ingress class: OpenAI's routes plus :data:`ENDPOINTS`."""
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init

    app = init()
    app.add_exception_handler(StarletteHTTPException, _openai_error)
    # the routes of a text-generation server; embeddings, scores and transcriptions need other
    # model kinds and would only answer errors here
    openai_routes = {name: DEFAULT_ENDPOINTS[name] for name in OPENAI_ROUTES}
    return make_fastapi_ingress(KvheadIngress, endpoint_map=openai_routes | ENDPOINTS, app=app)

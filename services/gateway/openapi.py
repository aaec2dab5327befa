"""The OpenAPI 3.1 description of the gateway's HTTP API."""

from __future__ import annotations

import msgspec

from services.gateway.request_bodies import ChatCompletionRequest, CompletionRequest
from services.gateway.tokenize import DetokenizeRequest, TokenizeRequest


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of the API; request schemas come from the request structs."""
    (completion, chat, tokenize, detokenize), components = msgspec.json.schema_components(
        [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest],
        ref_template="#/components/schemas/{name}")

    def post(summary: str, schema: dict, answer: str = "JSON, or text/event-stream when stream is true") -> dict:
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                         "responses": {"200": {"description": answer},
                                       "400": {"description": "invalid request (OpenAI error body)"},
                                       "401": {"description": "missing or invalid API key"},
                                       "404": {"description": "the model is not served"},
                                       "413": {"description": "body too large"},
                                       "429": {"description": "the admission queue is full (Retry-After)"},
                                       "502": {"description": "an engine failed"},
                                       "503": {"description": "no instance available, or queued too long "
                                                               "without a free slot (Retry-After)"},
                                       "504": {"description": "an engine or the request timed out"}}}}

    def get(summary: str) -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "pdserve gateway", "version": "1"},
        "paths": {
            "/v1/completions": post("Text completion (OpenAI)", completion),
            "/v1/chat/completions": post("Chat completion (OpenAI)", chat),
            "/v1/models": get("Served models"),
            "/v1/instances": get("Registered instances with their load"),
            "/tokenize": post("Token ids of a prompt or chat messages (vLLM)", tokenize,
                              "JSON: count, max_model_len, tokens, token_strs"),
            "/detokenize": post("Text of token ids (vLLM)", detokenize, "JSON: prompt"),
            "/health": get("Process alive"),
            "/ready": get("A serving set of instances is registered (503 otherwise)"),
            "/metrics": get("Prometheus metrics"),
            "/version": get("pdserve's version"),
        },
        "components": {"schemas": components},
    }

"""Instant fake prefill/decode HTTP servers in the style of vLLM and SGLang, for the Rust P/D routers.

``python -m bench.fakes.http_engine --port P --role prefill|decode --style vllm|sglang`` answers
what ``vllm-router --vllm-pd-disaggregation`` and ``sglang-router --pd-disaggregation`` (and a
vLLM-style toy proxy) ask of an engine (``bench/router_compare.py``):

* ``GET /health``, ``/metrics``, ``/v1/models``, SGLang's ``/server_info``, ``/model_info`` (and
  their ``/get_`` forms): fixed answers;
* ``POST /v1/completions`` (and ``/v1/chat/completions``, ``/generate``): a prefill answers one
  token (vLLM: with the ``kv_transfer_params`` a decode needs); a decode answers ``--tokens``
  tokens, as one JSON body or, with ``"stream": true``, one SSE event per token and ``[DONE]``.

Every answer is pre-encoded bytes written at once (HTTP/1.1 keep-alive, a stream chunked), on
uvloop with httptools: what an engine costs here is small next to a router.  The socket is
bound with ``SO_REUSEPORT``, so several fakes may share a port (the kernel spreads connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools
import msgspec

from common.service import new_event_loop

KV_TRANSFER_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [0, 1],
                      "remote_engine_id": "fake-prefill", "remote_request_id": "fake", "remote_host": "127.0.0.1",
                      "remote_port": 1, "tp_size": 1}
MODELS = {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake", "max_model_len": 4096}]}
SERVER_INFO = {"model_path": "fake", "tokenizer_path": "fake", "dp_size": 1, "tp_size": 1,
               "disaggregation_mode": "null", "max_total_num_tokens": 65536}
MODEL_INFO = {"model_path": "fake", "tokenizer_path": "fake", "is_generation": True}


def response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def completion(tokens: int, extra: dict | None = None) -> bytes:
    body = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "text": "a" * tokens, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}, **(extra or {})}
    return response(json.dumps(body).encode())


def stream(tokens: int) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    events = []
    for i in range(tokens):
        chunk = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "text": "a", "logprobs": None,
                              "finish_reason": "length" if i == tokens - 1 else None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


class Answers:
    """The pre-encoded answers of one fake engine."""

    def __init__(self, role: str, style: str, tokens: int):
        infos = {"/server_info": SERVER_INFO, "/get_server_info": SERVER_INFO, "/model_info": MODEL_INFO,
                 "/get_model_info": MODEL_INFO, "/v1/models": MODELS}
        self.get = {path: response(json.dumps(body).encode()) for path, body in infos.items()}
        self.get["/health"] = self.get["/health_generate"] = response(b"", b"text/plain")
        self.get["/metrics"] = response(b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n", b"text/plain")
        if role == "prefill":
            extra = {"kv_transfer_params": KV_TRANSFER_PARAMS} if style == "vllm" else None
            self.plain = self.streamed = completion(1, extra)
        else:
            self.plain, self.streamed = completion(tokens), stream(tokens)
        self.missing = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST":
            return self.streamed if msgspec.json.decode(body).get("stream") else self.plain
        return self.get.get(path.split(b"?")[0].decode(), self.missing)


class FakeHTTPProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection to the fake engine."""

    def __init__(self, answers: Answers):
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.transport.write(self.answers.answer(self.parser.get_method(), self.url, b"".join(self.body)))


async def serve(port: int, answers: Answers) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: FakeHTTPProtocol(answers), "127.0.0.1", port,
                                                              reuse_port=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--style", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--tokens", type=int, default=2, help="tokens of a decode answer (a stream: one event each)")
    args = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.port, Answers(args.role, args.style, args.tokens)))
    finally:
        loop.close()


if __name__ == "__main__":
    main()

"""The cheapest gateways this stack allows, for ``bench.gateway_overhead --gateway http-floor|bus-floor``.

Each runs in the real gateway process (``services.gateway.serve``: the same
uvicorn settings, registry membership, router, engine clients and bus), with the
generation routes replaced by:

* ``http-floor``: parse the request (``openai_protocol``) and answer a canned
  completion of the same size: no engine leg.  The HTTP share of a request (it
  skips Starlette's routing, so it may beat the bare endpoint);
* ``bus-floor``: parse, a prefill leg, a decode leg (``BusClient.request``,
  driven by callbacks, as the real flow is) and the response, and nothing else:
  no disconnect watch, deadline, timeouts, retries, aborts, metrics, request-id
  or model checks, no checks of what the engines answer.

A complete gateway cannot cost less per request than ``bus-floor``, so its rate
against the bare endpoint bounds what any gateway on this stack can reach.

    python -m bench.gateway_floor --variant bus-floor --port 8000 --registry tcp://127.0.0.1:7000
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.bus import FLAG_ITEM
from common.config import from_args
from common.messages import Generate, TokenOutput
from common.service import run_service, setup_logging
from services.cli import build_parser
from services.gateway import openai_protocol as oai
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.request_ids import new_handle
from services.gateway.responses import JSONResponse
from services.gateway.server import serve
from starlette.types import Receive, Scope, Send

CANNED_TEXT = "x" * 16  # the fake engines' 16 tokens are one byte each


class _FloorGateway(Gateway):
    """A gateway whose POSTs go to the subclass's ``generate(req, request_id) -> (text, prompt
    tokens, completion tokens)``; every other route is the real one."""

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            req = oai.parse_completion((await receive())["body"], default_max_tokens=16, max_n=1)
            request_id = new_handle()
            text, prompt_tokens, completion_tokens = await self.generate(req, request_id)
            body = oai.full_response(req, request_id, [oai.full_choice("completion", 0, text, "length", None)],
                                     oai.usage_dict(prompt_tokens, completion_tokens, 0))
            await JSONResponse(body, 200, request_id)(scope, receive, send)
            return
        await super().app(scope, receive, send)


class HTTPFloor(_FloorGateway):
    async def generate(self, req: oai.ParsedRequest, request_id: str) -> tuple[str, int, int]:
        return CANNED_TEXT, len((req.prompts[0].text or "").encode()), len(CANNED_TEXT)


class BusFloor(_FloorGateway):
    async def generate(self, req: oai.ParsedRequest, request_id: str) -> tuple[str, int, int]:
        done = asyncio.get_running_loop().create_future()
        prefill = self.router.pick("prefill", req.model)
        decode = self.router.pick("decode", req.model, like=prefill)
        assert prefill is not None and decode is not None
        prefill_client, decode_client = self.connections.get(prefill), self.connections.get(decode)
        text: list[str] = []
        first: list[TokenOutput] = []
        usage: list[int] = []  # decode's completion tokens

        def on_decode(flag: int, out: TokenOutput | Exception | None) -> None:
            if isinstance(out, Exception):
                done.set_exception(out)
                return
            if out is not None:  # None: the end of the stream (FLAG_END)
                text.append(out.text)
                if out.usage is not None:
                    usage.append(out.usage.completion_tokens)
            if flag != FLAG_ITEM:
                decode_client.forget(decode_req)
                done.set_result(None)

        def on_prefill(flag: int, out: TokenOutput | Exception) -> None:
            nonlocal decode_req
            prefill_client.forget(prefill_req)
            if isinstance(out, Exception):
                done.set_exception(out)
                return
            first.append(out)
            text.append(out.text)
            decode_req = decode_client.request(
                Generate(request_id=request_id, sampling=req.sampling, prompt_token_ids=out.prompt_token_ids,
                         remote_prefill=out.kv_transfer), on_decode)

        decode_req = 0
        prefill_req = prefill_client.request(Generate(request_id=request_id, sampling=req.sampling,
                                                      do_remote_decode=True, **req.prompts[0].generate_fields()),
                                             on_prefill)
        await done
        self.router.done(prefill)
        self.router.done(decode)
        prefill_usage = first[0].usage
        return "".join(text), prefill_usage.prompt_tokens if prefill_usage else 0, usage[-1] if usage else len(text)


VARIANTS = {"http-floor": HTTPFloor, "bus-floor": BusFloor}


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--variant", choices=VARIANTS, required=True)
    ns, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = from_args(GatewayConfig, build_parser("gateway").parse_args(["gateway", *rest]))
    setup_logging(config.log_level)
    sys.exit(run_service(serve(config, gateway_class=VARIANTS[ns.variant])))


if __name__ == "__main__":
    main()

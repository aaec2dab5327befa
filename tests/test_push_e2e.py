"""Push mode (``--kv-mode push``) end to end with real processes: a registry, two prefills, two decodes and a
colocated baseline, demo model on CPU, all of one model.  ``prefill`` serves shared memory and Mooncake TCP;
``decode`` (32-token blocks: the prefills have 16) takes TCP, ``decode-shm`` shared memory (TCP from
``prefill-2``, which serves only that).  Prefills compute
long prompts in chunks of ``CHUNK`` tokens, so each prompt is pushed in several writes.  A gateway in push
mode serves them to the official ``openai`` client.  The tests that kill processes run last.
"""

from __future__ import annotations

import asyncio
import signal

import openai
import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes, free_port
from common.errors import PeerError
from common.messages import Abort, Generate, PushTarget, SamplingParams
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHUNK = 64
PUSH_TIMEOUT_S = 3.0
ENGINE = ("--kv-mode", "push", "--kv-handshake-timeout-s", "3", "--kv-rpc-timeout-s", "3", "--kv-lease-sweep-interval-s",
          "0.2", "--kv-push-timeout-s", str(PUSH_TIMEOUT_S), "--max-num-batched-tokens", str(CHUNK),
          "--progress-interval-s", "0.2")  # fmt: skip
LENGTHS = [1, 15, 16, 17, 100, 300]


class Stack(EngineDriver):
    def __init__(self, procs: Processes, openai_client: openai.AsyncOpenAI, read_openai: openai.AsyncOpenAI):
        super().__init__(procs.engine_endpoints(), timeout_s=60.0)
        self.procs, self.openai = procs, openai_client
        self.read_openai = read_openai  # a gateway forced to --kv-mode read
        self.survivor = "prefill-2"  # the prefill left once the kill test killed one


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", *ENGINE, kv_transport="shm,tcp")
        procs.start_engine("prefill-2", "prefill", *ENGINE)
        procs.start_engine("decode", "decode", *ENGINE, "--block-size", "32")
        # async scheduling, as on a GPU (one step in flight when the pushed KV lands)
        procs.start_engine("decode-shm", "decode", *ENGINE, "--async-scheduling", kv_transport="shm,tcp")
        procs.start_engine("both", "prefill", "--role", "both")
        port, read_port = free_port(), free_port()
        # --kv-mode auto (the default): the gateway follows the push mode the engines advertise
        procs.spawn("gateway", "services.gateway", ["--port", str(port), "--registry", procs.registry_endpoint,
                                                    "--mode", "disagg", "--prefill-timeout-s", "3", "--max-retries",
                                                    "2"])
        procs.spawn("gateway-read", "services.gateway", ["--port", str(read_port), "--registry",
                                                         procs.registry_endpoint, "--mode", "disagg", "--kv-mode",
                                                         "read"])
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=60)
        read_client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{read_port}/v1", api_key="none",
                                         max_retries=0, timeout=60)
        await procs.wait_registered("prefill", "prefill-2", "decode", "decode-shm", "both")

        async def ready() -> bool:
            try:
                return all([(await c.models.list()).data for c in (client, read_client)])
            except openai.APIConnectionError:
                return False

        await eventually(ready, timeout=60, interval=0.1)
        s = Stack(procs, client, read_client)
        try:
            yield s
        finally:
            await client.close()
            await read_client.close()
            await s.close()


async def completion_tokens(client: openai.AsyncOpenAI, ids: list[int], max_tokens: int = 8) -> int:
    """The completion tokens of a greedy completion of the token ids ``ids``."""
    response = await client.completions.create(model="demo", prompt=ids, max_tokens=max_tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
    return response.usage.completion_tokens


async def test_a_gateway_forced_to_read_mode_answers_a_clear_503_before_any_engine_is_asked(stack):
    with pytest.raises(openai.APIStatusError) as failed:
        await completion_tokens(stack.read_openai, prompt_ids(20, seed=7))
    assert failed.value.status_code == 503
    assert "--kv-mode push or auto" in failed.value.message
    assert await completion_tokens(stack.openai, prompt_ids(20, seed=7)) == 8  # the auto gateway serves them


@pytest.mark.parametrize(("decode", "transport"), [("decode", "tcp"), ("decode-shm", "shm")])
async def test_push_greedy_output_identical_to_colocated(stack: Stack, decode: str, transport: str):
    """Every length, 16-token prefill blocks into 32-token (tcp) and 16-token (shm) decode blocks."""
    for length in LENGTHS:
        ids = prompt_ids(length, seed=700 + length)
        pre, dec = await stack.push_pd(f"push-{length}-{transport}", ids, decode=decode)
        assert tokens(pre + dec) == await stack.reference(ids), f"prompt of {length} tokens over {transport}"
        assert pre[-1].timings["kv_bytes"] > 0 and dec[0].timings["kv_transfer_s"] > 0
    assert (await stack.stats("prefill")).kv_transports[decode] == transport
    await stack.wait_idle("prefill", decode)


async def test_openai_completions_through_the_push_gateway_match_colocated(stack: Stack):
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for length in (5, 200):
        ids = prompt_ids(length, seed=900 + length)
        ref = await stack.run("both", Generate(f"ref-text-{length}", sampling, prompt_token_ids=ids))
        expected = "".join(out.text for out in ref)
        response = await stack.openai.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0,
                                                         extra_body={"ignore_eos": True})
        assert response.choices[0].text == expected and response.usage.completion_tokens == 12
        streamed = await stack.openai.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0,
                                                         stream=True, extra_body={"ignore_eos": True})
        assert "".join([chunk.choices[0].text async for chunk in streamed if chunk.choices]) == expected
    # One token: prefill's first token ends the request, and the gateway aborts the waiting decode leg.
    one = await stack.openai.completions.create(model="demo", prompt=ids, max_tokens=1, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    await stack.wait_idle("prefill", "prefill-2", "decode", "decode-shm")


async def running(stack: Stack, name: str) -> bool:
    return (await stack.stats(name)).load.running > 0


LONG_PROMPT = prompt_ids(1500, seed=42)  # 24 chunks of CHUNK tokens: 24 writes
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def pushing(stack: Stack, prefill: str, rid: str, target) -> asyncio.Task:
    return asyncio.create_task(stack.run(prefill, Generate(rid, LONG, prompt_token_ids=LONG_PROMPT,
                                                           do_remote_decode=True, push_to=target)))


async def test_abort_during_push_frees_both_sides(stack: Stack):
    target, decoded = await stack.push_registration("decode", "abort-push", LONG_PROMPT, LONG)
    prefill = pushing(stack, "prefill", "abort-push", target)
    await eventually(lambda: running(stack, "prefill"), timeout=30)
    await stack.client("prefill").call(Abort("abort-push"))
    await stack.client("decode").call(Abort("abort-push"))
    assert (await prefill)[-1].finish_reason in ("abort", "remote_decode")  # the abort may land after the finish
    assert (await decoded)[-1].finish_reason == "abort"
    await stack.wait_idle("prefill", "decode")


async def test_a_write_into_blocks_decode_no_longer_holds_is_refused(stack: Stack):
    ids = prompt_ids(100, seed=7)
    target, decoded = await stack.push_registration("decode-shm", "freed-push", ids)
    await stack.client("decode-shm").call(Abort("freed-push"))
    assert (await decoded)[-1].finish_reason == "abort"
    await stack.wait_idle("decode-shm")  # its blocks are free: another request may take them
    with pytest.raises(PeerError) as err:
        await stack.run("prefill", Generate("freed-push", LONG, prompt_token_ids=ids, do_remote_decode=True,
                                            push_to=target))
    assert err.value.code == "kv_transfer_failed" and "nothing was written" in err.value.message
    await stack.wait_idle("prefill", "decode-shm")


async def test_a_push_target_that_cannot_be_dialed_is_refused_before_any_socket(stack: Stack):
    target, decoded = await stack.push_registration("decode", "bad-endpoint", prompt_ids(20, seed=9))
    bad = PushTarget(**{**{f: getattr(target, f) for f in target.__struct_fields__}, "kv_endpoint": "tcp://nohost"})
    with pytest.raises(PeerError) as err:
        await stack.run("prefill", Generate("bad-endpoint", LONG, prompt_token_ids=prompt_ids(20, seed=9),
                                            do_remote_decode=True, push_to=bad))
    assert err.value.code == "invalid_request" and err.value.param == "push_to.kv_endpoint"
    await stack.client("decode").call(Abort("bad-endpoint"))
    assert (await decoded)[-1].finish_reason == "abort"
    await stack.wait_idle("prefill", "decode")


async def test_a_push_no_prefill_finishes_expires_and_frees_decodes_blocks(stack: Stack):
    _, decoded = await stack.push_registration("decode", "unpushed", prompt_ids(40, seed=8))
    with pytest.raises(PeerError) as err:
        await decoded
    assert err.value.code == "kv_transfer_failed" and "no prefill pushed" in err.value.message
    await stack.wait_idle("decode")


async def test_prefill_killed_mid_push_the_gateway_retries_on_the_other_prefill(stack: Stack):
    """The gateway's prefill leg fails over to the other prefill with decode's same registration; decode's
    blocks, held meanwhile, get the whole prompt again and the output is the colocated one."""
    ref = await stack.run("both", Generate("ref-killed", LONG, prompt_token_ids=LONG_PROMPT))
    response = asyncio.create_task(stack.openai.completions.create(
        model="demo", prompt=LONG_PROMPT, max_tokens=LONG.max_tokens, temperature=0, extra_body={"ignore_eos": True}))
    prefills = ["prefill", "prefill-2"]

    victims: list[str] = []

    async def one_is_pushing() -> bool:
        for name in prefills:
            if await running(stack, name):
                victims.append(name)
                return True
        return False

    await eventually(one_is_pushing, timeout=30)
    victim = victims[0]
    stack.procs.procs[victim].signal(signal.SIGKILL)
    assert (await response).choices[0].text == "".join(out.text for out in ref)
    prefills.remove(victim)
    stack.survivor = prefills[0]
    await stack.wait_idle(stack.survivor, "decode", "decode-shm")


async def test_decode_killed_prefill_stops_pushing_and_frees_everything(stack: Stack):
    target, decoded = await stack.push_registration("decode-shm", "orphan-push", LONG_PROMPT, LONG)
    stack.procs.procs["decode-shm"].signal(signal.SIGKILL)
    await asyncio.gather(decoded, return_exceptions=True)
    with pytest.raises(PeerError) as err:
        await pushing(stack, stack.survivor, "orphan-push", target)
    assert err.value.code == "kv_transfer_failed"
    await stack.wait_idle(stack.survivor)

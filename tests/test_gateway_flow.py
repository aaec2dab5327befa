"""The read-mode flow under faults: retries, dead or stalled engines, disconnects, registry restarts.

Real registry, real gateway, fake engines over the real bus (``bench/fakes/``);
leaks are checked the way an operator would, through ``/metrics`` gauges fed by heartbeats.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import msgspec
import pytest

from bench.fakes import FakeCluster, fingerprint
from common.bus import MAX_BATCH_RECORDS
from common.errors import PeerGone
from common.messages import Capacity, Instance, Load
from services.gateway.errors import APIError
from services.gateway.router import Router
from tests.procs import eventually

MODEL = "fake"
FAST = {"prefill_timeout_s": 2.0, "decode_first_token_timeout_s": 5.0, "stream_idle_timeout_s": 0.5,
        "abort_timeout_s": 1.0}


def body(prompt: str = "hello", max_tokens: int = 5, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


async def gauges(h: httpx.AsyncClient, name: str) -> dict[str, float]:
    """``pdserve_instance_<name>`` per instance id, from /metrics."""
    text = (await h.get("/metrics")).text
    pattern = re.compile(rf'^pdserve_instance_{name}{{instance="([^"]+)",role="[^"]+"}} (\S+)$', re.M)
    return {m.group(1): float(m.group(2)) for m in pattern.finditer(text)}


async def all_idle(h: httpx.AsyncClient, cluster: FakeCluster) -> bool:
    """Every instance's heartbeat gauges say: nothing used, nothing pinned (and the engines agree)."""
    used, pinned = await gauges(h, "kv_blocks_used"), await gauges(h, "kv_blocks_pinned")
    ids = {e.id for e in cluster.engines}
    return (ids <= set(used) and all(used[i] == 0 and pinned[i] == 0 for i in ids)
            and all(e.load().kv_blocks_used == 0 for e in cluster.engines))


async def sse_events(r: httpx.Response):
    buf = b""
    async for chunk in r.aiter_raw():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            yield event.removeprefix(b"data: ")


# --------------------------------------------------------------------------- #
# Prefill failures: retried on another instance
# --------------------------------------------------------------------------- #


async def test_prefill_killed_with_20_requests_in_flight_all_complete():
    async with FakeCluster(prefill=2, decode=1, prefill_delay_s=0.4, gateway=FAST) as c:
        victim = c.of("prefill")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=15) as h:
            tasks = [asyncio.create_task(h.post("/v1/completions", json=body(f"p{i}", 4))) for i in range(20)]
            await eventually(lambda: _true(len(victim.running) > 0))
            await victim.kill()
            results = await asyncio.gather(*tasks)
            assert [r.status_code for r in results] == [200] * 20
            assert all(r.json()["usage"]["completion_tokens"] == 4 for r in results)
            survivor = c.of("prefill")[1]
            retried = {g.request_id for g in victim.received} & {g.request_id for g in survivor.received}
            assert retried, "some requests must have been retried on the surviving prefill"
            assert "pdserve_gateway_leg_retries_total{role=\"prefill\"}" in (await h.get("/metrics")).text


async def _true(value: bool) -> bool:
    return value


def aborted_all(*engines) -> bool:
    """Every request each engine received was aborted there (engines see handles, not the client's label)."""
    return all(e.received and {g.request_id for g in e.received} <= set(e.aborts) for e in engines)


async def test_hung_prefill_times_out_is_aborted_and_the_request_retried():
    async with FakeCluster(prefill=2, decode=1, gateway={**FAST, "prefill_timeout_s": 0.5,
                                                          "prefill_policy": "round_robin"}) as c:
        hung, good = c.of("prefill")
        hung.faults.stall_after = 0
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            results = await asyncio.gather(*(h.post("/v1/completions", json=body(f"h{i}", 3)) for i in range(4)))
            assert [r.status_code for r in results] == [200] * 4
            assert hung.received and set(hung.aborts) == {g.request_id for g in hung.received}
            await eventually(lambda: all_idle(h, c))


async def test_prefills_all_failing_give_503_after_bounded_retries():
    async with FakeCluster(prefill=3, decode=1, gateway={**FAST, "max_retries": 1}) as c:
        for p in c.of("prefill"):
            p.faults.fail_code = "overloaded"
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            r = await h.post("/v1/completions", json=body())
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert sum(len(p.received) for p in c.of("prefill")) == 2  # first try + max_retries


async def test_no_instance_of_a_needed_role_is_503_fast():
    async with FakeCluster(prefill=1, decode=0, gateway={**FAST, "mode": "disagg"}) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            start = time.monotonic()
            r = await h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
            assert time.monotonic() - start < 1.0
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "no_instance" and "decode" in r.json()["error"]["message"]
            assert (await h.get("/ready")).status_code == 503
            await c.add_engine("decode")
            await eventually(lambda: _status_is(h, "/ready", 200))
            assert (await h.post("/v1/completions", json=body())).status_code == 200


async def _status_is(h: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await h.get(path)).status_code == status


# --------------------------------------------------------------------------- #
# Decode failures after the first token
# --------------------------------------------------------------------------- #


async def test_decode_stalling_mid_stream_ends_the_stream_with_an_error_within_the_idle_timeout():
    async with FakeCluster(prefill=1, decode=1, gateway=FAST) as c:
        decode = c.of("decode")[0]
        decode.faults.stall_after = 2
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            async with h.stream("POST", "/v1/completions", json=body("stall", 20, stream=True)) as r:
                assert r.status_code == 200
                events, times = [], []
                async for e in sse_events(r):
                    events.append(e)
                    times.append(time.monotonic())
            assert events[-1] == b"[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "upstream_timeout" and error["type"] == "timeout_error"
            texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
            assert len(texts) == 3  # the first token from prefill, two from decode
            assert times[-2] - times[-3] < FAST["stream_idle_timeout_s"] + 0.5
            r = await h.post("/v1/completions", json=body("stall", 20))
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
            await eventually(lambda: all_idle(h, c))
            assert len(decode.aborts) == 2


async def test_decode_killed_mid_stream_sends_an_error_event_at_once():
    async with FakeCluster(prefill=1, decode=1, token_delay_s=0.05, gateway=FAST) as c:
        decode = c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            async with h.stream("POST", "/v1/completions", json=body("kill", 200, stream=True)) as r:
                events = []
                async for e in sse_events(r):
                    events.append(e)
                    if len(events) == 3:
                        killed_at = time.monotonic()
                        await decode.kill()
            assert events[-1] == b"[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "upstream_error"  # peer gone, not the idle timeout
            assert time.monotonic() - killed_at < 2.0
            await eventually(lambda: _true(c.of("prefill")[0].load().kv_blocks_used == 0))


async def test_decode_leg_is_retried_only_when_the_instance_never_took_it():
    async with FakeCluster(prefill=1, decode=2, gateway={**FAST, "decode_policy": "round_robin"}) as c:
        refusing, good = c.of("decode")
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            refusing.faults.fail_code = "shutting_down"
            results = await asyncio.gather(*(h.post("/v1/completions", json=body(f"d{i}")) for i in range(4)))
            assert [r.status_code for r in results] == [200] * 4
            assert refusing.received and len(good.received) == 4
            refusing.faults.fail_code = "overloaded"  # a real decode has released prefill's KV by then
            good.faults.fail_code = "overloaded"
            r = await h.post("/v1/completions", json=body("over"))
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            await eventually(lambda: all_idle(h, c))  # prefill's pin was released by the gateway's Abort


# --------------------------------------------------------------------------- #
# Client disconnects: an Abort reaches whoever holds the request
# --------------------------------------------------------------------------- #


async def test_client_disconnect_mid_stream_aborts_decode_and_frees_everything():
    async with FakeCluster(prefill=1, decode=1, token_delay_s=0.05, gateway=FAST) as c:
        decode = c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            await eventually(lambda: all_idle(h, c))
            async with h.stream("POST", "/v1/completions", json=body("bye", 400, stream=True),
                                headers={"X-Request-Id": "gone-1"}) as r:
                n = 0
                async for _ in sse_events(r):
                    n += 1
                    if n == 3:
                        break
            await eventually(lambda: _true(aborted_all(decode)), timeout=5)
            await eventually(lambda: all_idle(h, c), timeout=5)
            assert 'pdserve_gateway_requests_total{endpoint="/v1/completions",status="499"} 1.0' in \
                (await h.get("/metrics")).text


async def test_disconnect_while_decode_reads_the_kv_releases_prefill_pin_and_ttft_skips_the_transfer():
    transfer_s = 3.0
    async with FakeCluster(prefill=1, decode=1, transfer_delay_s=transfer_s, gateway=FAST) as c:
        prefill, decode = c.of("prefill")[0], c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            start = time.monotonic()
            async with h.stream("POST", "/v1/completions", json=body("pinned", 50, stream=True),
                                headers={"X-Request-Id": "gone-2"}) as r:
                events = sse_events(r)  # held: a generator dropped after one event would close the stream
                first = await anext(events)
                ttft = time.monotonic() - start
                # the client leaves while decode reads (before the decode leg goes out, nothing would reach decode)
                await eventually(lambda: _true(bool(decode.received)), timeout=2)
                await events.aclose()
            assert json.loads(first)["choices"][0]["text"]
            assert ttft < transfer_s, "the first token must not wait for the KV transfer"  # (a loaded host: ~0.1 s)
            assert prefill.load().kv_blocks_pinned > 0 or aborted_all(prefill)
            await eventually(lambda: _true(aborted_all(prefill, decode)), timeout=2)
            await eventually(lambda: all_idle(h, c), timeout=2)  # well before the 30 s lease


async def test_client_disconnect_during_prefill_non_streaming_aborts_prefill():
    async with FakeCluster(prefill=1, decode=1, prefill_delay_s=3.0, gateway={**FAST, "prefill_timeout_s": 10}) as c:
        prefill, decode = c.of("prefill")[0], c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=0.3) as h:
            with pytest.raises(httpx.ReadTimeout):
                await h.post("/v1/completions", json=body("slow"), headers={"X-Request-Id": "gone-3"})
        await eventually(lambda: _true(aborted_all(prefill) and not prefill.running), timeout=2)
        assert not decode.received
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            await eventually(lambda: all_idle(h, c))


# --------------------------------------------------------------------------- #
# Membership: expiry and registry restarts
# --------------------------------------------------------------------------- #


async def test_expired_decode_gets_no_requests():
    async with FakeCluster(prefill=1, decode=2, lease_ttl_s=0.6, gateway={**FAST, "failure_cooldown_s": 0,
                                                                          "decode_policy": "round_robin"}) as c:
        dead, alive = c.of("decode")
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            await dead.kill()

            async def gone() -> bool:
                ids = [i["id"] for i in (await h.get("/v1/instances")).json()["data"]]
                return dead.id not in ids

            await eventually(gone, timeout=3)
            assert dead.id not in await gauges(h, "running")
            before = len(dead.received)
            results = await asyncio.gather(*(h.post("/v1/completions", json=body(f"e{i}")) for i in range(6)))
            assert [r.status_code for r in results] == [200] * 6
            assert len(dead.received) == before and len(alive.received) >= 6


async def test_registry_restart_serving_continues_and_membership_recovers():
    async with FakeCluster(prefill=1, decode=1, gateway=FAST) as c:
        bind = c.registry_config.bind
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            await c.stop_registry()
            results = await asyncio.gather(*(h.post("/v1/completions", json=body(f"r{i}")) for i in range(4)))
            assert [r.status_code for r in results] == [200] * 4
            await asyncio.sleep(0.2)
            await c.start_registry(bind)
            newcomer = await c.add_engine("prefill")

            async def recovered() -> bool:
                ids = {i["id"] for i in (await h.get("/v1/instances")).json()["data"]}
                return ids == {e.id for e in c.engines}

            await eventually(recovered, timeout=5)
            assert newcomer.id in await gauges(h, "kv_blocks_total")
            results = await asyncio.gather(*(h.post("/v1/completions", json=body(f"s{i}")) for i in range(4)))
            assert [r.status_code for r in results] == [200] * 4


# --------------------------------------------------------------------------- #
# Router policies (pure)
# --------------------------------------------------------------------------- #


def inst(id: str, role: str, *, waiting: int = 0, used: int = 0, block_size: int = 4, model: str = MODEL) -> Instance:
    return Instance(id=id, role=role, request_endpoint=f"tcp://127.0.0.1:1/{id}", kv_endpoint="tcp://127.0.0.1:2",
                    model=model, fingerprint=fingerprint(model, block_size),
                    capacity=Capacity(max_num_seqs=8, num_kv_blocks=100, max_model_len=512),
                    load=Load(waiting=waiting, kv_blocks_used=used, kv_blocks_total=100))


def members(*instances: Instance) -> dict[str, Instance]:
    return {i.id: i for i in instances}


async def test_round_robin_counters_are_per_role():
    r = Router(members(inst("p0", "prefill"), inst("p1", "prefill"), inst("d0", "decode"), inst("d1", "decode")),
               prefill_policy="round_robin", decode_policy="round_robin")
    assert [r.pick("prefill", MODEL).id for _ in range(3)] == ["p0", "p1", "p0"]
    assert [r.pick("decode", MODEL).id for _ in range(3)] == ["d0", "d1", "d0"]


async def test_least_loaded_prefers_fewer_waiting_then_more_free_blocks_and_counts_its_own_legs():
    r = Router(members(inst("a", "decode", waiting=2), inst("b", "decode", used=50), inst("c", "decode", used=10)))
    assert r.pick("decode", MODEL).id == "c"  # b and c wait 0; c has more free blocks
    assert r.pick("decode", MODEL).id == "b"  # c now has one leg outstanding from us
    picked = r.pick("decode", MODEL)
    r.done(picked)
    assert picked.id in ("b", "c")


async def test_pick_skips_excluded_incompatible_other_models_and_recently_failed():
    p = inst("p", "prefill")
    r = Router(members(p, inst("d-other-bs", "decode", block_size=6), inst("d", "decode"),
                       inst("d-other-model", "decode", model="other"), inst("d2", "decode")),
               decode_policy="round_robin", failure_cooldown_s=60)
    picks = {r.pick("decode", MODEL, like=p).id for _ in range(4)}
    assert picks == {"d", "d2"}
    r.mark_failed(r.instances["d"], PeerGone("gone"))
    assert {r.pick("decode", MODEL, like=p).id for _ in range(3)} == {"d2"}
    assert r.pick("decode", MODEL, like=p, exclude=["d2"]).id == "d"  # failed, but the only one left
    assert r.pick("decode", MODEL, like=p, exclude=["d", "d2"]) is None
    assert r.mode_for(MODEL) == "disagg"
    assert Router(members(inst("b", "both")), mode="auto").mode_for(MODEL) == "colocated"


async def test_prefill_on_decode_only_while_every_prefill_is_busy_and_decode_has_room():
    r = Router(members(inst("p0", "prefill"), inst("p1", "prefill"), inst("d0", "decode"), inst("d1", "decode")))
    assert not r.prefill_on_decode(MODEL, 0)  # off
    r.pick("prefill", MODEL)
    assert not r.prefill_on_decode(MODEL, 1)  # one prefill instance is still idle
    r.pick("prefill", MODEL)
    assert r.prefill_on_decode(MODEL, 1)
    assert not r.prefill_on_decode(MODEL, 2)  # each has 1 leg; 2 allowed
    r.local_prefills[MODEL] = 2
    assert not r.prefill_on_decode(MODEL, 1)  # one prompt per decode instance already computing
    r.local_prefills[MODEL] = 1
    assert r.prefill_on_decode(MODEL, 1)
    assert not r.prefill_on_decode("other", 1) and not Router(members(inst("d", "decode"))).prefill_on_decode(MODEL, 1)


async def test_conditional_disaggregation_computes_a_burst_on_decode_and_counts_it():
    gateway = {**FAST, "local_prefill_queue": 1}
    async with FakeCluster(prefill=1, decode=1, prefill_delay_s=0.5, gateway=gateway) as c:
        prefill, decode = c.of("prefill")[0], c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=15) as h:
            first = asyncio.create_task(h.post("/v1/completions", json=body("a", 4)))
            await eventually(lambda: _true(len(prefill.running) == 1))
            second = asyncio.create_task(h.post("/v1/completions", json=body("b", 4)))
            await eventually(lambda: _true(len(decode.running) == 1))
            third = asyncio.create_task(h.post("/v1/completions", json=body("c", 4)))  # decode's one slot is taken
            results = await asyncio.gather(first, second, third)
            assert [r.status_code for r in results] == [200] * 3
            assert all(r.json()["usage"]["completion_tokens"] == 4 for r in results)
            on_decode = [g for g in decode.received if g.remote_prefill is None]
            assert [g.prompt for g in on_decode] == ["b"]
            assert sorted(g.prompt for g in prefill.received) == ["a", "c"]
            assert "pdserve_gateway_prefills_on_decode_total 1.0" in (await h.get("/metrics")).text
            await eventually(lambda: all_idle(h, c))


async def test_modes_are_derived_once_per_membership_change_and_a_change_is_seen(monkeypatch):
    instances = members(inst("p", "prefill"), inst("d", "decode"))
    r = Router(instances)
    derived = []
    of = r._of
    monkeypatch.setattr(r, "_of", lambda role, model: derived.append(role) or of(role, model))
    assert [(r.mode_for(MODEL), r.kv_mode_for(MODEL)) for _ in range(2)] == [("disagg", "read")] * 2
    assert derived == ["prefill", "decode", "decode"]  # the second request asked nothing again
    gone = instances.pop("d")
    r.changed("left", gone)
    with pytest.raises(APIError) as e:
        r.mode_for(MODEL)
    assert e.value.status == 503


async def test_a_16_token_block_prefill_is_followed_by_a_32_token_block_decode_it_can_read():
    p16 = inst("p16", "prefill", block_size=16)
    other_heads = inst("d-heads", "decode", block_size=16)
    other_heads.fingerprint = msgspec.structs.replace(other_heads.fingerprint, num_kv_heads=4)
    r = Router(members(p16, inst("d32", "decode", block_size=32), other_heads, inst("d24", "decode", block_size=24)),
               decode_policy="round_robin")
    assert {r.pick("decode", MODEL, like=p16).id for _ in range(4)} == {"d32"}
    assert r.pick("decode", MODEL, like=p16, exclude=["d32"]) is None


async def test_router_follows_the_role_rule_a_both_instance_serves_colocated_only():
    """``common.roles.serves``, router side: a ``both`` instance never takes a P/D leg."""
    both = inst("b", "both")
    r = Router(members(both, inst("p", "prefill")), mode="auto")
    assert r.pick("decode", MODEL) is None and r.pick("prefill", MODEL, exclude=["p"]) is None
    assert r.mode_for(MODEL) == "colocated"  # no decode instance: P/D is not possible, the both one serves
    assert r.pick("both", MODEL) is both
    with pytest.raises(APIError) as err:
        Router(members(both, inst("p", "prefill")), mode="disagg").mode_for(MODEL)
    assert err.value.status == 503 and err.value.code == "no_instance"


async def test_colocated_request_runs_on_the_both_instance_when_pd_is_incomplete():
    async with FakeCluster(prefill=1, decode=0, both=1) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=15) as h:
            r = await h.post("/v1/completions", json=body("colocated", 4))
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            assert not c.of("prefill")[0].received and [g.request_id for g in c.of("both")[0].received] == [
                r.headers["x-request-id"]]


# --------------------------------------------------------------------------- #
# Deadlines, batched outputs, shutdown, the real process
# --------------------------------------------------------------------------- #


async def test_request_timeout_is_504_or_an_error_event_and_aborts_the_legs():
    async with FakeCluster(prefill=1, decode=1, token_delay_s=0.1,
                           gateway={**FAST, "request_timeout_s": 0.5}) as c:
        decode = c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            r = await h.post("/v1/completions", json=body("late", 100), headers={"X-Request-Id": "late-1"})
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            async with h.stream("POST", "/v1/completions", json=body("late", 100, stream=True),
                                headers={"X-Request-Id": "late-2"}) as r:
                events = [e async for e in sse_events(r)]
            assert json.loads(events[-2])["error"]["code"] == "request_timeout" and events[-1] == b"[DONE]"
            await eventually(lambda: _true(len(decode.received) == 2 and aborted_all(decode)))
            await eventually(lambda: all_idle(h, c))


async def test_outputs_carrying_several_tokens():
    async with FakeCluster(prefill=1, decode=1, tokens_per_output=4) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            r = await h.post("/v1/completions", json=body("multi", 10, logprobs=1))
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            # prefill sends the first token alone, decode 4, 4, 1: each token keeps its own text
            assert len(lp["tokens"]) == 10 == r.json()["usage"]["completion_tokens"]
            assert "".join(lp["tokens"]) == choice["text"]
            assert all(set(top) >= {tok} for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
            async with h.stream("POST", "/v1/completions", json=body("multi", 10, stream=True)) as s:
                texts = [json.loads(e)["choices"][0]["text"] for e in [x async for x in sse_events(s)][:-1]]
            assert [len(t) for t in texts] == [1, 4, 4, 1] and "".join(texts) == choice["text"]


async def test_a_stream_whose_end_record_follows_its_last_item_completes():
    """A decode stream of exactly MAX_BATCH_RECORDS outputs fills a bus message, which leaves
    before the handler returns: its end then comes as a separate empty record, not as the last
    item turned final.  Both shapes must end the leg (and the request) the same way."""
    async with FakeCluster(prefill=1, decode=1, tokens_per_output=1) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            for max_tokens in (MAX_BATCH_RECORDS, MAX_BATCH_RECORDS + 1, MAX_BATCH_RECORDS + 2):
                r = await h.post("/v1/completions", json=body("edge", max_tokens))
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == max_tokens
                assert len(r.json()["choices"][0]["text"]) == max_tokens
                assert r.json()["choices"][0]["finish_reason"] == "length"
            await eventually(lambda: all_idle(h, c))


async def test_shutdown_aborts_in_flight_legs():
    cluster = FakeCluster(prefill=1, decode=1, token_delay_s=0.05, gateway={**FAST, "shutdown_timeout_s": 0.5})
    async with cluster as c:
        decode = c.of("decode")[0]
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            async with h.stream("POST", "/v1/completions", json=body("shut", 400, stream=True),
                                headers={"X-Request-Id": "shut-1"}) as r:
                n = 0
                async for _ in sse_events(r):
                    n += 1
                    if n == 3:  # decode is streaming
                        break
                c._gateway.cancel()
                await asyncio.gather(c._gateway, return_exceptions=True)
        assert aborted_all(decode)  # sent before serve() returned
        await eventually(lambda: _true(decode.load().kv_blocks_used == 0 and not decode.running))
        await eventually(lambda: _true(c.of("prefill")[0].load().kv_blocks_used == 0))


async def test_gateway_process_serves_and_exits_cleanly_on_sigterm():
    import signal
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with FakeCluster(prefill=1, decode=1) as c:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", "--port", str(port), "--registry", c.registry_config.bind,
            "--log-level", "warning", stderr=asyncio.subprocess.PIPE)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as h:
                async def ready() -> bool:
                    try:
                        return (await h.get("/ready")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(ready, timeout=20, interval=0.1)
                r = await h.post("/v1/completions", json=body("proc", 4))
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_concurrent_requests_with_one_request_id_both_run():
    """``X-Request-Id`` is a label (as in vLLM): two requests may carry the same one; engines see two handles."""
    async with FakeCluster(prefill=1, decode=1, prefill_delay_s=0.5) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=10) as h:
            first, second = await asyncio.gather(
                h.post("/v1/completions", json=body("same id", 5), headers={"X-Request-Id": "dup-1"}),
                h.post("/v1/completions", json=body("same id", 5), headers={"X-Request-Id": "dup-1"}))
            for r in (first, second):
                assert r.status_code == 200 and r.headers["x-request-id"] == "dup-1"
                assert r.json()["id"] == "cmpl-dup-1"
            handles = {gen.request_id for gen in c.of("prefill")[0].received}
            assert len(handles) == 2 and "dup-1" not in handles
            await eventually(lambda: all_idle(h, c))

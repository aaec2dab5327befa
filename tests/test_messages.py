"""The wire messages: tagged msgpack round trips, unions, and their documentation."""

import inspect
from pathlib import Path

import msgspec
import pytest

import common.messages as m
from common.kv_compat import kv_incompatibilities
from common.engine.kv_cache import KVCache

STRUCTS = [c for _, c in inspect.getmembers(m, inspect.isclass)
           if issubclass(c, msgspec.Struct) and c.__module__ == "common.messages" and c is not m.Message]

FP = m.Fingerprint("demo", "float32", 16, 4, 4, 32, KVCache.LAYOUT, "mooncake")
INSTANCE = m.Instance("p-1", "prefill", "tcp://127.0.0.1:7201", "tcp://127.0.0.1:7301", "demo", FP,
                      m.Capacity(64, 1024, 4096), m.Load(running=2, kv_blocks_total=1024))
PARAMS = m.KVTransferParams("p-1", "tcp://127.0.0.1:7301", "p-1:r1", [3, 4, 9], 40, 17, 1e9,
                            m.TokenLogprob(17, -0.5, [(17, -0.5), (3, -1.25)]))
SAMPLES = [
    m.Register(instance=INSTANCE),
    m.Heartbeat("p-1", m.Load(waiting=3)),
    m.MembershipEvent("expired", INSTANCE),
    m.Generate("r1", m.SamplingParams(max_tokens=5, stop=["\n"]), messages=[m.ChatMessage("user", "hé")],
               remote_prefill=PARAMS),
    m.TokenOutput("r1", [17], "x", finish_reason="remote_decode", kv_transfer=PARAMS,
                  usage=m.Usage(40, 1, 16), timings={"prefill_s": 0.01}),
    m.HandshakeReply("p-1", FP, [
        m.KVRankMemory(rank, rank, 1, "host/boot", "cpu", [m.TransportOffer("shm", "shm", f"shm:h:{rank}", b"\x91"),
                                                           m.TransportOffer("tcp", "mooncake", "127.0.0.1:15001")],
                       m.MemoryRegion(1 << 40, 4096), 512, 8) for rank in range(2)], "incarnation-1"),
    m.RankConnect("tcp", "127.0.0.1:15001", b"\x00"),
    m.RankRead("shm", "shm:h:1", [1 << 40], [1 << 41], [4096]),
    m.RankReadDone([3, 7], 0.25),
    m.ErrorReply("incompatible", "block_size differs", param="block_size"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip_through_the_socket_unions(msg):
    union = next(u for u in (m.RegistryRequest, m.EngineRequest, m.KVRequest, m.RankRequest, m.Reply)
                 if type(msg) in u.__args__)
    wire = msgspec.msgpack.encode(msg)
    assert msgspec.msgpack.decode(wire)["type"] == type(msg).__name__  # tagged by class name
    assert msgspec.msgpack.Decoder(union).decode(wire) == msg


def test_fingerprint_differences_name_the_fields():
    other = msgspec.structs.replace(FP, block_size=32, dtype="bfloat16")
    assert FP.differences(other) == ["dtype", "block_size"]
    assert FP.differences(FP) == []


def test_protocol_doc_lists_every_message():
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    missing = [c.__name__ for c in STRUCTS if f"`{c.__name__}" not in doc]
    assert not missing, f"docs/protocol.md does not describe {missing}"


@pytest.mark.parametrize(
    ("decode", "reasons"),
    [(dict(block_size=32), {}), (dict(block_size=8), {}), (dict(block_size=64, transfer_backend="mooncake"), {}),
     (dict(block_size=24), {"block_size": "block_size: prefill 16 and decode 24 differ and are not both powers "
                                          "of two"}),
     (dict(head_dim=64, num_kv_heads=8), {"num_kv_heads": "num_kv_heads: prefill 4, decode 8",
                                          "head_dim": "head_dim: prefill 32, decode 64"}),
     (dict(model="other", dtype="bfloat16", num_layers=2),
      {"model": "model: prefill 'demo', decode 'other'", "dtype": "dtype: prefill 'float32', decode 'bfloat16'",
       "num_layers": "num_layers: prefill 4, decode 2"})],
)
def test_kv_incompatibilities_allow_power_of_two_block_sizes_only(decode, reasons):
    assert kv_incompatibilities(FP, msgspec.structs.replace(FP, **decode)) == reasons


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "reason"),
    [(1, 2, None), (2, 1, None), (2, 2, None), (4, 2, None), (1, 8, None),
     (3, 2, "prefill TP 3 and decode TP 2: neither divides the other"),
     (2, 3, "prefill TP 2 and decode TP 3: neither divides the other")],
)
def test_kv_incompatibilities_allow_tp_sizes_where_one_divides_the_other(prefill_tp, decode_tp, reason):
    prefill = msgspec.structs.replace(FP, tensor_parallel_size=prefill_tp)
    decode = msgspec.structs.replace(FP, tensor_parallel_size=decode_tp, block_size=32)
    expected = {} if reason is None else {"tensor_parallel_size": reason}
    assert kv_incompatibilities(prefill, decode) == expected


def test_transfer_params_carry_the_prefill_block_size_and_default_to_zero():
    old = m.KVTransferParams("p", "tcp://h:1", "t", [1, 2], 20, 7, 1.5e9)
    assert old.block_size == 0  # an older sender: the decode's own block size
    new = msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.structs.replace(old, block_size=32)),
                                 type=m.KVTransferParams)
    assert new.block_size == 32

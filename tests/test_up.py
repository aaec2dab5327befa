"""``pdserve up``'s configuration and GPU pinning (the processes themselves: test_up_e2e.py)."""

import asyncio
import json
import socket

import httpx
import pytest

from common.config import ConfigError
from services.up import Stack, UpConfig, assign_gpus, tensor_parallel_size
from tests.test_eval_pd import http_server


def test_engines_of_tp_1_are_pinned_round_robin_to_the_given_gpus():
    config = UpConfig(gpus=[0, 1], prefill=2, decode=1)
    config.validate()
    assert config.engine_gpus() == [[0], [1], [0]]
    assert UpConfig(prefill=2).engine_gpus() == [[], [], []]  # no --gpus: children inherit the environment


def test_each_engine_takes_as_many_consecutive_gpus_as_its_tp_size():
    assert assign_gpus([0, 1, 2, 3], [2, 1, 1]) == [[0, 1], [2], [3]]
    assert assign_gpus([4, 5, 6, 7, 0, 1], [1, 4, 1]) == [[4], [5, 6, 7, 0], [1]]
    assert assign_gpus([3, 2], [1]) == [[3]]  # GPUs left over stay unused
    config = UpConfig(gpus=[0, 1, 2, 3], prefill=1, decode=2, prefill_args="-tp 2")
    config.validate()
    assert config.engine_gpus() == [[0, 1], [2], [3]]


@pytest.mark.parametrize("gpus, sizes", [([0, 1, 2], [2, 1, 1]), ([0, 1], [2, 2]), ([0], [2])])
def test_a_stack_needing_more_gpus_than_listed_is_refused_with_the_numbers(gpus, sizes):
    with pytest.raises(ConfigError, match=rf"--gpus: the engines need {sum(sizes)} GPUs .*lists {len(gpus)}"):
        assign_gpus(gpus, sizes)


def test_a_tp_stack_that_does_not_fit_its_gpus_fails_validation():
    config = UpConfig(gpus=[0, 1, 2], prefill=1, decode=2, decode_args="--tensor-parallel-size=2")
    with pytest.raises(ConfigError, match="need 5 GPUs \\(tensor-parallel sizes 1, 2, 2\\) but --gpus lists 3"):
        config.validate()


@pytest.mark.parametrize("flags, size", [
    ([], 1),
    (["-tp", "2"], 2),
    (["--tensor-parallel-size", "4"], 4),
    (["--tensor-parallel-size=2"], 2),
    (["-tp", "2", "--block-size", "32", "--tensor-parallel-size", "4"], 4),  # the last one wins
    (["--tensor-parallel-size=4", "-tp", "1"], 1),
    (["--kv-transport", "shm", "--role", "both", "-tp", "2", "--served-model-name", "m"], 2),  # others skipped
])
def test_the_tp_size_is_read_from_an_engines_flags_as_the_engine_reads_them(flags, size):
    assert tensor_parallel_size(flags) == size


def test_the_tp_size_falls_back_to_the_environment_the_engine_inherits(monkeypatch):
    monkeypatch.setenv("PDSERVE_TENSOR_PARALLEL_SIZE", "2")
    assert tensor_parallel_size([]) == 2
    assert tensor_parallel_size(["-tp", "1"]) == 1


def test_the_role_flags_win_over_the_flags_for_every_engine_in_the_gpu_plan():
    config = UpConfig(gpus=[0, 1, 2, 3], engine_args="-tp 2", decode_args="-tp 1")
    assert config.engine_gpus() == [[0, 1], [2]]
    colocated = UpConfig(mode="colocated", colocated=2, gpus=[0, 1, 2, 3], engine_args="-tp 2", decode_args="-tp 1")
    assert colocated.engine_gpus() == [[0, 1], [2, 3]]  # role both takes --engine-args only


@pytest.mark.parametrize("config, match", [
    (UpConfig(gpus=[0, 1], decode_args="-tp two"), "--decode-args: .*'two' is not a valid int"),
    (UpConfig(gpus=[0, 1], prefill_args="-tp 0"), "--prefill-args: --tensor-parallel-size: must be"),
    (UpConfig(gpus=[0, 0]), "--gpus: lists a GPU twice"),
])
def test_invalid_engine_flags_or_gpu_lists_are_refused_naming_where(config, match):
    with pytest.raises(ConfigError, match=match):
        config.validate()


@pytest.mark.parametrize("config, flag", [
    (UpConfig(mode="disagg", decode=0), "--decode"),
    (UpConfig(mode="colocated", colocated=0), "--colocated"),
    (UpConfig(port=0), "--port"),
    (UpConfig(shutdown_timeout_s=0), "--shutdown-timeout-s"),
    (UpConfig(gpus=[-1]), "--gpus"),
])
def test_invalid_settings_name_their_flag(config, flag):
    with pytest.raises(ConfigError, match=flag):
        config.validate()


@pytest.mark.parametrize("config, match", [
    (UpConfig(mode="colocated", prefill=2), "--prefill: applies to --mode disagg only"),
    (UpConfig(mode="colocated", decode=0), "--decode: applies to --mode disagg only"),
    (UpConfig(mode="colocated", decode_args="--block-size 32"), "--decode-args: applies to --mode disagg only"),
    (UpConfig(mode="disagg", colocated=2), "--colocated: counts instances of --mode colocated only"),
])
def test_flags_that_do_nothing_in_the_chosen_mode_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        config.validate()


@pytest.mark.parametrize("config, match", [
    (UpConfig(dtype="fp8"), "^--dtype: must be one of auto, float32, float16, bfloat16$"),
    (UpConfig(device="tpu"), "^--device: must be auto, cpu, cuda or cuda:N$"),
    (UpConfig(block_size=3), "^--block-size: must be a power of two$"),
    (UpConfig(engine_args="--num-kv-blocks 8 --bogus 1"), "^--engine-args: unrecognized arguments: --bogus 1$"),
    (UpConfig(decode_args="--dtype fp8"), "^--decode-args: --dtype: must be one of"),
    (UpConfig(gateway_args="--max-n 0"), "^--gateway-args: --max-n: must be >= 1$"),
])
def test_up_refuses_what_a_child_would_refuse_naming_the_flag_and_where_it_came_from(config, match):
    with pytest.raises(ConfigError, match=match):
        config.validate()


def test_the_common_engine_and_gateway_flags_reach_the_children_before_the_extra_flags():
    config = UpConfig(served_model_name="m", max_model_len=512, block_size=32, gpu_memory_utilization=0.5,
                      tensor_parallel_size=2, api_key="k", engine_args="--block-size 64")
    config.validate()
    engine = config.engine_config("decode")
    assert (engine.model_name, engine.max_model_len, engine.gpu_memory_utilization) == ("m", 512, 0.5)
    assert (engine.tensor_parallel_size, engine.block_size) == (2, 64)  # --engine-args come later: they win
    assert config.gateway_config("tcp://127.0.0.1:7100").api_key == "k"


def test_kv_mode_push_reaches_every_engine_and_the_gateway():
    config = UpConfig(kv_mode="push")
    config.validate()
    assert {config.engine_config(role).kv_mode for role in ("prefill", "decode")} == {"push"}
    assert config.gateway_config("tcp://127.0.0.1:7100").kv_mode == "push"
    assert UpConfig().gateway_config("tcp://127.0.0.1:7100").kv_mode == "read"


def test_the_tokenizer_and_chat_template_flags_reach_the_engines(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = UpConfig(tokenizer="/models/tok", chat_template=str(template))
    config.validate()
    engine = config.engine_config("prefill")
    assert (engine.tokenizer, engine.chat_template) == ("/models/tok", str(template))


def test_role_flags_follow_the_flags_for_every_engine():
    stack = Stack(UpConfig(engine_args="--block-size 16 --max-num-seqs 8", prefill_args="--kv-transport shm",
                           decode_args="--block-size 32 --served-model-name 'my model'"))
    prefill, decode, both = (stack.engine_argv(role) for role in ("prefill", "decode", "both"))
    assert prefill[0] == "prefill" and prefill[-2:] == ["--kv-transport", "shm"]
    assert decode[0] == "decode" and decode[-4:] == ["--block-size", "32", "--served-model-name", "my model"]
    assert decode.index("32") > decode.index("16")  # the decode's own flag comes last, so it wins
    assert both[:3] == ["prefill", "--role", "both"] and both[-4:] == ["--block-size", "16", "--max-num-seqs", "8"]


def test_the_registry_port_is_a_free_one_unless_given():
    assert UpConfig().registry_port == 0
    port = Stack(UpConfig()).registry_port
    socket.create_server(("127.0.0.1", port)).close()  # nothing listens on it
    assert Stack(UpConfig(registry_port=7123)).registry == "tcp://127.0.0.1:7123"


def test_ready_needs_this_stacks_own_instance_ids_from_the_gateway():
    """A gateway that answers ``/ready`` and lists instances, but not this stack's ids (another stack on the
    port), is not this stack being ready; this stack's engines count once its gateway lists their ids."""
    stack = Stack(UpConfig(decode=2))

    def joined(ids: list[str]) -> dict[str, str]:
        body = json.dumps({"status": "ready", "data": [{"id": i, "model": "m"} for i in ids]}).encode()
        with http_server(lambda: body) as stack.url:
            return asyncio.run(_joined(stack))

    ours = list(stack.instance_ids.values())
    assert joined(["prefill-0-abcdef", "decode-0-abcdef"]) == {}
    assert joined(ours[:2]) == {"prefill-0": "m", "decode-0": "m"}
    assert joined(ours) == {"prefill-0": "m", "decode-0": "m", "decode-1": "m"}


async def _joined(stack: Stack) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=5) as http:
        return await stack.joined(http)

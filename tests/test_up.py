"""``pdserve up``'s configuration and GPU pinning (the processes themselves: test_up_e2e.py)."""

import pytest

from common.config import ConfigError
from services.up import Stack, UpConfig


def test_engines_are_pinned_round_robin_to_the_given_gpus():
    stack = Stack(UpConfig(gpus=[0, 1]))
    envs = []
    for _ in range(3):
        envs.append(stack.engine_env())
        stack.groups["engines"].append(object())  # what spawn() adds for each engine
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "0"}]
    assert Stack(UpConfig()).engine_env() is None  # no --gpus: children inherit the environment


@pytest.mark.parametrize("config, flag", [
    (UpConfig(mode="disagg", decode=0), "--decode"),
    (UpConfig(mode="colocated", colocated=0), "--colocated"),
    (UpConfig(shutdown_timeout_s=0), "--shutdown-timeout-s"),
    (UpConfig(gpus=[-1]), "--gpus"),
])
def test_invalid_settings_name_their_flag(config, flag):
    with pytest.raises(ConfigError, match=flag):
        config.validate()


def test_counts_of_the_other_mode_do_not_matter():
    UpConfig(mode="colocated", prefill=0, decode=0, colocated=2).validate()
    UpConfig(mode="disagg", colocated=0).validate()


def test_role_flags_follow_the_flags_for_every_engine():
    stack = Stack(UpConfig(engine_args="--block-size 16 --max-num-seqs 8", prefill_args="--kv-transport shm",
                           decode_args="--block-size 32 --served-model-name 'my model'"))
    prefill, decode, both = (stack.engine_argv(role) for role in ("prefill", "decode", "both"))
    assert prefill[0] == "prefill" and prefill[-2:] == ["--kv-transport", "shm"]
    assert decode[0] == "decode" and decode[-4:] == ["--block-size", "32", "--served-model-name", "my model"]
    assert decode.index("32") > decode.index("16")  # the decode's own flag comes last, so it wins
    assert both[:3] == ["prefill", "--role", "both"] and both[-4:] == ["--block-size", "16", "--max-num-seqs", "8"]

"""``pdserve up``'s configuration and GPU pinning (the processes themselves: test_up_e2e.py)."""

import pytest

from common.config import ConfigError
from services.up import Stack, UpConfig, assign_gpus, tensor_parallel_size


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
    (UpConfig(gpus=[0, 1], decode_args="-tp two"), "--engine-args/--decode-args: .*'two' is not a valid int"),
    (UpConfig(gpus=[0, 1], prefill_args="-tp 0"), "--engine-args/--prefill-args: --tensor-parallel-size: must be"),
    (UpConfig(gpus=[0, 0]), "--gpus: lists a GPU twice"),
])
def test_invalid_engine_flags_or_gpu_lists_are_refused_naming_where(config, match):
    with pytest.raises(ConfigError, match=match):
        config.validate()


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

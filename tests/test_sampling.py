import torch

from common.engine.sampler import Sampler
from common.messages import SamplingParams

CPU = torch.device("cpu")
VOCAB = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(6)
    tokens, lps = Sampler(0, CPU)(x, [SamplingParams(temperature=0)] * 6, [None] * 6)
    assert tokens == x.argmax(-1).tolist() and lps == [None] * 6


def test_top_k_1_equals_greedy_in_a_mixed_batch():
    x = logits(4, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=1, top_p=0.5)]  # fmt: skip
    tokens, _ = Sampler(0, CPU)(x, params, [None] * 4)
    argmax = x.argmax(-1).tolist()
    assert [tokens[0], tokens[2], tokens[3]] == [argmax[0], argmax[2], argmax[3]]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    sampler = Sampler(0, CPU)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=7)
    steps = [logits(1, seed=100 + i) for i in range(8)]

    def run(batch_size: int, row: int, noise_seed: int) -> list[int]:
        gen = sampler.request_generator(7)
        out = []
        for i, step in enumerate(steps):
            x = logits(batch_size, seed=noise_seed + i)
            x[row] = step[0]
            ps = [SamplingParams(temperature=0.9)] * batch_size
            gens: list = [None] * batch_size
            ps[row], gens[row] = params, gen
            out.append(sampler(x, ps, gens)[0][row])
        return out

    alone = run(1, 0, 0)
    assert run(5, 3, 50) == alone
    assert run(3, 1, 90) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_different_seeds_differ():
    sampler = Sampler(0, CPU)
    x = torch.zeros(1, VOCAB)  # uniform: any seed dependence shows
    draws = {
        tuple(sampler(x, [SamplingParams(seed=s)], [gen])[0][0] for _ in range(5))
        for s in range(4)
        for gen in [sampler.request_generator(s)]
    }
    assert len(draws) == 4


def test_top_k_and_top_p_restrict_the_support():
    sampler = Sampler(0, CPU)
    x = logits(1, seed=3).repeat(400, 1)
    order = x[0].argsort(descending=True).tolist()
    tokens, _ = sampler(x, [SamplingParams(temperature=2.0, top_k=3)] * 400, [None] * 400)
    assert set(tokens) <= set(order[:3]) and len(set(tokens)) > 1
    probs = x[0].softmax(-1)[order]
    nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest prefix with mass >= 0.6
    tokens, _ = sampler(x, [SamplingParams(temperature=1.0, top_p=0.6)] * 400, [None] * 400)
    assert set(tokens) <= set(order[:nucleus])
    tokens, _ = sampler(x, [SamplingParams(temperature=1.0)] * 400, [None] * 400)
    assert not set(tokens) <= set(order[:nucleus])  # without top-p the tail is reachable


def test_logprobs_are_raw_log_softmax_and_top_sorted():
    x = logits(3, seed=4)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=3.0, logprobs=0),
              SamplingParams(temperature=0.5)]  # fmt: skip
    tokens, lps = Sampler(0, CPU)(x, params, [None] * 3)
    reference = x.log_softmax(-1)
    for row in (0, 1):
        lp = lps[row]
        assert lp.token_id == tokens[row]
        assert abs(lp.logprob - reference[row, tokens[row]].item()) < 1e-5  # before temperature
    top = lps[0].top
    assert len(top) == 5 and lps[1].top == [] and lps[2] is None
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [t for t, _ in top] == reference[0].topk(5).indices.tolist()
    assert top[0] == (tokens[0], lps[0].logprob)

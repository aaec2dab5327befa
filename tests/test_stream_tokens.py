"""``bench.stream_tokens``: which streamed chunks carry tokens, on the chunks pdserve's gateway and others send."""

import pytest

from bench.stream_tokens import StreamTokens
from common.messages import TokenLogprob
from services.gateway import openai_protocol as oai


def gateway_chunk(kind: str, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    """A content chunk as pdserve's gateway writes it (one per engine output that has tokens or an end)."""
    return {"choices": [oai.chunk_choice(kind, 0, text, finish_reason, logprobs)], "usage": None}


def usage_chunk(completion_tokens: int) -> dict:
    return {"choices": [], "usage": oai.usage_dict(7, completion_tokens, 0)}


def feed(chunks: list[dict]) -> StreamTokens:
    stream = StreamTokens()
    for t, chunk in enumerate(chunks):
        stream.add(chunk, float(t))
    stream.close()
    return stream


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_gateway_tokens_with_empty_text_are_tokens(kind):
    # a pdserve chat stream opens with a role-only chunk, then every chunk carries output, an empty first one too
    opening = [{"choices": [oai.role_chunk_choice(0)], "usage": None}] if kind == "chat" else []
    chunks = [*opening, gateway_chunk(kind, ""), gateway_chunk(kind, "a"), gateway_chunk(kind, ""),
              gateway_chunk(kind, "", finish_reason="length"), usage_chunk(4)]
    stream = feed(chunks)
    assert (stream.output_tokens, stream.source, stream.prompt_tokens) == (4, "usage", 7)
    first = float(len(opening))
    assert stream.times == [first, first + 1, first + 2, first + 3]


def test_role_announcement_and_bare_end_marker_carry_no_token():
    # vLLM / SGLang chat: role first, then one token per chunk, then an empty finish chunk (e.g. a stop string)
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              *[{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]} for _ in range(3)],
              {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]}, usage_chunk(3)]
    stream = feed(chunks)
    assert stream.times == [1.0, 2.0, 3.0] and stream.output_tokens == 3


def test_empty_last_chunk_is_a_token_when_usage_counts_it():
    # a final EOS decodes to nothing, but usage counts it
    stream = feed([gateway_chunk("completion", "a"), gateway_chunk("completion", "", "stop"), usage_chunk(2)])
    assert stream.times == [0.0, 1.0] and stream.output_tokens == 2
    only = feed([gateway_chunk("completion", "", "stop"), usage_chunk(1)])
    assert only.times == [0.0] and only.output_tokens == 1


def test_without_usage_tokens_are_counted_from_chunks():
    stream = feed([gateway_chunk("completion", ""), gateway_chunk("completion", "b"),
                   gateway_chunk("completion", "", "stop")])
    assert (stream.output_tokens, stream.source, stream.times) == (2, "chunks", [0.0, 1.0])


def test_reported_token_ids_and_logprobs_give_exact_counts():
    entries = [(TokenLogprob(token_id=i, logprob=-1.0), "") for i in range(3)]
    completion_lp, chat_lp = oai.completion_logprobs(entries, 0), oai.chat_logprobs(entries[:2])
    stream = feed([gateway_chunk("completion", "", logprobs=completion_lp),
                   {"choices": [{"index": 0, "delta": {"content": ""}, "logprobs": chat_lp, "finish_reason": None}]},
                   {"choices": [{"index": 0, "text": "", "token_ids": [5], "finish_reason": "length"}]}])
    assert (stream.output_tokens, stream.source, stream.times) == (6, "chunks", [0.0, 1.0, 2.0])


def test_no_tokens():
    stream = feed([gateway_chunk("completion", "", "stop"), usage_chunk(0)])
    assert (stream.output_tokens, stream.times) == (0, [])
    assert feed([]).output_tokens == 0

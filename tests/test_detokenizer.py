import random

import pytest

from common.engine.detokenizer import Detokenizer
from common.engine.loader import resolve_model_path
from common.engine.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(resolve_model_path("demo"))


def stream(detok: Detokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    """Feed ``ids``; returns the emitted deltas (the last one final) and the stop string that ended it."""
    deltas = []
    for i, token in enumerate(ids):
        matched = detok.append(token)
        deltas.append(detok.take(final=matched is not None or i == len(ids) - 1))
        if matched is not None:
            return deltas, matched
    return deltas, None


def test_multibyte_characters_are_never_split(tok):
    text = "héllo 你好 🙂 world ü"
    prompt = tok.encode("Say:", add_special_tokens=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the byte-level tokenizer splits the characters into byte tokens
    deltas, _ = stream(Detokenizer(tok, prompt, []), ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token ending inside a character emitted nothing
    assert "🙂" in deltas and "你" in deltas


def test_stop_string_spanning_tokens_is_trimmed(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas, matched = stream(Detokenizer(tok, [1], ["n fox", "never"]), ids)
    assert matched == "n fox"
    assert "".join(deltas) == "The quick brow"
    # nothing of the stop string was ever handed out, even before it was complete
    emitted = ""
    for d in deltas:
        emitted += d
        assert "The quick brow".startswith(emitted)


def test_earliest_stop_string_wins_and_holdback_is_released(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas, matched = stream(Detokenizer(tok, [], ["jumps", "quick"]), ids)
    assert matched == "quick" and "".join(deltas) == "The "
    # a tail that looked like a stop string's start is emitted once it no longer can be one
    deltas, matched = stream(Detokenizer(tok, [], ["brownie"]), ids)
    assert matched is None and "".join(deltas) == TEXT
    assert deltas[5:10] == [" ", "", "", "", "brown f"]  # "b".."brown" held back until " f" ruled it out


def test_decode_side_does_not_repeat_the_first_token(tok):
    prompt = tok.encode("Tell me:", add_special_tokens=True)
    ids = tok.encode(" 你好 fox jumps", add_special_tokens=False)
    full, _ = stream(Detokenizer(tok, prompt, []), ids)
    # prefill emitted the text of ids[0]; decode starts from prompt + ids[0]
    decode = Detokenizer(tok, prompt, ["fox"])
    assert decode.append_emitted(ids[0]) is None
    assert decode.take(final=False) == ""
    rest, matched = stream(decode, ids[1:])
    assert matched == "fox"
    assert full[0] + "".join(rest) == " 你好 "
    # a stop string that begins in the first token's text is still matched
    decode = Detokenizer(tok, prompt, [" \u4f60\u597d"])
    decode.append_emitted(ids[0])
    _, matched = stream(decode, ids[1:])
    assert matched == " 你好"


class CountingTokenizer:
    """``tok`` whose ``decode`` calls are counted; ``decode_stream`` only where ``stream`` is set."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.decodes = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decodes += 1
        return self.tok.decode(ids, skip_special_tokens)


class CountingStreamTokenizer(CountingTokenizer):
    def decode_stream(self, context, skip_special_tokens=True):
        return self.tok.decode_stream(context, skip_special_tokens)


def test_decode_stream_gives_the_windows_text_with_no_decode_per_token(tok):
    rng = random.Random(3)
    fast_ones = 0
    for trial in range(20):  # random ids of the byte-level vocab: many end inside a character
        prompt = [rng.randrange(3, 330) for _ in range(rng.randrange(0, 9))]
        ids = [rng.randrange(3, 330) for _ in range(60)]
        stops = [tok.decode(ids[20:22])] if trial % 2 else []
        windows, streamed = CountingTokenizer(tok), CountingStreamTokenizer(tok)
        reference, fast = Detokenizer(windows, prompt, stops), Detokenizer(streamed, prompt, stops)
        assert stream(fast, ids) == stream(reference, ids)
        assert fast.text == reference.text and windows.decodes > 0
        assert streamed.decodes == 0 or fast.stream is None  # a prompt ending inside a character: windows
        fast_ones += fast.stream is not None
    assert fast_ones >= 10


def test_a_refused_stream_falls_back_to_windows(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = Detokenizer(tok, [], [])
    detok.append(ids[0])

    def refuse(token_id):
        raise Exception("Invalid prefix encountered")  # what tokenizers raises

    detok.stream = refuse
    for token in ids[1:]:
        detok.append(token)
    assert detok.stream is None and detok.take(final=True) == TEXT

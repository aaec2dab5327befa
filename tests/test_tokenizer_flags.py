"""``--tokenizer``, ``--chat-template`` and ``--trust-remote-code`` (vLLM's flags) on a real engine process.

The engine serves the demo model with a word-level tokenizer of its own and an inline chat template;
the gateway's ``/tokenize`` (answered by the engine) shows which tokenizer and template it uses.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from tokenizers import Tokenizer, models, pre_tokenizers

from bench.processes import Processes
from common.config import ConfigError
from common.engine.config import EngineConfig
from common.engine.demo_model import ensure_demo_checkpoint
from common.engine.loader import load_tokenizer
from common.engine.model_config import ModelLoadError
from common.engine.tokenizer import read_chat_template
from services.gateway import GatewayConfig, serve
from tests.procs import eventually

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["[UNK]", "hello", "world", "<<", ">>", "Hi"]
TEMPLATE = "{% for m in messages %}<< {{ m.content }} >>{% endfor %}"


def write_word_tokenizer(folder: Path, words: list[str]) -> Path:
    """A directory holding only a word-level ``tokenizer.json`` over ``words``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    """(gateway base URL, the engine process) with ``--tokenizer`` and an inline ``--chat-template``."""
    words = write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS)
    async with Processes() as procs:
        procs.start_registry()
        engine = procs.start_engine("both", "prefill", "--role", "both", "--tokenizer", str(words),
                                    "--chat-template", TEMPLATE, "--trust-remote-code")
        await procs.wait_registered("both")
        started = asyncio.get_running_loop().create_future()
        gateway = asyncio.create_task(serve(GatewayConfig(port=0, registry=procs.registry_endpoint,
                                                          log_level="warning"), started=started.set_result))
        try:
            base = f"http://127.0.0.1:{(await started).port}"
            async with httpx.AsyncClient(base_url=base) as h:
                await eventually(lambda: ready(h), timeout=30)
            yield base, engine
        finally:
            gateway.cancel()
            await asyncio.gather(gateway, return_exceptions=True)


async def ready(h: httpx.AsyncClient) -> bool:
    return (await h.get("/ready")).status_code == 200


@pytest.mark.asyncio(loop_scope="module")
async def test_the_engine_tokenizes_with_the_given_tokenizer_and_chat_template(stack):
    base, engine = stack
    async with httpx.AsyncClient(base_url=base, timeout=30) as h:
        prompt = (await h.post("/tokenize", json={"prompt": "hello world nope"})).json()
        chat = (await h.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})).json()
    assert prompt["tokens"] == [1, 2, 0]
    assert chat["tokens"] == [3, 5, 4]
    assert "--trust-remote-code is ignored" in engine.log_tail(200)


def test_a_chat_template_is_a_file_or_the_template_itself(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert read_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE == read_chat_template(TEMPLATE)
    with pytest.raises(ConfigError, match="--chat-template: 'nosuch.jinja' is neither a file nor a Jinja template"):
        read_chat_template("nosuch.jinja")
    with pytest.raises(ConfigError, match="--chat-template: the template does not compile"):
        read_chat_template("{% for m in messages %}")


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused(tmp_path):
    words = write_word_tokenizer(tmp_path / "big", [f"w{i}" for i in range(1000)])
    config = EngineConfig(tokenizer=str(words))
    with pytest.raises(ModelLoadError, match=r"tokenizer '.*big': 1000 tokens, more than the model's 336"):
        load_tokenizer(config, ensure_demo_checkpoint(), vocab_size=336)


def test_a_missing_chat_template_file_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "services.cli", "prefill", "--chat-template", "nosuch.jinja"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--chat-template: 'nosuch.jinja' is neither a file nor a Jinja template" in out.stderr
    assert "Traceback" not in out.stderr

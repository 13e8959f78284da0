"""Multi-hop question answering over a small shipped corpus: a DSPex *deployed module*.

``MultiHop`` is an ordinary ``dspy.Module``: each hop writes a search query from the
question and the passages found so far, retrieves with a BM25 tool, and a final
predictor answers from everything retrieved. The retriever is not built into
the module: DSPex hands it the tools the program names (``tools=["search_corpus"]``),
so the same ``search_corpus`` serves a ReAct program too.

Deploy it with the workers (docs/modules.md)::

    pip install deploy/examples/multihop
    export DSPEX_MODULES='{"multihop": "dspex_examples.multihop:MultiHop"}'
    export DSPEX_TOOLS='{"search_corpus": "dspex_examples.multihop:search_corpus"}'
    dspex programs put hotpot "question -> answer" --module multihop --tool search_corpus

The same flow as a pipeline (``pipeline.yaml`` beside this package): retrieval is a
stage of its own, the deployed module ``Search`` (no LM), and the query and answer
steps are inline ``Predict`` stages::

    export DSPEX_MODULES='{"multihop": "...:MultiHop", "search": "dspex_examples.multihop:Search"}'
    dspex programs put search "query -> passages: list[str]" --module search --tool search_corpus
    dspex pipelines put multihop deploy/examples/multihop/pipeline.yaml
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import bm25s
import dspy

__all__ = ["Corpus", "MultiHop", "Passage", "Search", "load_corpus", "search_corpus"]

MAX_HOPS = 4
MAX_K = 10


@dataclass(frozen=True)
class Passage:
    """One corpus entry: a stable id, a title and a short text."""

    id: str
    title: str
    text: str

    def render(self) -> str:
        """How the passage reaches the LM: ``Title | text``."""
        return f"{self.title} | {self.text}"


class Corpus:
    """Passages with a BM25 index over title and text (``bm25s``, English stopwords)."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        if not passages:
            raise ValueError("an empty corpus cannot be searched")
        self.passages = tuple(passages)
        self._index = bm25s.BM25()
        self._index.index(self._tokens([p.render() for p in self.passages]), show_progress=False)
        self._lock = threading.Lock()  # retrieval from several worker threads at once

    @staticmethod
    def _tokens(texts: list[str]) -> Any:
        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first (none when nothing matches)."""
        k = max(1, min(k, MAX_K, len(self.passages)))
        with self._lock:
            tokens = self._tokens([query])
            if not tokens.vocab:  # only stopwords or punctuation: nothing to match
                return []
            results, scores = self._index.retrieve(tokens, k=k, show_progress=False)
        return [self.passages[int(i)] for i, s in zip(results[0], scores[0], strict=True) if s > 0]


@functools.cache
def load_corpus() -> Corpus:
    """The corpus shipped with this package (``corpus.jsonl``), indexed once per process."""
    text = resources.files(__package__).joinpath("corpus.jsonl").read_text(encoding="utf-8")
    passages = [Passage(**json.loads(line)) for line in text.splitlines() if line.strip()]
    return Corpus(passages)


def search_corpus(query: str, k: int = 3) -> list[str]:
    """Search the example corpus with BM25; returns up to k passages as 'Title | text'.

    Registered as a DSPex tool (settings ``tools``): a ReAct program can call it, and
    MultiHop receives it as its retriever.
    """
    return [passage.render() for passage in load_corpus().search(query, k)]


def _check_int(name: str, value: object, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an integer from 1 to {most}, got {value!r}")


class Search(dspy.Module):  # type: ignore[misc]
    """Retrieval as a program of its own: ``query -> passages: list[str]``, no LM call.

    A pipeline stage (``pipeline.yaml``) runs it; deterministic, it returns the ``k``
    best passages for the query as 'Title | text' (none when nothing matches).
    ``tools``: DSPex passes the program's tools; the first is the retriever, as for
    :class:`MultiHop`.
    """

    def __init__(self, tools: Sequence[dspy.Tool], k: int = 3) -> None:
        super().__init__()
        if not tools:
            raise ValueError("Search needs a retriever tool (e.g. tools=['search_corpus'])")
        _check_int("k", k, MAX_K)
        self.retrieve = tools[0]
        self.k = k

    def forward(self, query: str) -> dspy.Prediction:
        return dspy.Prediction(passages=list(self.retrieve(query=query, k=self.k)))


class WriteQuery(dspy.Signature):  # type: ignore[misc]
    """Write a short search query that finds the passage needed next to answer the question."""

    question: str = dspy.InputField()
    context: list[str] = dspy.InputField(desc="passages found so far")
    query: str = dspy.OutputField()


class AnswerFromContext(dspy.Signature):  # type: ignore[misc]
    """Answer the question from the passages, in a few words."""

    # passages first: a small completion-style model answers far better after them
    context: list[str] = dspy.InputField(desc="retrieved passages")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class MultiHop(dspy.Module):  # type: ignore[misc]
    """Retrieve in ``hops`` rounds (``k`` passages each), then answer from all of them.

    ``tools``: DSPex passes the program's tools; the first is the retriever, called as
    ``tool(query=..., k=...)`` and returning passages as strings.
    """

    def __init__(self, tools: Sequence[dspy.Tool], hops: int = 2, k: int = 3) -> None:
        super().__init__()
        if not tools:
            raise ValueError("MultiHop needs a retriever tool (e.g. tools=['search_corpus'])")
        _check_int("hops", hops, MAX_HOPS)
        _check_int("k", k, MAX_K)
        self.retrieve = tools[0]
        self.hops = hops
        self.k = k
        self.write_query = [dspy.Predict(WriteQuery) for _ in range(hops)]
        self.answer = dspy.Predict(AnswerFromContext)

    def forward(self, question: str) -> dspy.Prediction:
        context: list[str] = []
        queries: list[str] = []
        for write in self.write_query:
            query = str(write(question=question, context=context).query).strip() or question
            queries.append(query)
            found = self.retrieve(query=query, k=self.k)
            context += [passage for passage in found if passage not in context]
        answer = self.answer(context=context, question=question)
        return dspy.Prediction(answer=answer.answer, queries=queries, context=context)

"""Long inputs built offline: corpus windows and passkey-retrieval prompts.

Two corpora ship with the package. ``licenses``: the FSF license texts in
``kvhead/data/corpus`` (verbatim copies are permitted), about 32k tokens, so 8k windows more
than four apart overlap. ``python-docs``: the Python 3.11 tutorial and FAQ in reST source form
from Debian's python3.11-doc (PSF License, ``kvhead/data/python_docs``), about 117k tokens of
prose and code, room for 14 disjoint 8k windows. A window longer than its corpus wraps around.
Passkey prompts follow the classic retrieval test: a number stated once at a chosen depth inside
repetitive filler, asked for at the end.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Literal

import torch

CORPUS_FILES = (
    "GPL-3.txt",
    "GPL-2.txt",
    "LGPL-2.1.txt",
    "GFDL-1.3.txt",
    "GPL-1.txt",
    "LGPL-3.txt",
    "GFDL-1.2.txt",
)
CORPORA = {"licenses": "corpus", "python-docs": "python_docs"}  # name -> kvhead/data folder
Corpus = Literal["licenses", "python-docs"]
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "\nWhat is the pass key? The pass key is"


@cache
def corpus_text(corpus: str = "licenses") -> str:
    """The corpus as one string: the license files in their fixed order, or every ``.txt`` of
    the python-docs folder by name (FAQ, then tutorial chapters)."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    root = resources.files("kvhead.data") / CORPORA[corpus]
    names = (
        CORPUS_FILES
        if corpus == "licenses"
        else sorted(entry.name for entry in root.iterdir() if entry.name.endswith(".txt"))
    )
    return "\n\n".join((root / name).read_text(encoding="utf-8") for name in names)


@cache
def _corpus_ids(tokenizer, corpus: str) -> torch.Tensor:
    return torch.tensor(
        tokenizer(corpus_text(corpus), add_special_tokens=False, verbose=False)["input_ids"]
    )


def corpus_window(
    tokenizer, num_tokens: int, offset: int = 0, corpus: str = "licenses"
) -> torch.Tensor:
    """``num_tokens`` consecutive corpus tokens starting at ``offset`` (wrapping around)."""
    ids = _corpus_ids(tokenizer, corpus)
    index = (torch.arange(num_tokens) + offset) % ids.numel()
    return ids[index]


def passkey_prompt(tokenizer, num_tokens: int, depth: float, passkey: int) -> torch.Tensor:
    """About ``num_tokens`` tokens of filler with the passkey stated at ``depth`` in [0, 1]."""
    if not 0 <= depth <= 1:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    needle = encode(f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n")
    question = encode(QUESTION)
    filler = encode(FILLER)
    budget = num_tokens - len(needle) - len(question)
    if budget <= 0:
        raise ValueError(f"{num_tokens} tokens cannot hold a passkey prompt")
    hay = (filler * (budget // len(filler) + 1))[:budget]
    cut = int(depth * budget)
    cut -= cut % len(filler)  # keep the needle between whole filler sentences
    return torch.tensor(hay[:cut] + needle + hay[cut:] + question)

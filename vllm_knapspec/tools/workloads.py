"""Benchmark workloads from text every Python installation carries (no downloads).

* code: continuation of Python standard-library sources (`inspect.getsource(module)`): the prompt is the first
  L tokens of the module, the model goes on writing it;
* prose: summarisation of the Python language reference (`pydoc_data.topics`): a chat-template request
  "Summarize the following text:\n\n<text>" whose text is cut so the whole prompt is exactly L tokens.

* mixed (`knapspec-bench --workload mixed`): half the requests copy from their prompt (a chat request to repeat
  or edit a piece of stdlib code, returning it in full), half write free prose from a one-line chat request; even
  prompt indices copy, odd ones write, so a wave of 4 holds 2 of each.

Prompts are token-id lists, truncated with the model's own tokenizer, so a "2048" prompt is 2048 tokens (mixed:
a copy prompt is at most `length` tokens, cut at a line end; a prose prompt is its one-line request).
Prompt i alternates code (even i) and prose (odd i); document i is the same at every context length, so
shorter prompts are prefixes of longer ones (code) or share all but the last few tokens (prose).
No vLLM imports; the tokenizer is anything with `__call__(text, add_special_tokens=False)["input_ids"]`
(and `apply_chat_template` for the prose template; a plain "Summarize ..." prefix is used without one).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

# Large, stable stdlib modules (>= 40k characters of source: >= ~9k tokens), in the order prompts use them.
CODE_MODULES = (
    "typing",
    "argparse",
    "inspect",
    "subprocess",
    "logging",
    "enum",
    "tarfile",
    "zipfile",
    "difflib",
    "asyncio.base_events",
    "pickle",
    "threading",
    "unittest.case",
    "http.client",
    "shutil",
    "configparser",
    "collections",
    "dataclasses",
    "pathlib",
    "statistics",
)
MAX_PROMPTS = 2 * len(CODE_MODULES)  # distinct prompts per context: a code and a prose prompt per module
CALIBRATION_MODULE = "calendar"  # the static baseline's calibration prompt: not among CODE_MODULES
PROSE_INSTRUCTION = "Summarize the following text:\n\n"
PLACEHOLDER = "@@KNAPSPEC_TEXT@@"


@dataclass(frozen=True)
class Prompt:
    kind: str  # "code" | "prose"
    source: str  # module name or first pydoc topic
    token_ids: tuple = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def code_text(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


def prose_text(start: int, min_chars: int = 60_000) -> tuple[str, str]:
    """The language reference's topics in sorted order from topic `start` (wrapping), at least min_chars."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    parts, n, i = [], 0, start % len(keys)
    while n < min_chars:
        t = topics[keys[i % len(keys)]].strip() + "\n\n"
        parts.append(t)
        n += len(t)
        i += 1
    return keys[start % len(keys)], "".join(parts)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prose_template(tok) -> tuple[list[int], list[int]]:
    """Token ids before and after the text of the summarise request (chat template when there is one)."""
    try:
        s = tok.apply_chat_template(
            [{"role": "user", "content": PROSE_INSTRUCTION + PLACEHOLDER}], tokenize=False, add_generation_prompt=True
        )
        head, tail = s.split(PLACEHOLDER)
    except Exception:  # no chat template: a plain completion prompt
        head, tail = PROSE_INSTRUCTION, "\n\nSummary:"
    return _ids(tok, head), _ids(tok, tail)


def code_prompt(tok, module: str, length: int) -> Prompt:
    ids = _ids(tok, code_text(module))
    if len(ids) < length:
        raise ValueError(f"{module}: {len(ids)} tokens of source, {length} needed")
    return Prompt("code", module, tuple(ids[:length]))


def prose_prompt(tok, start: int, length: int) -> Prompt:
    head, tail = prose_template(tok)
    body = length - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"prose prompt of {length} tokens: the template alone is {len(head) + len(tail)}")
    min_chars = 60_000
    while True:
        name, text = prose_text(start, min_chars)
        ids = _ids(tok, text)
        if len(ids) >= body:
            break
        min_chars *= 2
    return Prompt("prose", name, tuple(head + ids[:body] + tail))


def prose_start(j: int) -> int:
    """Topic index where prose document j starts (every 10th topic, wrapping): fixed per document."""
    from pydoc_data.topics import topics

    return (10 * j) % len(topics)


def build_prompts(tok, length: int, count: int) -> list[Prompt]:
    """`count` prompts of exactly `length` tokens: code, prose, code, prose, ..."""
    out = []
    for i in range(count):
        j = i // 2
        if i % 2 == 0:
            if j >= len(CODE_MODULES):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per context")
            out.append(code_prompt(tok, CODE_MODULES[j], length))
        else:
            out.append(prose_prompt(tok, prose_start(j), length))
    return out


def calibration_prompts(tok, length: int = 512) -> list[Prompt]:
    """The static baseline's offline calibration: one code and one prose prompt not used by the benchmark."""
    return [code_prompt(tok, CALIBRATION_MODULE, length), prose_prompt(tok, 5, length)]


# The mixed workload: requests that copy from their prompt (edit or repeat code) and requests that write freely.
COPY_INSTRUCTIONS = (
    "Repeat the following code exactly.",
    "Add type hints to the following code and return the complete code.",
    "Reformat the following code to follow PEP 8 and return all of it.",
    "Add a docstring to every function in the following code and return the complete code.",
)
FREE_PROSE_REQUESTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a busy market in a small town on a Saturday morning.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain to a child why the seasons change.",
    "Write a short essay on why people keep pets.",
    "Describe your ideal weekend in a few paragraphs.",
    "Write a short story about a robot that learns to paint.",
    "Explain how a bicycle works to someone who has never seen one.",
)


def _chat(tok, text: str) -> list[int]:
    try:
        s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    except Exception:  # no chat template: a plain completion prompt
        s = text + "\n\n"
    return _ids(tok, s)


def code_excerpt(tok, module: str, budget: int) -> str:
    """Whole lines of `module`'s source from its first top-level def/class, as many as fit in `budget` tokens."""
    lines = code_text(module).splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith(("def ", "class "))), 0)
    out, n = [], 0
    for ln in lines[start:]:
        k = len(_ids(tok, ln))
        if n + k > budget:
            break
        out.append(ln)
        n += k
    if not out:
        raise ValueError(f"{module}: no whole line fits in {budget} tokens")
    return "".join(out)


def copy_prompt(tok, j: int, length: int) -> Prompt:
    """Copy request j: instruction j (cycled) over an excerpt of CODE_MODULES[j]; at most `length` tokens."""
    module, instruction = CODE_MODULES[j % len(CODE_MODULES)], COPY_INSTRUCTIONS[j % len(COPY_INSTRUCTIONS)]
    overhead = len(_chat(tok, instruction + "\n\n```python\n\n```"))
    code = code_excerpt(tok, module, length - overhead - 8)  # margin: tokens merge differently at the joins
    ids = _chat(tok, f"{instruction}\n\n```python\n{code}```")
    return Prompt("copy", module, tuple(ids[:length]))


def free_prose_prompt(tok, j: int) -> Prompt:
    text = FREE_PROSE_REQUESTS[j % len(FREE_PROSE_REQUESTS)]
    return Prompt("free", text[:40], tuple(_chat(tok, text)))


def build_mixed_prompts(tok, length: int, count: int) -> list[Prompt]:
    """`count` prompts: copy, free prose, copy, free prose, ... (copy prompts of at most `length` tokens)."""
    return [copy_prompt(tok, i // 2, length) if i % 2 == 0 else free_prose_prompt(tok, i // 2) for i in range(count)]


WORKLOADS = {"default": build_prompts, "mixed": build_mixed_prompts}

"""Varied prompts for the lossless tests: prose, code, and chat-template conversations."""

import inspect
import json
import textwrap

PROSE = [
    "The history of the printing press begins in",
    "Photosynthesis is the process by which plants",
    "In the winter of 1812, Napoleon's army",
    "A good night's sleep matters because",
    "The three laws of thermodynamics state that",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The stock market fell sharply on Monday after",
    "Here is a recipe for a simple tomato soup. Ingredients:",
]
CODE = [
    "def fibonacci(n):\n",
    "import numpy as np\n\ndef normalize(x):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Read a CSV file and print the average of the second column\nimport csv\n",
    "SELECT name, COUNT(*) FROM orders",
    "function debounce(fn, wait) {\n",
    textwrap.dedent(inspect.getsource(json.dumps)).split('"""')[0] + '"""',
]
CHAT = [
    "What is the capital of Japan, and what is it famous for?",
    "Write a haiku about the ocean.",
    "Explain recursion to a ten-year-old.",
    "Give me three tips for learning a new language.",
    "How do I reverse a list in Python?",
]


def all_prompts(tokenizer) -> list[str]:
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in CHAT
    ]
    return PROSE + CODE + chats

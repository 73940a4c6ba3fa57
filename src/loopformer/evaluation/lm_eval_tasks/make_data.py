"""Write the JSONL data of the example lm-eval tasks (deterministic; the files in data/ are its output).

    python -m loopformer.evaluation.lm_eval_tasks.make_data

Three small sets built from common Python idioms, so a model trained on Python source (the benchmark LM) has
something to get right and a random one sits at chance:

* ``python_choice.jsonl``: a line's beginning and four possible endings (one right, three taken from other
  items), for the ``multiple_choice`` task;
* ``python_line.jsonl``: the same beginnings and right endings, for the ``generate_until`` task;
* ``python_docs.jsonl``: short functions, for the ``loglikelihood_rolling`` (perplexity) task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

IDIOMS = [
    ('if __name__ == "__main__', '":'),
    ("for index, value in enumerate(", "values):"),
    ("def __init__(self", "):"),
    ("        return", " None"),
    ("    except", " Exception:"),
    ("while", " True:"),
    ("import os\nimport", " sys"),
    ("from collections import", " OrderedDict"),
    ("        self.assertEqual(", "result, expected)"),
    ("        raise", " ValueError(message)"),
    ("    with open(path", ") as f:"),
    ("    def __repr__(self", "):"),
    ("    for key in", " keys:"),
    ("        if not", " isinstance(value, str):"),
    ("    @property\n    def", " name(self):"),
    ("    elif", " value is None:"),
    ("    try:\n        import", " threading"),
    ("        return self.", "_value"),
    ("class Error(", "Exception):"),
    ("    print(", "result)"),
    ("    lines = text.split(", "'\\n')"),
    ("    return ''.join(", "parts)"),
    ("        yield", " item"),
    ("    assert isinstance(", "value, int)"),
]

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "def first(items):\n    for item in items:\n        return item\n    return None\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "def read(path):\n    with open(path) as f:\n        return f.read()\n",
    "def is_empty(text):\n    if not text:\n        return True\n    return False\n",
    'def main():\n    print("hello")\n\n\nif __name__ == "__main__":\n    main()\n',
    "def count(words):\n    counts = {}\n    for word in words:\n        counts[word] = counts.get(word, 0) + 1\n"
    "    return counts\n",
    "import os\n\n\ndef home():\n    return os.path.expanduser('~')\n",
]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    data = Path(__file__).parent / "data"
    data.mkdir(exist_ok=True)
    rng = random.Random(0)
    answers = [answer for _, answer in IDIOMS]
    choice_rows = []
    for context, answer in IDIOMS:
        choices = [answer, *rng.sample([a for a in answers if a != answer], 3)]
        rng.shuffle(choices)
        choice_rows.append({"context": context, "choices": choices, "label": choices.index(answer)})
    write(data / "python_choice.jsonl", choice_rows)
    write(data / "python_line.jsonl", [{"context": c, "answer": a} for c, a in IDIOMS])
    write(data / "python_docs.jsonl", [{"text": text} for text in DOCS])


if __name__ == "__main__":
    main()

"""Build a small multiple-choice task (next sentence of a Python docstring) for lm-evaluation-harness.

Each item is the first sentence of a document, the true second sentence and three second
sentences of other documents; a model that has learned the corpus ranks the true one higher. It is
an offline smoke test of the evaluation path (the common-sense benchmarks cannot be downloaded
here), not a benchmark. The committed copy in ``eval/lm_eval_tasks/pydoc_next_sentence`` was built
from the built-in corpus:

    python -m data_prep.build_mc_task --input corpus.jsonl \\
        --output eval/lm_eval_tasks/pydoc_next_sentence/pydoc_next_sentence.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _first_two_sentences(text: str) -> tuple[str, str] | None:
    parts = _SENTENCE_END.split(" ".join(text.split()), maxsplit=2)
    if len(parts) < 2:
        return None
    first, second = parts[0], parts[1]
    if not (40 <= len(first) <= 200 and 20 <= len(second) <= 120):  # short: fits small contexts
        return None
    return first, second


def build_items(documents: list[str], count: int, seed: int = 0, choices: int = 4) -> list[dict]:
    pairs = [p for p in (_first_two_sentences(d) for d in documents) if p is not None]
    if len(pairs) < choices:
        raise ValueError(f"only {len(pairs)} documents have two usable sentences; need at least {choices}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = []
    for i, (context, answer) in enumerate(pairs[:count]):
        others = [pairs[j][1] for j in rng.sample(range(len(pairs)), choices + 1) if j != i][:choices - 1]
        options = [answer, *others]
        rng.shuffle(options)
        items.append({"context": context, "choices": [" " + o for o in options], "label": options.index(answer)})
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="corpus JSONL ({'text': ...} per line)")
    p.add_argument("--output", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.input) as f:
        documents = [json.loads(line)["text"] for line in f if line.strip()]
    items = build_items(documents, args.count, args.seed)
    with open(args.output, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    print(f"wrote {len(items)} items to {args.output}")


if __name__ == "__main__":
    main()

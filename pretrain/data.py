"""Training data: megatron-core ``GPTDataset`` blends over indexed datasets, read in a fixed global
order from a consumed-samples position (so a resumed run sees exactly the samples it would have)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from data_prep.indexed_dataset import (DatasetError, file_sha256, manifest_path, max_token_id, read_index_header,
                                      read_manifest)
from data_prep.tokenizers import TextTokenizer, TokenizerError, build_tokenizer
from pretrain.config import ConfigError, DataConfig
from pretrain.nodes import folder_leaders
from pretrain.outputs import require_writable


def load_tokenizer(data: DataConfig) -> TextTokenizer:
    try:
        return build_tokenizer(data.tokenizer_type, data.tokenizer_model,
                               vocab_size=data.vocab_size_for_null_tokenizer)
    except TokenizerError as err:
        raise ConfigError(str(err)) from None


def megatron_tokenizer(tokenizer: TextTokenizer):
    """Wrap our tokenizer in megatron-core's tokenizer interface (what its datasets expect)."""
    from megatron.core.tokenizers import MegatronTokenizerBase

    class _Adapter(MegatronTokenizerBase):
        def __init__(self, inner: TextTokenizer):
            self._inner = inner
            self.path = getattr(inner, "path", None)
            self.config = {}
            self.unique_identifiers = dict(inner.unique_identifiers)

        def tokenize(self, text):
            return self._inner.tokenize(text)

        def detokenize(self, ids):
            return self._inner.detokenize(ids)

        @property
        def vocab(self):
            return {}

        @property
        def vocab_size(self):
            return self._inner.vocab_size

        @property
        def eod(self):
            return self._inner.eod

        @property
        def pad(self):
            return self._inner.pad if self._inner.pad is not None else self._inner.eod

        def apply_chat_template(self, *args, **kwargs):
            raise NotImplementedError("pretraining tokenizers have no chat template")

    return _Adapter(tokenizer)


def check_datasets(data: DataConfig, tokenizer: TextTokenizer) -> None:
    """Refuse a dataset that megatron-core cannot read (an empty or truncated ``.bin``/``.idx``)
    or whose token ids the model cannot embed (ids at or above the tokenizer's vocabulary, which
    the model's padded vocabulary is built from: TP=1 would fail inside the embedding, TP>1 would
    train on masked ids in silence).

    Rank 0 reads each dataset's largest id (its manifest, else a scan of the ``.bin``) and every
    rank gets its verdict, so all ranks stop together with the same message."""
    if data.mock_data:
        return
    path = getattr(tokenizer, "path", None)
    vocab_source = f"tokenizer {path}" if path else None
    prefixes = data.all_prefixes()
    problem = _decided_on_rank0(lambda: _tokenizer_mismatch(prefixes, tokenizer)
                                or _dataset_problem(prefixes, tokenizer.vocab_size, vocab_source))
    if problem:
        raise ConfigError(problem)


def check_tokenizer_matches_data(data: DataConfig, tokenizer: TextTokenizer) -> None:
    """The tokenizer against the manifest of every dataset (``--data-path`` and its kin, and
    ``--test-data-path``), on every rank and before any process group exists: the manifests are
    small files, every rank reaches the same verdict, and a mismatch stops the run with its
    message instead of a collective timing out."""
    if data.mock_data:
        return
    test = data.test_data().all_prefixes() if data.test_data_path else []
    problem = _tokenizer_mismatch(data.all_prefixes() + test, tokenizer)
    if problem:
        raise ConfigError(problem)


# (prefix, manifest size and mtime) -> manifest; (tokenizer file, size, mtime) -> sha256: the
# checks run more than once per run (before the process group, then with the datasets)
_MANIFESTS: dict[tuple, object] = {}
_TOKENIZER_DIGESTS: dict[tuple, str] = {}


def _cached_manifest(prefix: str):
    try:
        st = os.stat(manifest_path(prefix))
    except FileNotFoundError:
        return None
    key = (os.path.abspath(prefix), st.st_size, st.st_mtime_ns)
    if key not in _MANIFESTS:
        _MANIFESTS[key] = read_manifest(prefix)
    return _MANIFESTS[key]


def _cached_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _TOKENIZER_DIGESTS:
        _TOKENIZER_DIGESTS[key] = file_sha256(path)
    return _TOKENIZER_DIGESTS[key]


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """What tells two tokenizers apart: the vocabulary size and the sha256 of the model file
    (None where it is not known). A dataset's manifest records it, and so does every checkpoint
    (``trainer_state["tokenizer"]``)."""

    vocab_size: int
    sha256: str | None = None
    # the same tokenizer in other files: an HF export's tokenizer.model beside its tokenizer.json
    # (the export checks that both encode alike), so a re-imported model trains on the data the
    # sentencepiece model made
    also: tuple = ()


def tokenizer_identity(tokenizer: TextTokenizer, also: tuple = ()) -> TokenizerIdentity:
    path = getattr(tokenizer, "path", None)
    return TokenizerIdentity(int(tokenizer.vocab_size), _cached_sha256(path) if path and os.path.isfile(path) else None,
                             tuple(_cached_sha256(p) for p in also))


def tokenizer_identity_problem(source: str, made: str, recorded: TokenizerIdentity, where: str,
                               tokenizer: TextTokenizer) -> str | None:
    """The one tokenizer-identity rule (DESIGN invariant 9) of every entry point: training (its
    data and its --load checkpoint), evaluation, the distillation teacher, the HF export and the
    comparison tool. ``recorded`` (a manifest's, a checkpoint's) is another tokenizer than
    ``tokenizer`` when the vocabulary sizes differ, or the sha256 of both files are known and
    differ: its ids would mean other tokens, in silence. ``source`` names the flag and file,
    ``made`` says what was done with the recorded one ('the data was made'), ``where`` where it
    is recorded."""
    path = getattr(tokenizer, "path", None)
    if recorded.vocab_size != tokenizer.vocab_size:
        found = f"{recorded.vocab_size} tokens"
    elif recorded.sha256 and path and os.path.isfile(path) and _cached_sha256(path) not in (recorded.sha256,
                                                                                          *recorded.also):
        found = f"another tokenizer file (sha256 {recorded.sha256[:12]}...)"
    else:
        return None
    return (f"{source}: {made} with {found} ({where}), not with the tokenizer {path or tokenizer.name} "
            f"({tokenizer.vocab_size} tokens): its token ids would mean other tokens. Use one tokenizer for the "
            "data, the checkpoints and the teacher (--tokenizer-model; without it a --load checkpoint's own), "
            "or preprocess the data with this one")


def _tokenizer_mismatch(prefixes: list[str], tokenizer: TextTokenizer) -> str | None:
    """The data's manifest names the tokenizer that made it (sha256, vocabulary)."""
    for prefix in prefixes:
        try:
            manifest = _cached_manifest(prefix)
        except DatasetError as err:
            return f"--data-path: {err}"
        if manifest is None:
            continue
        problem = tokenizer_identity_problem(
            f"--data-path {prefix}", "the data was made",
            TokenizerIdentity(manifest.vocab_size, manifest.tokenizer_model_sha256), manifest_path(prefix), tokenizer)
        if problem:
            return problem
    return None


def _dataset_problem(prefixes: list[str], vocab_size: int, vocab_source: str | None) -> str | None:
    for prefix in prefixes:
        try:
            largest, source = _cached_max_token_id(prefix)
        except (DatasetError, OSError) as err:
            return f"--data-path: {err}"
        if largest >= vocab_size:
            vocabulary = f"{vocab_size} ids" + (f", {vocab_source}" if vocab_source else "")
            return (f"--data-path {prefix}: its largest token id is {largest} (from {source}), outside "
                    f"the model's vocabulary ({vocabulary}): the data was made with another "
                    "tokenizer. Preprocess it with the tokenizer the model uses (--tokenizer-model)")
    return None


# (prefix, .bin and .idx size and mtime) -> (largest id, source): the check costs one scan per run
_MAX_TOKEN_IDS: dict[tuple, tuple[int, str]] = {}


def _cached_max_token_id(prefix: str) -> tuple[int, str]:
    try:
        stats = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, (prefix + ".bin", prefix + ".idx")))
    except FileNotFoundError:
        return max_token_id(prefix)  # raises DatasetError naming the missing file
    key = (os.path.abspath(prefix), stats)
    if key not in _MAX_TOKEN_IDS:
        _MAX_TOKEN_IDS[key] = max_token_id(prefix)
    return _MAX_TOKEN_IDS[key]


def _decided_on_rank0(decide: Callable[[], str | None]) -> str | None:
    """``decide()`` on rank 0, its result on every rank (the process needs no group when alone)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decide()
    verdict = [decide() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(verdict, src=0)
    return verdict[0]


def blend_report(data: DataConfig, train_samples: int, seq_length: int, max_lines: int = 8) -> list[str]:
    """Lines for the log: the tokens of each blend component (its manifest, else its ``.bin``'s
    size) and about how many times the run will read its training share (weight x tokens the run
    draws / the component's training tokens), with a warning for each component that repeats."""
    if data.mock_data or not train_samples:
        return []
    prefixes, weights = data.training_blend()
    shares = [float(x) for x in data.split.replace("/", ",").split(",")]
    train_share = 1.0 if data.per_split else shares[0] / sum(shares)
    tokens = []
    for prefix in prefixes:
        manifest = _cached_manifest(prefix)
        if manifest is not None:
            tokens.append(manifest.tokens)
        else:
            header = read_index_header(prefix)
            tokens.append(os.path.getsize(prefix + ".bin") // header.itemsize)
    total = sum(tokens)
    if weights is None:  # megatron-core: one pass over each dataset, weighted by its size
        weights = [t / total for t in tokens] if total else [1 / len(tokens)] * len(tokens)
    weight_sum = sum(weights) or 1.0
    drawn = train_samples * seq_length
    epochs = [(w / weight_sum) * drawn / max(t * train_share, 1) for w, t in zip(weights, tokens)]
    lines = [f"data: {len(prefixes):,} dataset(s), {total:,} tokens ({total * train_share:,.0f} in the training "
             f"split {'--train-data-path' if data.per_split else data.split}); the run draws {drawn:,} training tokens, ~{drawn / max(total * train_share, 1):.2f} "
             "epochs of the whole"]
    order = sorted(range(len(prefixes)), key=lambda i: -epochs[i])
    for i in order[:max_lines] if len(prefixes) > max_lines else range(len(prefixes)):
        lines.append(f"  {prefixes[i]}: {tokens[i]:,} tokens, weight {weights[i] / weight_sum:.4f}, "
                     f"~{epochs[i]:.2f} epochs")
    if len(prefixes) > max_lines:
        lines.append(f"  ... {len(prefixes) - max_lines:,} more (most repeated first)")
    repeated = [i for i in range(len(prefixes)) if epochs[i] > 1.0]
    if repeated:
        worst = order[0]
        lines.append(f"WARNING: {len(repeated):,} blend component(s) will be seen more than once (the most: "
                     f"{prefixes[worst]}, ~{epochs[worst]:.2f} times): their documents repeat. Add data, "
                     "lower their weight, or train on fewer tokens")
    return lines


def index_cache_folder(data: DataConfig) -> str:
    """Where megatron-core keeps the dataset indices: --data-cache-path, else beside the first
    dataset (``PREFIX/cache/GPTDataset_indices``, its default)."""
    return data.data_cache_path or os.path.join(data.all_prefixes()[0], "cache", "GPTDataset_indices")


def require_index_cache(data: DataConfig) -> None:
    """The index cache can be written where megatron-core will write it (beside the first dataset
    unless --data-cache-path): a read-only dataset folder otherwise fails deep inside megatron-core
    when the indices are built. A cache folder that exists already is left to megatron-core: it may
    hold the indices of an earlier run, which are only read."""
    if data.mock_data or not data.all_prefixes():  # no data: validate() says so
        return
    folder = index_cache_folder(data)
    if not os.path.isdir(folder):
        require_writable(folder, "--data-cache-path" if data.data_cache_path else
                         "the dataset index cache (default: beside the first dataset; --data-cache-path sets it)")


def _builds_a_node_cache(data: DataConfig) -> bool:
    """Whether this rank builds the dataset indices into its node's cache although it is not
    global rank 0. megatron-core builds them on global rank 0 alone, and the other ranks, after a
    barrier, read them from the cache folder: right for a folder every node sees, but on a
    node-local one (``--data-cache-path /tmp/...``) the other nodes would find nothing there.
    So the first rank of each view of the folder (``pretrain.nodes``) builds its own copy."""
    if data.mock_data or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() == 1:
        return False
    rank = torch.distributed.get_rank()
    leaders, _ = folder_leaders(index_cache_folder(data), "--data-cache-path")
    return rank != 0 and leaders[rank] == rank


@contextlib.contextmanager
def _as_global_rank0(active: bool) -> Iterator[None]:
    """megatron-core's dataset builder (0.16 to 0.19) asks ``torch.distributed.get_rank() == 0``
    who builds the indices before the barrier and who reads them after it; for the duration of
    the build a node's first rank answers 0 for the default group, so it builds its node's copy
    at the moment rank 0 builds its own. The barriers are the same on every rank either way."""
    if not active:
        yield
        return
    real = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0 if group is None else real(group)
    try:
        yield
    finally:
        torch.distributed.get_rank = real


def _check_split_has_training_data(data: DataConfig, num_samples: tuple[int, int, int]) -> None:
    if data.mock_data or data.per_split or not num_samples[0]:
        return
    shares = data.split.replace("/", ",").split(",")
    if float(shares[0]) == 0:
        raise ConfigError(f"--split {data.split}: the training share (the first number) is 0, so there "
                          "is no training data; give training a share, e.g. --split 98,2,0")


def build_datasets(data: DataConfig, tokenizer: TextTokenizer, seq_length: int, seed: int,
                   num_samples: tuple[int, int, int]):
    """(train, valid, test) megatron-core datasets; valid/test may be None when their split is 0.
    The datasets are checked first (``check_datasets``): a bad one stops with a message."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    _check_split_has_training_data(data, num_samples)
    check_datasets(data, tokenizer)
    node_builder = _builds_a_node_cache(data)

    per_split = data.per_split and not data.mock_data
    blend = None if data.mock_data or per_split else data.blend()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=data.blend_per_split() if per_split else None,
        split=None if per_split else data.split,
        path_to_cache=data.data_cache_path,
        tokenizer=megatron_tokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention builds its own mask
        mmap_bin_files=True,
        num_dataset_builder_threads=data.num_dataset_builder_threads,
    )
    cls = MockGPTDataset if data.mock_data else GPTDataset
    with _as_global_rank0(node_builder):
        return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


# the test set's sequences do not depend on the run's --seed: every run (and every arm of a
# comparison) is scored on the same sequences
TEST_SET_SEED = 1234


def build_test_dataset(data: DataConfig, tokenizer: TextTokenizer, seq_length: int):
    """The ``--test-data-path`` set (all of it), or None without one."""
    if not data.test_data_path or data.mock_data:
        return None
    test_data = data.test_data()
    test = build_datasets(test_data, tokenizer, seq_length, TEST_SET_SEED, (0, 0, None))[2]
    if test is None or len(test) == 0:
        raise ConfigError(f"--test-data-path {' '.join(data.test_data_path)}: no sequence of {seq_length} tokens")
    return test


class MicroBatchIterator:
    """Micro-batches for this data-parallel rank, in Megatron-LM's ``MegatronPretrainingSampler``
    order: global batch ``i`` is samples ``[i*G, (i+1)*G)``; DP rank ``r`` takes its contiguous
    ``G/DP`` share, in micro-batches of ``micro_batch_size``."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        self.dataset = dataset
        self.next_sample = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = data_parallel_rank, data_parallel_size

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        stride = self.micro_batch_size * self.dp_size
        start = self.next_sample + self.dp_rank * self.micro_batch_size
        self.next_sample += stride
        indices = [(start + i) % len(self.dataset) for i in range(self.micro_batch_size)]
        samples = [self.dataset[i] for i in indices]
        batch = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]))
        batch["tokens"] = batch["tokens"].long()
        batch["labels"] = batch["labels"].long()
        batch["loss_mask"] = batch["loss_mask"].float()
        batch["position_ids"] = batch["position_ids"].long()
        return batch

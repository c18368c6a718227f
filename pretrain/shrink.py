"""Rewrite a checkpoint into the physically smaller architecture (and/or another TP/PP layout).

Streaming: no model is built. The source checkpoint's DCP folder is read key by key, region by
region (``pretrain.checkpoint.stream``): every weight, its fp32 master copy and both Adam moments
(``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>``) are cut to the kept groups one layer at a
time with ``pretrain.model.shrunk.kept_indices``, dropped layers are left out and the rest
renumbered, and the result is written chunk by chunk. Memory stays at about one layer of one
tensor (plus one output file's buffer, ``max_file_bytes``), whatever the checkpoint's size.

The keys written are the ones the smaller model asks for: a uniform shrink gives a plain Llama
shape whose decoder tensors are stacked ``[layers, ...]``; per-layer masks give a heterogeneous
model (per-layer query groups and FFN widths, ``ModelConfig.layer_shapes``) whose layers have
their own keys (``decoder.layers.{i}....``; ``megatron_patches.per_layer_config``). Iteration,
consumed samples, LR schedule (``common.pt`` holds the optimizer's param groups and step: copied
as is) and pruning history are carried over. A checkpoint loads under any TP/PP, so a layout
change rewrites only the config (the target layout is validated here so that a bad one fails
here, not on the cluster). The new checkpoint is written to ``iter_N.tmp`` and renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Callable

import torch

from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint.atomic import (publish_checkpoint, require_new_folder, save_failure_message, staged,
                                       verify_in_background)
from pretrain.checkpoint.files import MODEL_OPTIM_DIR, TRAINER_STATE, CheckpointError, iteration_dir
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.checkpoint.stream import CheckpointReader, DCPFormatError, OutTensor, write_lazily
from pretrain.config import ConfigError, PretrainConfig
from pretrain.errors import ShrinkError
from pretrain.model import layout
from pretrain.model.shrunk import kept_indices, kept_layers, shrunk_model_config, slice_to
from pretrain.outputs import OutputError, write_failure
from pretrain.pruning.masks import GroupMasks, GroupScores, ModelShape
from pretrain.pruning.state import PruningState


def _shape_of(cfg: PretrainConfig, vocab: int):
    return ModelShape.from_config(cfg.model, vocab)


def _check_target_sizes(target_tp: int | None, target_pp: int | None) -> None:
    for flag, value in (("--target-tensor-parallel-size", target_tp), ("--target-pipeline-parallel-size", target_pp)):
        if value is not None and value < 1:
            raise ShrinkError(f"{flag} {value}: must be at least 1 (or left out to keep the checkpoint's)")


def _check_save_folder(save: str, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty folder (another run's checkpoints would be
    replaced and its ``latest`` rewound) unless asked to; ``.tmp`` leftovers of an interrupted
    reshard do not count."""
    try:
        require_new_folder(save, "--save", overwrite)
    except OutputError as err:
        raise ShrinkError(str(err)) from None


def reshard_checkpoint(load: str, save: str, shrink: bool = False, target_tp: int | None = None,
                       target_pp: int | None = None, progress: bool = True,
                       max_file_bytes: int = 512 * 2**20, overwrite: bool = False) -> dict:
    """Importable entry point. Runs in the calling process alone: it issues no collective (its DCP
    reads and writes are single-process), so rank 0 of a running world may call it (the in-run
    shrink does) and a plain ``python`` process needs no world at all. Returns a summary."""
    start = time.time()
    _check_target_sizes(target_tp, target_pp)
    args = (load, save, shrink, target_tp, target_pp, progress, max_file_bytes, overwrite)
    with _streaming():
        try:
            # the source's checksums are verified on another thread while it is rewritten, and
            # the new checkpoint is published only once they match
            return {**_reshard(*args, verify_meanwhile=True), "seconds": time.time() - start}
        except _CorruptSource:
            pass
        # as when they are verified first: that checkpoint is skipped (warned about) for the
        # newest valid one under --load, or refused with the reason
        return {**_reshard(*args, verify_meanwhile=False), "seconds": time.time() - start}


@contextlib.contextmanager
def _streaming() -> Iterator[None]:
    """The cyclic garbage collector off and torch on one thread for the block, both restored after.
    A full collection walks every object of a process that imported torch and megatron-core
    (0.1-0.3 s here, more than a whole shrink of a 100 MB checkpoint), and the shrink's own garbage
    (planner records, small closures) waits harmlessly for the next collection after it. Its tensor
    work is memory-bound copies and gathers that more threads do not speed up (with torch's default
    threads on a loaded 2-core machine a shrink took 30% more CPU time and 50% more wall)."""
    enabled, threads = gc.isenabled(), torch.get_num_threads()
    gc.disable()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if enabled:
            gc.enable()


class _CorruptSource(Exception):
    """The checksums of the checkpoint being rewritten differ from its manifest's."""


def _reshard(load: str, save: str, shrink: bool, target_tp: int | None, target_pp: int | None, progress: bool,
             max_file_bytes: int, overwrite: bool, verify_meanwhile: bool) -> dict:
    stored = _source_checkpoint(load, save, overwrite, checksums=not verify_meanwhile)
    verification = verify_in_background(stored.folder) if verify_meanwhile else None

    def verified() -> None:
        if verification is not None:
            try:
                verification.result()
            except CheckpointError:
                raise _CorruptSource() from None

    try:
        folder, state, cfg = stored.folder, stored.trainer_state, stored.config
        vocab = int(state["vocab_size"])
        shape = _shape_of(cfg, vocab)
        pruning = _pruning_to_shrink(folder, state, cfg, shape) if shrink else None
        new_cfg = _target_config(cfg, pruning.masks if shrink else None, shape, vocab, target_tp, target_pp)
        new_state = _new_trainer_state(state, cfg, new_cfg, pruning, shape)
        path, counts = _write_checkpoint(folder, save, new_state, pruning.masks if shrink else None, shape,
                                         stacked=new_cfg.model.layer_shapes is None, progress=progress,
                                         max_file_bytes=max_file_bytes, before_publish=verified)
    except _CorruptSource:
        raise
    except BaseException:
        verified()  # a failure on a corrupt source is the corruption's
        raise
    return {"folder": path, "iteration": state["iteration"], "params_before": counts[0], "params_after": counts[1],
            "config": new_cfg}


def _source_checkpoint(load: str, save: str, overwrite: bool, checksums: bool) -> StoredCheckpoint:
    """The checkpoint under ``load``, once ``save`` is known to be a place to write to."""
    stored = StoredCheckpoint.open(load, "--load", ShrinkError, checksums)
    if stored.deepspeed_only:
        raise ShrinkError(stored.deepspeed_only)
    if os.path.abspath(save) == os.path.abspath(load):
        raise ShrinkError("--save must differ from --load (the source checkpoint is kept)")
    _check_save_folder(save, overwrite)
    return stored


def _pruning_to_shrink(folder: str, state: dict, cfg: PretrainConfig, shape):
    """The checkpoint's PruningState, checked to describe its model and to keep something."""
    # an older checkpoint's missing pruning keys are those of a schedule starting on its model
    pruning = PruningState.in_checkpoint(state, fallback=PruningState.fresh(
        shape, cfg.prune.target_params, cfg.prune.target_ratio))
    if pruning is None:
        raise ShrinkError(f"{folder}: --shrink needs a checkpoint of a pruning run (no pruning state)")
    masks = pruning.masks
    expected = (shape.num_layers, shape.num_groups, shape.ffn, shape.hidden)
    found = (masks.heads.shape[0], masks.heads.shape[1], masks.ffn.shape[1], masks.hidden.numel())
    if found != expected:
        raise ShrinkError(f"{folder}: the pruning masks (layers, groups, FFN, hidden = {found}) do not "
                          f"match the checkpoint's model {expected}; the trainer state is inconsistent")
    if not bool(masks.layers.any()) or not bool(masks.hidden.any()):
        raise ShrinkError(f"{folder}: the masks keep no layer or no hidden channel; nothing to shrink into")
    return pruning


def _target_config(cfg: PretrainConfig, masks, shape, vocab: int, target_tp: int | None,
                   target_pp: int | None) -> PretrainConfig:
    """The config of the written checkpoint (shrunk when ``masks`` are given), checked to fit its layout."""
    model = shrunk_model_config(cfg.model, masks, shape) if masks is not None else cfg.model
    tp = target_tp if target_tp is not None else cfg.parallel.tensor_model_parallel_size
    pp = target_pp if target_pp is not None else cfg.parallel.pipeline_model_parallel_size
    new_cfg = dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    try:
        new_cfg.parallel.validate(model, tp * pp)
        model.validate()
    except ConfigError as err:
        raise ShrinkError(f"the {'shrunk ' if masks is not None else ''}model does not fit TP={tp} x PP={pp}: "
                          f"{err}") from None
    if vocab % tp:
        raise ShrinkError(f"the vocabulary ({vocab}, padded) is not divisible by TP={tp}")
    return new_cfg


def _new_trainer_state(state: dict, cfg: PretrainConfig, new_cfg: PretrainConfig, pruning, shape) -> dict:
    """The source's trainer state with the new config; after a shrink, the pruning state at the
    smaller shape and one more ``shrink_history`` entry."""
    new_state = {**state, "config": new_cfg.to_dict(),
                 # no per-rank state (RNG, fisher means) carries over a reshard: the layout is unknown
                 "layout": {"resharded_from": state.get("layout")}}
    if pruning is None:
        return new_state
    new_state = _shrunk_pruning_state(pruning, shape.parameter_count(pruning.masks)).stored_in(new_state)
    new_state["shrink_history"] = list(state.get("shrink_history", [])) + [
        {"iteration": state["iteration"], "from": dataclasses.asdict(cfg.model),
         "to": dataclasses.asdict(new_cfg.model)}]
    return new_state


def _write_checkpoint(folder: str, save: str, new_state: dict, masks, shape, stacked: bool, progress: bool,
                      max_file_bytes: int, before_publish: Callable[[], None]) -> tuple[str, tuple[int, int]]:
    """Write ``iter_N.tmp`` under ``save`` (the DCP folder shrunk when ``masks`` are given, else
    copied) and publish it unless ``before_publish`` raises; returns its path and the model
    parameters (before, after)."""
    iteration = new_state["iteration"]
    tmp = iteration_dir(save, iteration) + ".tmp"
    source_dir = os.path.join(folder, MODEL_OPTIM_DIR)
    created_save = not os.path.exists(save)
    os.makedirs(save, exist_ok=True)
    try:
        with staged(tmp):
            target_dir = os.path.join(tmp, MODEL_OPTIM_DIR)
            checksums = {}
            if masks is not None:
                counts, written = _stream_shrink(source_dir, target_dir, masks, shape, stacked=stacked,
                                                 progress=progress, max_file_bytes=max_file_bytes)
                checksums = {f"{MODEL_OPTIM_DIR}/{name}": crc for name, crc in written.items()}
            else:
                shutil.copytree(source_dir, target_dir)
                counts = (_model_numel(CheckpointReader(source_dir)),) * 2
            torch.save(new_state, os.path.join(tmp, TRAINER_STATE))
            before_publish()
            return publish_checkpoint(save, iteration, tmp, remember_verified=True, checksums=checksums), counts
    except BaseException as err:
        if created_save and not os.listdir(save):
            os.rmdir(save)
        raise _as_shrink_error(err, tmp) from None


def _as_shrink_error(err: BaseException, tmp: str) -> BaseException:
    """A failure while writing ``tmp`` as a ShrinkError the user can act on (a corrupt source, a
    full disk, an unwritable folder); anything else (a bug) is returned unchanged."""
    if isinstance(err, DCPFormatError):
        return ShrinkError(str(err))
    failure = write_failure(err, os.path.dirname(tmp), "--save", under=tmp)
    if failure is not None:
        return ShrinkError(str(failure))
    if isinstance(err, (OSError, CheckpointException)):
        return ShrinkError(f"{save_failure_message(err, tmp)}; the incomplete folder was removed")
    return err


# --- the streaming rewrite ---------------------------------------------------------------------

_OPTIMIZER_KEY = re.compile(r"(optimizer\.state\.[^.]+\.)(.+)")
_STACKED = "decoder.layers."
_OBJECT_KEY = re.compile(r"(.+)/shard_([\d.]+)_([\d.]+)")
_ROW_BLOCK_BYTES = 64 * 2**20  # embedding/output rows are rewritten in blocks of this size


def _split_key(key: str) -> tuple[str, str]:
    """``optimizer.state.exp_avg.<model key>`` -> (``optimizer.state.exp_avg.``, model key)."""
    m = _OPTIMIZER_KEY.fullmatch(key)
    return (m.group(1), m.group(2)) if m else ("", key)


def _model_numel(reader) -> int:
    """Model parameters in a DCP folder (its tensor keys that are not optimizer state)."""
    return sum(math.prod(md.size) for k in reader.keys() if (md := reader.tensor_meta(k)) and not _split_key(k)[0])


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total_bytes, 0, enabled
        self.start = self.last = time.time()

    def __call__(self, tensor, data: torch.Tensor) -> None:
        self.done += data.numel() * data.element_size()
        now = time.time()
        if self.enabled and (now - self.last > 5 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) / 1e9
            print(f"  shrink: {self.done / 1e9:.3f} of {self.total / 1e9:.3f} GB written "
                  f"({100 * self.done / max(self.total, 1):.0f}%, {rate:.2f} GB/s)", flush=True)


def _stream_shrink(source_dir: str, target_dir: str, masks, shape, stacked: bool, progress: bool,
                   max_file_bytes: int) -> tuple[tuple[int, int], dict[str, str]]:
    """Write the shrunk DCP folder; returns (model parameters before, after) and the CRC-32 of
    each data file written, by name."""
    reader = CheckpointReader(source_dir)
    kept = kept_layers(masks)

    def indices_of(key: str, name: str) -> tuple:
        try:
            return kept_indices(name, masks, shape)
        except KeyError:
            raise ShrinkError(f"{source_dir}: tensor {key!r} has no shrink rule (the shrink knows the Llama "
                              "weights, norms and q/k/v biases)") from None

    layer_sources, outputs = _sorted_keys(reader, source_dir, shape, indices_of)
    for (prefix, rest), sources in layer_sources.items():
        missing = sorted(set(range(shape.num_layers)) - set(sources))
        if missing:
            raise ShrinkError(f"{source_dir}: layers {missing} of {prefix}decoder.layers.*.{rest} are missing")
        per_layer = [_kept_layer(reader, sources[layer], layout.layer_name(layer, rest), layer, indices_of)
                     for layer in kept]
        outputs += _layer_outputs(prefix, rest, per_layer, stacked)
    objects = {}
    for key in reader.keys():
        if reader.tensor_meta(key) is None:
            new_key = _renamed_object(key, kept, stacked)
            if new_key is not None:
                objects[new_key] = reader.read_bytes(key)

    before = _model_numel(reader)
    after = sum(math.prod(t.size) for t in outputs if not _split_key(t.key)[0])
    checksums = write_lazily(target_dir, outputs, objects, max_file_bytes=max_file_bytes,
                             on_chunk=_Progress(sum(t.nbytes for t in outputs), progress))
    for name in os.listdir(source_dir):  # metadata.json (format), common.pt (optimizer param groups)
        if not name.startswith(".") and not name.endswith(".distcp"):
            shutil.copy2(os.path.join(source_dir, name), os.path.join(target_dir, name))
    return (before, after), checksums


def _sorted_keys(reader, source_dir: str, shape, indices_of) -> tuple[dict, list]:
    """The tensor keys by decoder-layer tensor ({(prefix, name in the layer): {layer: (key,
    stacked)}}), and the outputs of every tensor outside the layers."""
    layer_sources: dict[tuple[str, str], dict[int, tuple[str, bool]]] = {}
    outputs = []
    for key in reader.keys():
        md = reader.tensor_meta(key)
        if md is None:
            continue
        prefix, model_key = _split_key(key)
        split = layout.split_layer_name(model_key)
        if split:
            layer_sources.setdefault((prefix, split[1]), {})[split[0]] = (key, False)
        elif model_key.startswith(_STACKED):
            if md.size[0] != shape.num_layers:
                raise ShrinkError(f"{source_dir}: {key!r} stacks {md.size[0]} layers, the config says "
                                  f"{shape.num_layers}")
            for layer in range(md.size[0]):
                layer_sources.setdefault((prefix, model_key[len(_STACKED):]), {})[layer] = (key, True)
        else:
            outputs.append(_global_output(reader, key, md, indices_of(key, model_key)))
    return layer_sources, outputs


def _kept_layer(reader, source: tuple[str, bool], name: str, layer: int, indices_of) -> tuple:
    """(size, produce, dtype) of one kept layer's slice of one tensor."""
    key, is_stacked = source
    md = reader.tensor_meta(key)
    layer_size = tuple(md.size[1:]) if is_stacked else tuple(md.size)
    index = indices_of(key, name)
    out_size = tuple(len(ix) if ix is not None else n for ix, n in zip(index, layer_size))

    def produce():
        if is_stacked:
            return slice_to(reader.read(key, (layer,) + (0,) * len(layer_size), (1,) + layer_size)[0], index)
        return slice_to(reader.read(key), index)

    return out_size, produce, md.properties.dtype


def _layer_outputs(prefix: str, rest: str, per_layer: list, stacked: bool) -> list:
    """One layer tensor's outputs: stacked ``[layers, ...]`` (a uniform model) or one key per layer."""
    if not stacked:
        return [OutTensor(prefix + layout.layer_name(i, rest), size, dtype, [((0,) * len(size), size)],
                          lambda _, produce=produce: produce())
                for i, (size, produce, dtype) in enumerate(per_layer)]
    sizes = {size for size, _, _ in per_layer}
    if len(sizes) != 1:
        raise ShrinkError(f"{prefix}decoder.layers.{rest}: kept layers differ in shape {sorted(sizes)} "
                          "but the shrunk config is uniform")
    size, layers = per_layer[0][0], len(per_layer)
    return [OutTensor(f"{prefix}{_STACKED}{rest}", (layers,) + size, per_layer[0][2],
                      [((i,) + (0,) * len(size), (1,) + size) for i in range(layers)],
                      lambda i: per_layer[i][1]().unsqueeze(0))]


def _global_output(reader, key: str, md, index: tuple):
    """A tensor outside the decoder layers (embedding, output layer, final norm); 2-D ones whose
    rows are all kept are rewritten in row blocks to bound memory."""
    size = tuple(md.size)
    out_size = tuple(len(ix) if ix is not None else n for ix, n in zip(index, size))
    if len(size) == 2 and index[0] is None:
        row_bytes = max(1, size[1] * md.properties.dtype.itemsize)
        block = max(1, _ROW_BLOCK_BYTES // row_bytes)
        starts = list(range(0, size[0], block))
        chunks = [((r, 0), (min(block, size[0] - r), out_size[1])) for r in starts]

        def produce(i):
            rows = chunks[i][1][0]
            return slice_to(reader.read(key, (starts[i], 0), (rows, size[1])), index)

        return OutTensor(key, out_size, md.properties.dtype, chunks, produce)
    return OutTensor(key, out_size, md.properties.dtype, [((0,) * len(size), out_size)],
                     lambda _: slice_to(reader.read(key), index))


def _renamed_object(key: str, kept: list[int], stacked: bool) -> str | None:
    """The key of a byte object (``..._extra_state/shard_<offsets>_<shape>``) in the shrunk
    checkpoint; None for objects of dropped layers. Stacked keys carry the layer as the first
    offset (``shard_{l}_{L}``); per-layer keys do not (``decoder.layers.{l}.x/shard_0_1``)."""
    prefix, model_key = _split_key(key)
    m = _OBJECT_KEY.fullmatch(model_key)
    if m is None or not m.group(1).startswith(_STACKED):
        return key
    base, offsets, sizes = m.group(1), m.group(2).split("."), m.group(3).split(".")
    per_layer = layout.split_layer_name(base)
    if per_layer:
        layer, rest = per_layer
        if offsets == ["0"] and sizes == ["1"]:
            offsets, sizes = [], []
    else:
        layer, rest = int(offsets[0]), base[len(_STACKED):]
        offsets, sizes = offsets[1:], sizes[1:]
    if layer not in kept:
        return None
    i = kept.index(layer)
    if stacked:
        return f"{prefix}{_STACKED}{rest}/shard_{'.'.join([str(i)] + offsets)}_{'.'.join([str(len(kept))] + sizes)}"
    return f"{prefix}{_STACKED}{i}.{rest}/shard_{'.'.join(offsets or ['0'])}_{'.'.join(sizes or ['1'])}"


def _packed_rows(table: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Per layer, the kept entries moved to the front (zero-padded to ``width``)."""
    out = torch.zeros(table.shape[0], width, dtype=table.dtype)
    for l in range(table.shape[0]):
        kept = table[l][keep[l]]
        out[l, :kept.numel()] = kept
    return out


def _shrunk_pruning_state(pruning, params_after: int):
    """The pruning state re-expressed at the smaller shape: everything kept is now 'all'
    (per layer, the first kept-count entries; the rest, for narrower layers, do not exist). The
    schedule's ends and history stay those of the model the schedule started from."""
    masks = pruning.masks
    alive = masks.layers
    groups, ffn = masks.heads[alive].sum(1), masks.ffn[alive].sum(1)
    g_max, f_max = int(groups.max()), int(ffn.max())
    new_masks = GroupMasks(torch.arange(g_max)[None, :] < groups[:, None],
                           torch.arange(f_max)[None, :] < ffn[:, None],
                           torch.ones(int(masks.hidden.sum()), dtype=torch.bool))
    ema = pruning.ema
    if ema is not None:
        ema = GroupScores(_packed_rows(ema.heads[alive], masks.heads[alive], g_max),
                          _packed_rows(ema.ffn[alive], masks.ffn[alive], f_max), ema.hidden[masks.hidden])
    # shrink_requested_at: done; a run resumed from here must not shrink again
    return pruning.replace(masks=new_masks, ema=ema, shrunk_at_params=params_after, shrink_requested_at=None)

"""Record a trained MoE translation model's routing, token by token: the routing log.

``load_checkpoint`` loads the model in eval mode with dropless routing; ``pair_tasks`` gives one
task per translation direction (so every token knows its language); ``record_split`` runs a
data split through the model and turns the ``MoERecord``s its forward returns
(``net_output[1]["moe_records"]``) into one row per (non-padding token, MoE layer): the arrays
``routing_analysis.py`` documents.

Under expert choice (``--moe-routing expert_choice``) a token has a variable number of experts,
possibly none: its row lists the experts that took it, best first, and -1 in the remaining
slots (``chosen_experts``). Expert choice routes a token by the rest of its batch, so such a log
holds for the batching it was recorded with (``max_tokens``, ``max_sentences`` in the log).

Teacher-forced by default (the decoder reads the reference). With generation options, the
decoder reads the generator's best hypothesis instead, decoded again with teacher forcing from
the generator's first token: dropless routing is per token, and full decoding equals incremental
decoding, so this routes exactly as beam search did (a test checks it).
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..modules import MoELayer  # importing the package registers the models, allow-lists globals
from ..naming import layer_side


def load_checkpoint(path, data=None):
    """``(model, cfg, moe_layers)``: the model in eval mode with dropless routing, its config and
    its MoE layers in model order. ``data`` overrides the checkpoint's data directory."""
    from fairseq import checkpoint_utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    overrides = {"data": str(data)} if data else {}
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides=overrides
    )
    model = models[0].eval()
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not moe_layers:
        raise ValueError(f"{path}: the model has no MoE layer (a dense checkpoint?)")
    for layer in moe_layers:
        layer.gate.eval_capacity_factor = 0.0  # dropless: a token's routing is its own
    return model, cfg, moe_layers


def pair_tasks(cfg):
    """One task per translation direction: ``[((src, tgt), task)]``."""
    from fairseq import tasks

    task_cfg = cfg.task
    name = getattr(task_cfg, "_name", None) or getattr(task_cfg, "task", None)
    if name == "translation_multi_simple_epoch":
        result = []
        pairs = task_cfg.lang_pairs  # "en-de,en-fr", or a list once fairseq has parsed it
        for pair in pairs.split(",") if isinstance(pairs, str) else list(pairs):
            one = copy.deepcopy(task_cfg)
            one.lang_pairs = pair if isinstance(pairs, str) else [pair]
            one.source_lang, one.target_lang = pair.split("-")
            result.append((tuple(pair.split("-")), tasks.setup_task(one)))
        return result
    if name == "translation":
        task = tasks.setup_task(task_cfg)
        return [((task.cfg.source_lang, task.cfg.target_lang), task)]
    raise ValueError(
        f"task {name!r} is not supported: the routing log reads translation and "
        "translation_multi_simple_epoch checkpoints"
    )


def generation_options(**overrides):
    """fairseq-generate's generation options (``GenerationConfig``, its defaults) with
    ``overrides``, e.g. ``generation_options(beam=1, max_len_b=8)``."""
    from fairseq.dataclass.configs import GenerationConfig

    names = {f.name for f in fields(GenerationConfig) if not f.name.startswith("_")}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"not fairseq generation options: {unknown}")
    return GenerationConfig(**overrides)


def _positions(tokens, pad):
    """B x T token ids -> B x T position of each token among its row's non-padding tokens."""
    return (tokens.ne(pad).long().cumsum(1) - 1).clamp_min(0)


def chosen_experts(record) -> tuple[np.ndarray, np.ndarray]:
    """A record's experts per token, best first, and their combine weights (N x k each).

    Top-k: the k choices (``expert_index``, ``expert_weight``); dense routing: all E. Expert
    choice (``record.expert_choice``; ``expert_index`` N x E, ``keep`` N x E): the experts that
    took the token by decreasing weight, then -1 (weight 0) for those that did not, so a row of
    -1 is a token no expert took."""
    if not record.expert_choice:
        return record.expert_index.numpy(), record.expert_weight.float().numpy()
    keep = record.keep  # N x E
    weight = record.expert_weight.detach().float()  # N x E, 0 where not taken
    order = torch.argsort(weight.masked_fill(~keep, -1.0), dim=1, descending=True, stable=True)
    taken = keep.gather(1, order)  # N x E, the taken slots first
    experts = record.expert_index.gather(1, order).masked_fill(~taken, -1)
    return experts.numpy(), (weight.gather(1, order) * taken).numpy()


def routing_kind(record) -> str:
    """How a record's layer routed: its ``RoutingMode`` value (``topk``, ``dense`` or
    ``expert_choice``), the name the log stores."""
    return record.mode.value


def _pad_columns(arrays: list[np.ndarray], fill) -> np.ndarray:
    """Row-concatenate R_i x w_i arrays, padding each to the widest with ``fill``."""
    width = max(a.shape[1] for a in arrays)
    return np.concatenate(
        [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
    )


def records_to_rows(records, src_tokens, dec_tokens, pad, layer_ids) -> dict[str, np.ndarray]:
    """Token rows (one per routed token and layer) from a forward's ``MoERecord``s.

    ``src_tokens`` (B x S) and ``dec_tokens`` (B x T) are the encoder's and decoder's inputs;
    ``layer_ids`` maps a layer's module name to its index in the log. ``experts`` and
    ``weights`` are as wide as the widest layer's (``chosen_experts``), padded with -1 and 0."""
    rows = {key: [] for key in ("layer", "b", "position", "token", "experts", "weights", "entropy")}
    tokens_of = {"encoder": src_tokens, "decoder": dec_tokens}  # B x S, B x T
    positions_of = {side: _positions(tokens, pad) for side, tokens in tokens_of.items()}
    for record in records:
        side = layer_side(record.layer)
        T, B = record.input_shape  # time-major
        flat = record.token_index  # N: t * B + b
        if flat is None:
            flat = torch.arange(T * B)
        t, b = flat // B, flat % B
        rows["layer"].append(np.full(len(flat), layer_ids[record.layer]))
        rows["b"].append(b.numpy())
        rows["position"].append(positions_of[side][b, t].numpy())
        rows["token"].append(tokens_of[side][b, t].numpy())
        experts, weights = chosen_experts(record)  # N x k each
        rows["experts"].append(experts)
        rows["weights"].append(weights)
        rows["entropy"].append(record.token_entropy.float().numpy())  # N
    padded = {"experts": -1, "weights": 0.0}
    return {k: _pad_columns(v, padded[k]) if k in padded else np.concatenate(v)
            for k, v in rows.items()}  # fmt: skip


def generated_decoder_input(model, task, sample, generation):
    """Decoder inputs that reproduce the generator's best hypotheses (``[first token] +
    hypo[:-1]``, B x T padded) and the hypotheses; ``generation``: ``generation_options()``."""
    from fairseq.data import data_utils

    # The generator calls ``decoder.forward`` directly (no module hooks): watch its first call.
    first = {}
    forward = model.decoder.forward

    def watched(prev_output_tokens, *args, **kwargs):
        first.setdefault("t", prev_output_tokens[:, 0].clone())
        return forward(prev_output_tokens, *args, **kwargs)

    generator = task.build_generator([model], generation)
    model.decoder.forward = watched
    try:
        with torch.no_grad():
            hypos = task.inference_step(generator, [model], sample)
    finally:
        del model.decoder.forward
    bsz = sample["net_input"]["src_tokens"].size(0)
    starts = first["t"].view(bsz, -1)[:, 0]  # B: the first token of each sentence's beams
    seqs = [torch.cat([starts[i : i + 1], h[0]["tokens"][:-1]]) for i, h in enumerate(hypos)]
    pad = task.target_dictionary.pad()
    return data_utils.collate_tokens(seqs, pad, left_pad=False), [h[0]["tokens"] for h in hypos]


def _batches(task, split, max_tokens, max_sentences, shard=(0, 1)):
    """(the split's number of batches, this shard's batches with their index among all):
    shard ``(r, W)`` takes batches r, r + W, ... (fairseq's round-robin)."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    if len(dataset) == 0:
        raise ValueError(
            f"split {split!r} of {task.cfg.source_lang}-{task.cfg.target_lang} is empty"
        )
    rank, world = shard
    epoch = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=max_sentences, seed=1,
        required_batch_size_multiple=1, num_shards=world, shard_id=rank,
    )  # fmt: skip
    count = len(epoch.frozen_batches)
    batches = ((rank + world * j, b) for j, b in enumerate(epoch.next_epoch_itr(shuffle=False)))
    return count, ((i, b) for i, b in batches if i < count and "net_input" in b)


def _gather_shards(chunks, kinds):
    """Every process's chunks and layer kinds (after joining the others' expert exchanges until
    all have recorded)."""
    import torch.distributed as dist

    from ..modules import expert_parallel_lockstep
    from ..modules.expert_parallel import active_expert_parallel_groups

    expert_parallel_lockstep.finish(active_expert_parallel_groups())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (chunks, kinds))
    merged_chunks, merged_kinds = [], {}
    for c, k in gathered:
        merged_chunks += c
        merged_kinds.update(k)
    return merged_chunks, merged_kinds


def record_split(
    model, moe_layers, pairs, split, max_tokens, max_sentences, generation=None, shard=(0, 1)
):
    """Run ``split`` of every direction of ``pairs`` (``pair_tasks``) through the model.

    ``generation``: None for teacher forcing, else ``generation_options(...)`` to route the
    decoder on the generator's output. Returns the routing log's arrays and the hypotheses
    (``{"src-tgt:id": text}``, empty when teacher-forced). Besides the arrays
    ``routing_analysis.py`` requires, the log holds per layer ``layer_routing`` (``topk``,
    ``dense`` or ``expert_choice``), ``shared_experts`` (their number, 0 = none) and
    ``shared_gated``, and the batching (``max_tokens``, ``max_sentences``, -1 = none) and
    ``expert_capacity_factor`` that expert-choice routing depends on.

    ``shard`` ``(r, W)``: this process's share of the batches when W processes of one job record
    together (``fairseq-moe-usage`` under torchrun, experts sharded); every process then
    returns the whole log, its rows in the order one process would have written them."""
    layer_names = [m.name for m in moe_layers]
    layer_ids = {n: i for i, n in enumerate(layer_names)}
    is_decoder = np.array([layer_side(n) == "decoder" for n in layer_names])
    langs = sorted({lang for pair, _ in pairs for lang in pair})
    keys = ("layer", "sentence", "batch", "position", "token", "lang", "pair", "experts",
            "weights", "entropy")  # fmt: skip
    chunks, base, kinds = [], 0, {}  # (batch number, {key: rows}, {sentence: hypothesis})
    for p, ((src, tgt), task) in enumerate(pairs):
        pad = task.source_dictionary.pad()
        count, batches = _batches(task, split, max_tokens, max_sentences, shard)
        for index, sample in batches:
            batch_no = base + index
            net_input, batch_hypotheses = dict(sample["net_input"]), {}
            if generation is not None:
                net_input["prev_output_tokens"], hyps = generated_decoder_input(
                    model, task, sample, generation
                )
                for sid, h in zip(sample["id"].tolist(), hyps, strict=True):
                    batch_hypotheses[f"{src}-{tgt}:{sid}"] = task.target_dictionary.string(h)
            with torch.no_grad():
                _, extra = model(**net_input)
            for record in extra["moe_records"]:
                kinds.setdefault(record.layer, routing_kind(record))
            rows = records_to_rows(extra["moe_records"], net_input["src_tokens"],
                                   net_input["prev_output_tokens"], pad, layer_ids)  # fmt: skip
            n = len(rows["layer"])
            side_is_dec = is_decoder[rows["layer"]]
            chunk = {
                "layer": rows["layer"],
                "sentence": sample["id"].numpy()[rows["b"]],
                "batch": np.full(n, batch_no),
                "position": rows["position"],
                "token": rows["token"],
                "lang": np.where(side_is_dec, langs.index(tgt), langs.index(src)),
                "pair": np.full(n, p),
            }
            chunk.update({key: rows[key] for key in ("experts", "weights", "entropy")})
            chunks.append((batch_no, chunk, batch_hypotheses))
        base += count
    if shard[1] > 1:
        chunks, kinds = _gather_shards(chunks, kinds)
    chunks.sort(key=lambda c: c[0])  # the order one process records them in
    cols = {k: [chunk[k] for _, chunk, _ in chunks] for k in keys}
    hypotheses = {key: text for _, _, batch in chunks for key, text in batch.items()}
    dictionary = pairs[0][1].source_dictionary
    padded = {"experts": -1, "weights": 0.0}
    log = {k: _pad_columns(v, padded[k]) if k in padded else np.concatenate(v)
           for k, v in cols.items()}  # fmt: skip
    shared = [getattr(m, "shared", None) for m in moe_layers]
    gates = [m.gate for m in moe_layers]
    log.update(
        layer_names=np.array(layer_names), langs=np.array(langs),
        pairs=np.array([f"{s}-{t}" for (s, t), _ in pairs]),
        vocab=np.array([dictionary[i] for i in range(len(dictionary))]),
        num_experts=np.array(moe_layers[0].num_experts), k=np.array(moe_layers[0].gate.k),
        layer_routing=np.array([kinds.get(n, "topk") for n in layer_names]),
        shared_experts=np.array([0 if m is None else m.num_shared for m in shared]),
        shared_gated=np.array([m is not None and m.gate is not None for m in shared]),
        max_tokens=np.array(-1 if max_tokens is None else max_tokens),
        max_sentences=np.array(-1 if max_sentences is None else max_sentences),
        expert_capacity_factor=np.array(max(
            (g.expert_choice_factor for g in gates if g.expert_choice_factor is not None),
            default=0.0)),
    )  # fmt: skip
    for key in ("layer", "lang", "pair", "experts"):
        log[key] = log[key].astype(np.int16)
    return log, hypotheses

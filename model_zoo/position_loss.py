"""Held-out documents' loss by token position: the long-context curve. A model that uses its
context predicts later tokens better than early ones; one that does not stays flat, or climbs
past its trained length. Each document is scored alone from its first token, up to `seq_len`
tokens; by default only documents that fill the `seq_len` are scored, so that every position
bucket averages the same documents (shorter ones would weigh the early buckets only)."""

import json
import pathlib

import jax
import numpy as np
from tqdm import tqdm

from model_zoo.data import empty_batch
from model_zoo.loader import encode_record
from model_zoo.model import hidden_states, text_logits
from model_zoo.sharding import batch_sharding, check_mesh_shapes, global_batch
from model_zoo.train import cross_entropy


def bucket_edges(seq_len: int) -> list[int]:
    """0-512, 512-1K, 1K-2K, ... up to seq_len (for short rows, the same doubling from seq_len / 8)."""
    edges, edge = [0], min(512, max(1, seq_len // 8))
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


def _token_losses(params, batch, config):
    x = hidden_states(params, batch["inputs"], config=config, segment_ids=batch["segment_ids"],
                      positions=batch["positions"])
    return cross_entropy(text_logits(params, x), batch["targets"]) * batch["loss_mask"]


def scored_documents(documents, tokenizer, *, seq_len, min_tokens=None, max_documents=None):
    """(ids, loss mask) of the documents scored, in file order: those of at least `min_tokens`
    next-token pairs (default `seq_len`), at most `max_documents`; and how many were left out."""
    min_tokens = seq_len if min_tokens is None else min_tokens
    chosen, short = [], 0
    for index in range(len(documents)):
        if max_documents is not None and len(chosen) == max_documents:
            break
        ids, mask = encode_record(documents[index], tokenizer)
        if len(ids) - 1 < min_tokens:
            short += 1
        else:
            chosen.append((ids[: seq_len + 1], mask[: seq_len + 1]))
    if not chosen:
        raise ValueError(f"no document has {min_tokens} tokens ({short} shorter): lower --seq-len or --min-tokens")
    return chosen, short


def evaluate_position_loss(params, config, scored, *, mesh, seq_len, batch_size=2, progress=True, desc=None) -> dict:
    """Mean cross entropy per position bucket over `scored` (from `scored_documents`); positions a
    document does not reach count nothing."""
    check_mesh_shapes(config, dict(mesh.shape), batch_size, seq_len)
    count = len(scored)
    sums, tokens = np.zeros(seq_len), np.zeros(seq_len)
    step = jax.jit(_token_losses, static_argnums=2)
    sharding = batch_sharding(mesh)
    for start in tqdm(range(0, count, batch_size), disable=not progress, desc=desc, unit="batch"):
        batch = empty_batch(batch_size, seq_len)
        for row, index in enumerate(range(start, min(start + batch_size, count))):
            ids, mask = scored[index]
            n = min(len(ids) - 1, seq_len)
            batch["inputs"][row, :n] = ids[:n]
            batch["targets"][row, :n] = ids[1 : n + 1]
            batch["loss_mask"][row, :n] = mask[1 : n + 1]
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)
        losses = step(params, global_batch(batch, sharding), config)
        if jax.process_count() > 1:  # the rows and columns other processes hold
            from jax.experimental import multihost_utils

            losses = multihost_utils.process_allgather(losses, tiled=True)
        losses = np.asarray(losses)
        sums += losses.sum(axis=0)
        tokens += batch["loss_mask"].sum(axis=0)
    edges = bucket_edges(seq_len)
    buckets = [(lo, hi) for lo, hi in zip(edges, edges[1:])]
    bucket_tokens = [float(tokens[lo:hi].sum()) for lo, hi in buckets]
    bucket_loss = [float(sums[lo:hi].sum() / t) if t else None for (lo, hi), t in zip(buckets, bucket_tokens)]
    return {"buckets": buckets, "loss": bucket_loss, "tokens": bucket_tokens, "documents": count,
            "mean_loss": float(sums.sum() / max(tokens.sum(), 1))}


def _label(lo, hi):
    def short(n):
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


def format_table(results: dict) -> str:
    """One row per position bucket, one column per model: mean loss (and tokens scored)."""
    names = list(results)
    first = results[names[0]]
    header = "positions   | " + " | ".join(f"{n[-28:]:>28}" for n in names) + " | tokens"
    lines = [header, "-" * len(header)]
    for i, (lo, hi) in enumerate(first["buckets"]):
        cells = []
        for n in names:
            loss = results[n]["loss"][i]
            cells.append(f"{'-' if loss is None else f'{loss:.3f}':>28}")
        lines.append(f"{_label(lo, hi):>11} | " + " | ".join(cells) + f" | {int(first['tokens'][i]):,}")
    lines.append(f"{'all':>11} | " + " | ".join(f"{results[n]['mean_loss']:>28.3f}" for n in names)
                 + f" | {int(sum(first['tokens'])):,}")
    return "\n".join(lines)


def save_results(out_dir, results: dict, **settings):
    """loss.json and loss.png (loss against position bucket, a curve per model) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "loss.json").write_text(json.dumps(dict(settings, models=results), indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        points = [(i, loss) for i, loss in enumerate(result["loss"]) if loss is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name}: {result['mean_loss']:.3f}")
    buckets = next(iter(results.values()))["buckets"]
    ax.set_xticks(range(len(buckets)), [_label(lo, hi) for lo, hi in buckets])
    ax.set(xlabel="token position in the document", ylabel="cross entropy (nats / token)",
           title=f"held-out loss by position ({next(iter(results.values()))['documents']} documents)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)

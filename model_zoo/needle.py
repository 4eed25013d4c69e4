"""Needle-in-a-haystack retrieval, as LWM scores it: greedy answers, substring match, a grid of
context lengths x depths with several haystacks per cell; multi-needle with N hidden and R asked."""

import json
import pathlib

import numpy as np

from model_zoo.data import ANSWER_ROOM, needle_example
from model_zoo.generate import generate
from model_zoo.tokenizer import default_tokenizer


def evaluate_needles(params, config, *, lengths, depths, trials=4, num_needles=1, num_asked=1, seed=0,
                     tokenizer=None, on_cell=None):
    """Accuracy [len(lengths), len(depths)]: the fraction of asked numbers found in the answers.

    A context length counts the prompt and the room for the answer, as training rows do.
    """
    tokenizer = tokenizer or default_tokenizer()
    scores = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng([seed, length, int(depth * 1000)])
            examples = [
                needle_example(rng, length - ANSWER_ROOM * num_asked, depth=depth, num_needles=num_needles,
                               num_asked=num_asked, tokenizer=tokenizer)
                for _ in range(trials)
            ]
            answers = generate(params, [e.prompt for e in examples], config=config,
                               max_new_tokens=ANSWER_ROOM * num_asked, stop_tokens=(tokenizer.eos_id,))
            found = [sum(n in tokenizer.decode(a) for n in e.numbers) / len(e.numbers)
                     for e, a in zip(examples, answers)]
            scores[i, j] = np.mean(found)
            if on_cell is not None:
                on_cell(length, depth, scores[i, j], tokenizer.decode(answers[0]))
    return scores


def format_table(scores, lengths, depths) -> str:
    header = "context \\ depth | " + " | ".join(f"{d:.2f}" for d in depths) + " | mean"
    lines = [header, "-" * len(header)]
    for length, row in zip(lengths, scores):
        lines.append(f"{length:>15} | " + " | ".join(f"{s:4.2f}" for s in row) + f" | {row.mean():4.2f}")
    lines.append(f"overall accuracy: {scores.mean():.3f}")
    return "\n".join(lines)


def save_results(out_dir, scores, lengths, depths, **settings):
    """needle.json and needle.png (heatmap: context length x depth) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(settings, lengths=list(lengths), depths=list(depths), scores=scores.tolist(),
                  accuracy=float(scores.mean()))
    (out_dir / "needle.json").write_text(json.dumps(record, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(scores, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=8)
    title = f"needle retrieval, {settings.get('num_needles', 1)} hidden / {settings.get('num_asked', 1)} asked"
    title += f": {scores.mean():.2f}"
    if settings.get("positions_raised_to"):
        title += f"\npositions raised to {settings['positions_raised_to']}, no training"
    ax.set(xlabel="needle depth", ylabel="context length (tokens)", title=title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "needle.png", dpi=120)
    plt.close(fig)

"""The roofline of a benchmark run: a pytest-benchmark JSON file into a plot and a markdown table.

    python -m pytest bench --benchmark-json out.json
    python bench/roofline.py out.json                       # writes out_roofline.png and out_roofline.md
    python bench/roofline.py out.json --png roofline.png --md roofline.md

Each point is one benchmark: its arithmetic intensity (FLOPs by the FlashAttention convention over
the bytes a fused kernel must move, `ring_attn.cost`) against the FLOP/s it reached, per chip,
under the roofs of the peak FLOP/s and the memory bandwidth (the chip's spec sheet, or on a CPU
the ceilings measured in the same run). The suite (bench/conftest.py) also uses `rates`,
`peaks_line` and `markdown_table` for the table it prints at the end of a run.
"""

import argparse
import json
import pathlib

COLUMNS = ("benchmark", "mode", "B", "L", "H", "N:K", "causal", "ms", "TFLOP/s", "% peak", "GB/s", "% bandwidth",
           "ring efficiency")


def rates(flops, moved, seconds, peak_flops, peak_bytes_per_s):
    """The roofline figures of one timing: `moved` bytes, `seconds` its median."""
    return dict(median_s=seconds, tflops=flops / seconds / 1e12, pct_peak=100 * flops / seconds / peak_flops,
                gb_per_s=moved / seconds / 1e9, pct_bandwidth=100 * moved / seconds / peak_bytes_per_s,
                intensity=flops / moved)


def peaks_line(peaks):
    return (f"peak {_significant(peaks['flops_per_s'] / 1e12)} TFLOP/s, bandwidth "
            f"{_significant(peaks['bytes_per_s'] / 1e9)} GB/s a device "
            f"({peaks['source']}; {peaks['device_kind']}, jax {peaks['jax']}, {peaks['kernels']} kernels, profile "
            f"{peaks['profile']})")


def _significant(x):
    """Three significant digits, no exponent: 1746 -> 1746, 1.0 -> 1.00, 0.07312 -> 0.0731."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}"


def _cells(info):
    efficiency = info.get("ring_efficiency")
    return (
        info["candidate"], info["mode"], info["B"], info["L"], info["H"], f"{info['N']}:{info['K']}",
        "yes" if info["causal"] else "no", _significant(info["median_s"] * 1e3), _significant(info["tflops"]),
        f"{info['pct_peak']:.1f}", _significant(info["gb_per_s"]), f"{info['pct_bandwidth']:.1f}",
        "" if efficiency is None else f"{efficiency:.2f} (R={info['ring_size']})",
    )


def markdown_table(infos):
    """Lines of a markdown table, one row per timed benchmark's extra_info. Ring efficiency:
    R × the time of one ring step's kernel call on each device's own shard with no transfer, over
    the ring's time (1.00: the ring costs nothing beyond its compute)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in _cells(info)) + " |" for info in infos if "median_s" in info]
    return lines


def load(path):
    """(timed extra_infos in run order, peaks) of a --benchmark-json file."""
    data = json.loads(pathlib.Path(path).read_text())
    infos = [b["extra_info"] for b in data["benchmarks"] if "median_s" in b.get("extra_info", {})]
    if "roofline" not in data:
        raise SystemExit(f"{path} has no 'roofline' section: was it written by `python -m pytest bench`?")
    return infos, data["roofline"]


def plot(infos, peaks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.5))
    peak, bandwidth = peaks["flops_per_s"], peaks["bytes_per_s"]
    intensities = [i["intensity"] for i in infos] + [peak / bandwidth]  # the ridge in view
    x = np.logspace(np.log10(min(intensities) / 4), np.log10(max(intensities) * 4), 200)
    ax.loglog(x, np.minimum(peak, bandwidth * x), "k-", lw=1.5, label="roofs: peak FLOP/s, memory bandwidth")
    ax.axvline(peak / bandwidth, color="k", ls=":", lw=0.8)
    candidates = list(dict.fromkeys(i["candidate"] for i in infos))
    colours = dict(zip(candidates, plt.get_cmap("tab10").colors))
    markers = {"fwd": "o", "bwd": "s", "fwd+bwd": "^"}
    for candidate in candidates:
        for mode, marker in markers.items():
            points = [i for i in infos if i["candidate"] == candidate and i["mode"] == mode]
            if points:
                ax.loglog([p["intensity"] for p in points], [p["flops"] / p["median_s"] / p["chips"] for p in points],
                          marker, color=colours[candidate], alpha=0.8, label=f"{candidate} {mode}")
    ax.set_xlabel("FLOPs per byte (bytes a fused kernel moves)")
    ax.set_ylabel("FLOP/s per chip (on CPU: the whole host)")
    ax.set_title(f"{peaks['device_kind']}: {peaks['source']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file written by python -m pytest bench --benchmark-json FILE")
    parser.add_argument("--png", help="the plot (default: FILE's name with _roofline.png)")
    parser.add_argument("--md", help="the markdown table (default: FILE's name with _roofline.md)")
    args = parser.parse_args(argv)
    source = pathlib.Path(args.json)
    infos, peaks = load(source)
    if not infos:
        raise SystemExit(f"{source} holds no timed benchmark (was it run with --benchmark-disable?)")
    png = pathlib.Path(args.png or source.with_name(source.stem + "_roofline.png"))
    md = pathlib.Path(args.md or source.with_name(source.stem + "_roofline.md"))
    plot(infos, peaks, png)
    text = "\n".join([peaks_line(peaks), "", *markdown_table(infos)]) + "\n"
    md.write_text(text)
    print(text)
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    main()

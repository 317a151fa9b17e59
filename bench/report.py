"""Turn a pytest-benchmark JSON into a roofline chart (PNG) and a markdown table.

    python bench/report.py out.json --png roofline.png --md table.md

Left panel: the roofline of the device the JSON was measured on (``peak_flops`` and
``peak_bandwidth`` from ``extra_info``: a datasheet entry on CUDA, in-session measurements on the
CPU), with each op placed at its analytic arithmetic intensity (``analytic_flops /
bytes_moved``) and achieved FLOP/s. Right panel: bars of the fraction of the relevant roof each
benchmark reaches: bandwidth for ops with ``bytes_moved``, MFU for train steps. The table lists
every benchmark of the suite's ops (median time, GB/s, FLOP/s, MFU, tokens/s, measured/analytic
FLOPs); other benchmarks in the JSON (e.g. the tokenizer's) get name and median time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cs336.fileio import atomic_open, atomic_write_text


def load(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(_fail(f"{path}: no such file; pass the file written by "
                               "`pytest bench --benchmark-json out.json`")) from None
    except json.JSONDecodeError as exc:
        raise SystemExit(_fail(f"{path} is not JSON ({exc}); pass a pytest-benchmark JSON")) from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SystemExit(_fail(f"{path} has no 'benchmarks' list; is it a pytest-benchmark JSON?"))
    return data["benchmarks"]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "" if value is None else f"{value / scale:.{digits}g}"


def markdown(benchmarks: list[dict]) -> str:
    ops = [b for b in benchmarks if "op" in b.get("extra_info", {})]
    others = [b for b in benchmarks if "op" not in b.get("extra_info", {})]
    lines = []
    devices = sorted({b["extra_info"].get("device", "?") for b in benchmarks})
    for device in devices:
        rows = [b for b in ops if b["extra_info"].get("device") == device]
        if not rows:
            continue
        info = rows[0]["extra_info"]
        lines += [f"Device: {device}; torch {info.get('torch')}, triton {info.get('triton')}; "
                  f"peak: {info.get('peak_source', 'n/a')} = {_fmt(info.get('peak_flops'), 1e9)} "
                  f"GFLOP/s, {_fmt(info.get('peak_bandwidth'), 1e9)} GB/s", "",
                  "| op | shape | pass | provider | dtype | median ms | GB/s | % BW | GFLOP/s | MFU "
                  "| tokens/s | measured / analytic matmul FLOPs |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for b in sorted(rows, key=lambda b: (b["extra_info"]["op"], b["extra_info"].get("shape", ""),
                                             b["extra_info"].get("pass", ""), b["extra_info"]["provider"])):
            e = b["extra_info"]
            median = b["stats"]["median"]
            flop_rate = e.get("achieved_flops_per_s")
            frac = e.get("bandwidth_fraction")
            measured = ""
            if "measured_flops" in e:
                analytic = e.get("analytic_matmul_flops", e.get("analytic_flops"))
                measured = f"{e['measured_flops']:,} / {analytic:,}"
            pct_bw = "" if frac is None else f"{100 * frac:.1f}"
            mfu = "" if "mfu" not in e else f"{100 * e['mfu']:.2f}%"
            dtype = e.get("dtype", "").replace("torch.", "")
            lines.append(
                f"| {e['op']} | {e.get('shape', '')} | {e.get('pass', '')} | {e['provider']} | "
                f"{dtype} | {median * 1e3:.4g} | {_fmt(e.get('gbps'))} | {pct_bw} | "
                f"{_fmt(flop_rate, 1e9)} | {mfu} | {_fmt(e.get('tokens_per_s'), 1, 4)} | {measured} |")
        lines.append("")
        pairs = [b["extra_info"] for b in rows if "speed_ratio" in b["extra_info"]]
        if pairs:
            lines += ["| train step vs nanoGPT | shape | batch | project tokens/s | nanoGPT tokens/s | "
                      "ratio (nanoGPT time / project time) |", "|---|---|---:|---:|---:|---:|"]
            lines += [f"| {e['mode']} ({e['provider']}) | {e['shape']} | {e['batch_size']} | "
                      f"{_fmt(e['tokens_per_s'], 1, 4)} | {_fmt(e['nanogpt_tokens_per_s'], 1, 4)} | "
                      f"{e['speed_ratio']:.3f} |" for e in pairs]
            lines.append("")
    if others:
        lines += ["| other benchmark | median s |", "|---|---:|"]
        lines += [f"| {b['name']} | {b['stats']['median']:.4g} |" for b in others]
        lines.append("")
    return "\n".join(lines)


def plot(benchmarks: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [b["extra_info"] for b in benchmarks if "op" in b.get("extra_info", {})
           and "median_s" in b["extra_info"]]
    if not ops:
        raise SystemExit(_fail("no timed benchmarks of the suite's ops in the JSON (was it run "
                               "with --benchmark-disable?)"))
    fig, (roof_ax, bar_ax) = plt.subplots(1, 2, figsize=(15, max(5, 0.22 * len(ops))))
    peak_f, peak_b = ops[0].get("peak_flops"), ops[0].get("peak_bandwidth")
    points = [e for e in ops if e.get("bytes_moved") and e.get("analytic_flops")]
    if peak_f and peak_b:
        xs = [2.0 ** (k / 8) for k in range(-48, 97)]  # 1/64 .. 4096 FLOP/byte
        roof_ax.loglog(xs, [min(peak_f, x * peak_b) for x in xs], "k-", label="roof (peak)")
    markers = {"torch": "o", "native": "D", "compile": "s", "triton": "^"}
    for op in sorted({e["op"] for e in points}):
        for provider, marker in markers.items():
            sel = [e for e in points if e["op"] == op and e["provider"] == provider]
            if sel:
                roof_ax.loglog([e["analytic_flops"] / e["bytes_moved"] for e in sel],
                               [e["achieved_flops_per_s"] for e in sel], marker, linestyle="none",
                               label=f"{op} ({provider})", alpha=0.8)
    roof_ax.set_xlabel("arithmetic intensity (analytic FLOP / minimal byte)")
    roof_ax.set_ylabel("achieved FLOP/s")
    roof_ax.set_title(f"roofline: {ops[0].get('device', '')}", fontsize=9)
    roof_ax.legend(fontsize=6, loc="lower right")
    bars = [(f"{e['op']} {e.get('shape', '')} {e.get('pass', '')} {e['provider']}",
             e.get("mfu", e.get("bandwidth_fraction"))) for e in ops]
    bars = [(label, v) for label, v in bars if v is not None]
    bar_ax.barh([label for label, _ in bars], [100 * v for _, v in bars],
                color=["tab:red" if "train_step" in label else "tab:blue" for label, _ in bars])
    bar_ax.set_xlabel("% of roof: bandwidth (blue, memory-bound ops) or MFU (red, train steps)")
    bar_ax.tick_params(axis="y", labelsize=6)
    bar_ax.invert_yaxis()
    fig.tight_layout()
    with atomic_open(png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="pytest-benchmark JSON (pytest bench --benchmark-json)")
    p.add_argument("--png", type=Path, default=None, help="write the roofline/bar chart here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here (default: print)")
    args = p.parse_args(argv)
    benchmarks = load(args.json)
    table = markdown(benchmarks)
    if args.md is None:
        print(table)
    else:
        atomic_write_text(args.md, table)
    if args.png is not None:
        plot(benchmarks, args.png)


if __name__ == "__main__":
    main()

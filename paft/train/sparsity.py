"""How sparse are fine-tuning deltas? (PAFT: DPO deltas are naturally sparse, SFT deltas dense; L1 sparsifies SFT.)

For each named input (a peft LoRA adapter folder or a full fine-tuned model folder, both from the same
base) the delta ``δ`` of every tensor it changes (LoRA: ``B·A·scale``; full model: ``tuned - base``; see
:mod:`paft.merge.deltas`) is measured against two thresholds:

* absolute: ``|δ| <= eps_abs``;
* relative: ``|δ| <= eps_rel * scale``, where ``scale`` is the mean absolute value of the corresponding
  **base** weight tensor (``mean(|W_base|)``, one number per tensor). It puts a change in proportion to
  the size of the weights it changes: an RMSNorm weight (around 1) and a projection (around 0.02) get
  thresholds that differ by the same factor. A base tensor that is all zeros has ``scale = 0``, so
  there the relative test counts exact zeros only.

Per tensor (module) and overall the report gives the number of entries, the share of entries under each
threshold, mean / max ``|δ|``, and the L1 and L2 norms of ``δ``. **Overall figures are entry-weighted over
the tensors that have a delta**: a LoRA adapter is measured on the modules it targets only (a full model
on every tensor); ``coverage`` says what share of the base's entries that is. Non-finite delta entries
are counted (``nonfinite``) and left out of the norms, the mean and the max.

Memory stays bounded by one tensor: the deltas are computed one tensor at a time from memory-mapped
safetensors (the base and full models) and the LoRA factors, never all at once. The histograms use a
random sample (fixed seed) of at most about ``HIST_SAMPLE`` entries per input, drawn from every tensor in
proportion to its size.

Output folder (written atomically): ``sparsity.json`` (the report), ``hist_<name>.png`` per input
(``log10(|δ| + TINY)``, y on a log scale, vertical line at ``eps_abs``), ``hist_all.png`` (all inputs overlaid).
The report also holds the histogram data the PNGs plot, so other renderers (the experiment page's SVG charts)
draw the same bars: ``histograms = {name: {"edges": [101 bin edges, common to every input], "shares": [100
shares], "samples": n}}``, each share the number of the input's ``n`` finite sampled values in that bin over
``n`` (so the shares of an input sum to 1; all zeros for an input without entries).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from paft.errors import PaftError
from paft.io import atomic_dir, write_json
from paft.merge.deltas import delta_items, is_adapter
from paft.merge.tensors import ModelWeights

REPORT_FILE = "sparsity.json"
HIST_SAMPLE = 2_000_000  # entries per input drawn for the histograms (about; each tensor gets its share)
TINY = 1e-12  # added before log10: exact zeros land at log10(TINY) = -12
SEED = 0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DEFINITIONS = {
    "share_abs": "share of entries with |delta| <= eps_abs",
    "share_rel": "share of entries with |delta| <= eps_rel * scale",
    "scale": "mean |W| of the corresponding base weight tensor (one number per tensor)",
    "mean_abs": "mean |delta| over the finite entries",
    "max_abs": "max |delta| over the finite entries",
    "l1": "sum |delta| (finite entries)",
    "l2": "sqrt(sum delta^2) (finite entries)",
    "overall": "entry-weighted over the tensors that have a delta (a LoRA adapter: its target modules only; "
               "with skip_unchanged, not the tensors whose delta is zero everywhere: unchanged_tensors)",
    "coverage": "entries with a delta / entries of the base",
    "histograms": f"log10(|delta| + {TINY:g}) over a random sample of at most ~{HIST_SAMPLE} entries per input: "
                  "edges (common bins), shares (finite sampled entries per bin / samples; they sum to 1), "
                  "samples (finite sampled entries)",
}


def iter_deltas(base_dir: str | Path, input_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(base weight name, float32 delta)`` one tensor at a time, sorted by name (same values as
    :func:`paft.merge.deltas.load_deltas`, without holding them all)."""
    for it in delta_items(ModelWeights(base_dir), input_dir):
        yield it.name, it.load()


# ----------------------------------------------------------------------------- statistics
def _tensor_stats(delta: torch.Tensor, scale: float, eps_abs: float, eps_rel: float) -> dict:
    a = delta.detach().reshape(-1).abs()
    n = a.numel()
    finite = torch.isfinite(a)
    nonfinite = n - int(finite.sum())
    fa = a[finite] if nonfinite else a
    return {
        "entries": n,
        "n_abs": int((a <= eps_abs).sum()),
        "n_rel": int((a <= eps_rel * scale).sum()),
        "nonfinite": nonfinite,
        "l1": float(fa.sum(dtype=torch.float64)),
        "l2sq": float(torch.linalg.vector_norm(fa, 2, dtype=torch.float64) ** 2) if fa.numel() else 0.0,
        "max_abs": float(fa.max()) if fa.numel() else 0.0,
    }


def _finish(s: dict) -> dict:
    """Raw sums → the reported figures."""
    n, finite = s["entries"], s["entries"] - s["nonfinite"]
    return {
        "entries": n,
        "share_abs": s["n_abs"] / n if n else None,
        "share_rel": s["n_rel"] / n if n else None,
        "mean_abs": s["l1"] / finite if finite else None,
        "max_abs": s["max_abs"],
        "l1": s["l1"],
        "l2": math.sqrt(s["l2sq"]),
        "nonfinite": s["nonfinite"],
    }


def _sample_abs(delta: torch.Tensor, k: int, gen: torch.Generator) -> np.ndarray:
    flat = delta.detach().reshape(-1)
    if k < flat.numel():
        flat = flat[torch.randint(flat.numel(), (k,), generator=gen)]
    return torch.log10(flat.abs().double() + TINY).float().numpy()


# ----------------------------------------------------------------------------- plots
def _bins(samples: Mapping[str, np.ndarray]) -> np.ndarray:
    vals = [v[np.isfinite(v)] for v in samples.values() if v.size]
    vals = [v for v in vals if v.size]
    lo = min((float(v.min()) for v in vals), default=math.log10(TINY))
    hi = max((float(v.max()) for v in vals), default=0.0)
    if hi - lo < 1:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, 101)


def _histogram(v: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, int]:
    """(share of the finite values per bin, number of finite values): what the PNGs and ``histograms`` show."""
    v = v[np.isfinite(v)]
    if not v.size:
        return np.zeros(len(bins) - 1), 0
    shares, _ = np.histogram(v, bins=bins, weights=np.full(v.shape, 1.0 / v.size))
    return shares, int(v.size)


def _plot(path: Path, hists: Mapping[str, dict], eps_abs: float, title: str) -> None:
    """``hists``: entries of the report's ``histograms`` (common edges)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    overlay = len(hists) > 1
    for name, h in hists.items():
        if h["samples"]:
            ax.stairs(h["shares"], h["edges"], label=name, fill=not overlay, alpha=1.0 if overlay else 0.7,
                      linewidth=1.4)
    if eps_abs > 0:
        ax.axvline(math.log10(eps_abs), color="k", linestyle="--", linewidth=1, label=f"eps_abs = {eps_abs:g}")
    ax.set_xlabel(f"log10(|δ| + {TINY:g})   (exact zeros at {math.log10(TINY):g})")
    ax.set_yscale("log")  # the spike of (near-)zeros would flatten everything else on a linear axis
    largest = max((h["samples"] for h in hists.values()), default=0)
    if largest:
        ax.set_ylim(bottom=0.5 / largest, top=1.5)
    ax.set_ylabel("share of sampled entries (log scale)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


# ----------------------------------------------------------------------------- report
def _check(base_dir: Path, inputs: Mapping[str, str | Path], eps_abs: float, eps_rel: float) -> dict[str, Path]:
    if not inputs:
        raise PaftError("sparsity needs at least one delta input")
    for label, v in (("eps_abs", eps_abs), ("eps_rel", eps_rel)):
        if not (math.isfinite(v) and v >= 0):
            raise PaftError(f"{label} must be a finite number >= 0, got {v}")
    if not base_dir.is_dir():
        raise PaftError(f"{base_dir}: base model folder does not exist")
    out = {}
    for name, path in inputs.items():
        if not _NAME_RE.match(str(name)) or name == "all":
            raise PaftError(
                f"input name {name!r} is not usable in a file name (letters, digits, '.', '_', '-'; not 'all')"
            )
        path = Path(path)
        if not path.is_dir():
            raise PaftError(f"{path}: delta input folder does not exist")
        out[str(name)] = path
    return out


def sparsity_report(
    base_dir: str | Path,
    inputs: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    eps_abs: float = 1e-5,
    eps_rel: float = 1e-3,
    hist_sample: int = HIST_SAMPLE,
    seed: int = SEED,
    skip_unchanged: bool = False,
) -> dict:
    """Measure the sparsity of each input's deltas against ``base_dir``; write ``out_dir`` atomically.

    ``inputs`` maps a name (used in the report and the file names) to an adapter or full-model folder.
    ``skip_unchanged``: leave out the tensors whose delta is zero everywhere (counted as ``unchanged_tensors``),
    e.g. every tensor a merge of LoRA adapters leaves as the base's, so that a merged model is measured on the
    modules its inputs changed, as the adapters are. Returns the report (as written to ``sparsity.json``) plus ``out_dir`` and ``files`` (absolute paths:
    ``json``, ``hist`` {name: png}, ``hist_all``). Everything is checked (folders, names, tensor names
    and shapes) before anything is written; a failure leaves no output behind.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    inputs = _check(base_dir, inputs, float(eps_abs), float(eps_rel))
    eps_abs, eps_rel = float(eps_abs), float(eps_rel)

    base = ModelWeights(base_dir)
    base_entries = sum(math.prod(base.shape(n)) for n in base.names())
    plans = {name: delta_items(base, path) for name, path in inputs.items()}  # validate all first

    scales: dict[str, float] = {}
    overall: dict[str, dict] = {}
    modules: dict[str, dict[str, dict]] = {}
    samples: dict[str, np.ndarray] = {}
    for name, items in plans.items():
        total = sum(math.prod(it.shape) for it in items)
        gen = torch.Generator().manual_seed(seed)
        acc = {"entries": 0, "n_abs": 0, "n_rel": 0, "nonfinite": 0, "l1": 0.0, "l2sq": 0.0, "max_abs": 0.0}
        per: dict[str, dict] = {}
        parts = []
        unchanged = 0
        for it in items:
            if it.name not in scales:
                w = base.get(it.name).float()
                scales[it.name] = float(w.abs().sum(dtype=torch.float64)) / w.numel() if w.numel() else 0.0
                del w
            delta = it.load()
            if skip_unchanged and not delta.any():
                unchanged += 1
                continue
            st = _tensor_stats(delta, scales[it.name], eps_abs, eps_rel)
            for k in ("entries", "n_abs", "n_rel", "nonfinite", "l1", "l2sq"):
                acc[k] += st[k]
            acc["max_abs"] = max(acc["max_abs"], st["max_abs"])
            per[it.name] = {"shape": list(it.shape), "scale": scales[it.name], **_finish(st)}
            if total and delta.numel():
                k = delta.numel() if total <= hist_sample else math.ceil(hist_sample * delta.numel() / total)
                parts.append(_sample_abs(delta, k, gen))
            del delta
        overall[name] = {"tensors": len(items) - unchanged, "unchanged_tensors": unchanged, **_finish(acc),
                         "coverage": acc["entries"] / base_entries if base_entries else None}
        modules[name] = per
        samples[name] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    report = {
        "base": str(base_dir),
        "inputs": {n: {"path": str(p), "kind": "lora" if is_adapter(p) else "full"} for n, p in inputs.items()},
        "eps_abs": eps_abs,
        "eps_rel": eps_rel,
        "skip_unchanged": skip_unchanged,
        "base_entries": base_entries,
        "hist_sample": hist_sample,
        "seed": seed,
        "definitions": DEFINITIONS,
        "overall": overall,
        "modules": modules,
        "histograms": {},
        "files": {"json": REPORT_FILE, "hist": {n: f"hist_{n}.png" for n in inputs}, "hist_all": "hist_all.png"},
    }
    bins = _bins(samples)
    for name, v in samples.items():
        shares, n = _histogram(v, bins)
        report["histograms"][name] = {"edges": bins.tolist(), "shares": shares.tolist(), "samples": n}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / REPORT_FILE, report)
        hists = report["histograms"]
        for name, o in overall.items():
            share = "n/a" if o["share_abs"] is None else f"{100 * o['share_abs']:.2f}%"
            _plot(tmp / f"hist_{name}.png", {name: hists[name]}, eps_abs, f"{name}: |δ| ≤ {eps_abs:g} for {share}")
        _plot(tmp / "hist_all.png", hists, eps_abs, "fine-tuning deltas, all inputs")

    files = {
        "json": str(out_dir / REPORT_FILE),
        "hist": {n: str(out_dir / f"hist_{n}.png") for n in inputs},
        "hist_all": str(out_dir / "hist_all.png"),
    }
    return {**report, "out_dir": str(out_dir), "files": files}


def format_table(report: Mapping) -> str:
    """Markdown table of the overall figures: input, entries, share ≤ eps_abs, share ≤ eps_rel·scale, mean |δ|."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [
        f"| input | entries | share ≤ eps_abs ({report['eps_abs']:g}) "
        f"| share ≤ eps_rel·scale ({report['eps_rel']:g}) | mean \\|δ\\| |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, o in report["overall"].items():
        mean = "n/a" if o["mean_abs"] is None else f"{o['mean_abs']:.3g}"
        lines.append(f"| {name} | {o['entries']:,} | {pct(o['share_abs'])} | {pct(o['share_rel'])} | {mean} |")
    return "\n".join(lines)

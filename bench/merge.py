#!/usr/bin/env python
"""paft's merge engine against mergekit 0.1.5 and an I/O floor, side by side in one run, on ~0.5B-parameter models.

    .venv/bin/python bench/merge.py                                  # full scale (478M params, bf16): several minutes
    .venv/bin/python bench/merge.py --scale small --rounds 1         # ~27M params: a smoke run, under a minute
    .venv/bin/python bench/merge.py --ours-kwargs '{"tie_break": "index"}' --methods ties

Models (built once, cached in --cache-dir, default bench/.cache/merge-<scale>): a random Llama base in bf16
(``LlamaConfig``, untied embeddings, saved sharded with an index) and two "fine-tuned" variants, built tensor by
tensor from the base's shards: ``dense`` = base + N(0, 0.002) on every entry, ``sparse`` = base + N(0, 0.01) on a
random 10% of the entries of each tensor (both rounded to bf16).

Contenders, each in its own process, started by a small launcher process (a child's ru_maxrss counts the memory of
the process it was forked from): wall clock from spawn to exit (imports included); peak memory = the larger of the
process's ru_maxrss (os.wait4) and the summed RSS of its process tree, polled every 50 ms:
  ours       ``paft.merge.merge_models(base, [dense, sparse], method, out, **--ours-kwargs)``, weights 1.0,
             density 0.2 for ties (1.0 for task_arithmetic), every other option at its default (so it also
             writes a model card with the sha256 of every input file, hashed afresh in every run)
  mergekit   ``mergekit-yaml config.yml out --no-copy-tokenizer --no-write-model-card --quiet`` (CPU, defaults
             otherwise), the same models, weights and densities, ``dtype: bfloat16``
  I/O floor  reads every byte of the three models' safetensors files and writes a copy of the base's (one output of
             the same size); method-independent, run once per round
Before timing, every input file is read once (page cache). Each round runs every contender once, in an order that
alternates between rounds; the tables give the median wall time and the largest peak. After each run the output is
deleted (but for the last ours / mergekit output of each method) and the page cache is synced, untimed. Then ours
and mergekit's outputs are compared entry by entry with tests/test_merge_mergekit.py's rule: equal within bf16
rounding (<= 4 bf16 ulps of the largest operand), and for ties, the others explained by a tie at the density
threshold. Results (markdown + JSON of every raw number, logs, mergekit configs) go to bench/results/merge-<stamp>/.

Measured earlier for mergekit 0.1.5 on 3 x 478M-param bf16 models: ties 70.2 s, 4.56 GB peak; task_arithmetic
15.4 s, 4.41 GB; I/O floor 1.75 s. Goals: ours >= 5x faster than mergekit for ties, >= 2x for task_arithmetic, peak
memory <= half of mergekit's, wall time within 4x of the I/O floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from common import ROOT  # noqa: E402  (project on the path, quiet libraries)

BIN = Path(sys.executable).parent
SCALES = {  # LlamaConfig fields; shard = save_pretrained's max_shard_size
    "full": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4224, "num_attention_heads": 16,
             "vocab_size": 32000, "shard": "200MB"},  # 477.7M parameters
    "small": {"hidden_size": 512, "num_hidden_layers": 6, "intermediate_size": 1408, "num_attention_heads": 8,
              "vocab_size": 8000, "shard": "20MB"},  # 27.5M parameters
}
VARIANTS = {"dense": (1, 0.002, 1.0), "sparse": (2, 0.01, 0.1)}  # name: (seed, delta sd, share of entries changed)
DENSITY = {"ties": 0.2, "task_arithmetic": 1.0}
SPEED_GOAL = {"ties": 5.0, "task_arithmetic": 2.0}  # mergekit's wall / ours
PEAK_GOAL, FLOOR_GOAL = 0.5, 4.0  # ours' peak / mergekit's; ours' wall / the I/O floor's
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
ULPS = 4  # tests/test_merge_mergekit.py: equal within bf16 rounding
CONTENDERS = ("ours", "mergekit")


def weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder (headers only)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


def build(cache: Path, scale: str) -> dict:
    """base, dense and sparse under ``cache`` (kept while the spec is the same); returns the build info."""
    spec = SCALES[scale]
    marker = cache / "built.json"
    if marker.is_file() and (info := json.loads(marker.read_text()))["spec"] == spec:
        return info | {"cached": True}
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    shutil.rmtree(cache, ignore_errors=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in spec.items() if k != "shard"}, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = model.num_parameters()
    model.save_pretrained(cache / "base", max_shard_size=spec["shard"])
    del model
    for name, (seed, sd, share) in VARIANTS.items():  # one base shard at a time
        g, dst = torch.Generator().manual_seed(seed), cache / name
        dst.mkdir()
        for f in sorted((cache / "base").iterdir()):
            if f.suffix != ".safetensors":
                shutil.copy2(f, dst / f.name)  # config.json, generation_config.json, the index
                continue
            tensors = {}
            with safe_open(str(f), framework="pt") as h:
                for key in sorted(h.keys()):
                    w = h.get_tensor(key)
                    d = torch.randn(w.shape, generator=g) * sd
                    if share < 1:
                        d = d * (torch.rand(w.shape, generator=g) < share)
                    tensors[key] = (w.float() + d).to(w.dtype)
                meta = h.metadata() or {"format": "pt"}
            save_file(tensors, str(dst / f.name), metadata=meta)
    files = sorted((cache / "base").glob("*.safetensors"))
    info = {"spec": spec, "params": params, "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}
    marker.write_text(json.dumps(info) + "\n")
    return info | {"cached": False}


def read_all(models: list[str], out: str | None = None) -> None:
    """Read every byte of the models' safetensors files; with ``out``, write a copy of the first model's there."""
    view = memoryview(bytearray(64 << 20))
    if out:
        os.makedirs(out)
    for i, m in enumerate(models):
        for f in sorted(Path(m).glob("*.safetensors")):
            dst = open(Path(out) / f.name, "wb") if out and i == 0 else None
            with open(f, "rb", buffering=0) as src:
                while n := src.readinto(view):
                    if dst:
                        dst.write(view[:n])
            if dst:
                dst.close()


def run_ours(job: dict) -> None:
    import tempfile

    # the model card's input hashes are remembered across merges (paft.merge.card): start cold every run,
    # so each run pays the hashing a first merge of these inputs pays
    os.environ["PAFT_HASH_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="bench-hashes-"), "sha256.json")
    t = time.perf_counter()
    from paft.merge import MergeInput, merge_models

    t1 = time.perf_counter()
    inputs = [MergeInput(p, weight=1.0, density=job["density"]) for p in job["inputs"]]
    merge_models(job["base"], inputs, job["method"], job["out"], **job["kwargs"])
    print("BENCH " + json.dumps({"import_s": t1 - t, "merge_s": time.perf_counter() - t1}), flush=True)


def command(contender: str, method: str | None, cache: Path, out: Path, work: Path, kwargs: dict) -> list[str]:
    models = [str(cache / m) for m in ("base", *VARIANTS)]
    if contender == "floor":
        return [sys.executable, __file__, "--_run-floor", json.dumps({"inputs": models, "out": str(out)})]
    if contender == "ours":
        job = {"base": models[0], "inputs": models[1:], "method": method, "out": str(out),
               "density": DENSITY[method], "kwargs": kwargs}
        return [sys.executable, __file__, "--_run-ours", json.dumps(job)]
    import yaml

    params = lambda: {"weight": 1.0} | ({"density": DENSITY[method]} if DENSITY[method] < 1 else {})  # noqa: E731
    cfg = {"merge_method": method, "base_model": models[0], "dtype": "bfloat16",
           "models": [{"model": m, "parameters": params()} for m in models[1:]]}
    (work / f"mergekit-{method}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return [str(BIN / "mergekit-yaml"), str(work / f"mergekit-{method}.yml"), str(out), *MERGEKIT_OPTIONS]


def launch(cmd: list[str], log: Path) -> dict:
    """``measure(cmd, log)`` in a small launcher process: a child's ru_maxrss counts its parent's peak RSS (the
    memory it was forked from, up to exec), and this process holds torch and the models it built."""
    job = json.dumps({"cmd": cmd, "log": str(log)})
    r = subprocess.run([sys.executable, __file__, "--_measure", job], cwd=ROOT, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(cmd: list[str], log: str) -> dict:
    """Run ``cmd``: wall seconds, peak memory (bytes: ru_maxrss, polled tree RSS), and ours' own timings."""
    import psutil

    peak, done = [0], threading.Event()

    def poll(pid: int) -> None:
        while not done.wait(0.05):
            try:
                proc = psutil.Process(pid)
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for q in procs:
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)

    log = Path(log)
    with log.open("w") as fh:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        th = threading.Thread(target=poll, args=(p.pid,), daemon=True)
        th.start()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        done.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if p.returncode:
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        sys.exit(f"exit {p.returncode} (log {log}): {tail}")
    out = {"wall": wall, "peak": max(usage.ru_maxrss * 1024, peak[0]), "maxrss": usage.ru_maxrss * 1024,
           "tree_rss": peak[0]}
    for line in text.splitlines():
        if line.startswith("BENCH "):
            out |= json.loads(line[6:])
    return out


def agreement(cache: Path, ours: Path, theirs: Path, density: float) -> dict:
    """tests/test_merge_mergekit.py's comparison, one tensor at a time (weights 1, lambda 1 here)."""
    import torch
    from safetensors import safe_open

    def get(index: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(index[name]), framework="pt") as h:
            return h.get_tensor(name)

    base, o, t = weight_map(cache / "base"), weight_map(ours), weight_map(theirs)
    inputs = [weight_map(cache / v) for v in VARIANTS]
    if set(o) != set(base) or set(t) != set(base):
        return {"error": f"tensor names differ: ours {len(o)}, mergekit {len(t)}, base {len(base)}"}
    total = others = ties = 0
    for name in sorted(base):
        a, m = get(o, name).reshape(-1), get(t, name).reshape(-1)
        total += a.numel()
        idx = (a != m).nonzero().squeeze(1)  # only the entries that differ can be beyond rounding
        if not idx.numel():
            continue
        b, ins = get(base, name).reshape(-1), [get(i, name).reshape(-1) for i in inputs]
        a, m, bf = a[idx].float(), m[idx].float(), b[idx].float()  # bf16 values: exact in float32
        scale = bf.abs()  # the largest operand or result of the final base + merged delta (weights 1, lambda 1)
        for x in (a.abs(), m.abs(), (a - bf).abs_(), (m - bf).abs_(), sum((x[idx].float() - bf).abs_() for x in ins)):
            torch.maximum(scale, x, out=scale)
        _, exp = torch.frexp(scale.clamp_(min=torch.finfo(torch.bfloat16).tiny))  # scale in [2^(e-1), 2^e)
        bad = idx[(a - m).abs_() > torch.ldexp(torch.full_like(scale, ULPS), exp - 8)]  # bf16 ulp: 2^(e-8)
        others += bad.numel()
        if bad.numel() and density < 1:  # top-k threshold ties: |delta| (formed in bf16) == its k-th largest
            tied = torch.zeros(bad.numel(), dtype=torch.bool)
            for x in ins:
                d = (x - b).abs().float()
                thr = torch.kthvalue(d, d.numel() - max(1, int(density * d.numel())) + 1).values
                if thr > 0:
                    tied |= d[bad] == thr
            ties += int(tied.sum())
    return {"entries": total, "within_rounding": total - others, "others": others, "threshold_ties": ties}


def agreement_line(method: str, r: dict) -> str:
    if "error" in r:
        return f"{method}: {r['error']}"
    line = f"{method}: {r['within_rounding'] / r['entries']:.4%} equal within bf16 rounding"
    if not r["others"]:
        return line + " (all)"
    if DENSITY[method] < 1:
        return line + f"; of the {r['others']} others, {r['threshold_ties'] / r['others']:.1%} at threshold ties"
    return line + f"; {r['others']} others"


def report(runs: dict[str, list[dict]], methods: list[str]) -> tuple[str, str]:
    """The markdown table and the goals line."""
    med = {k: statistics.median(x["wall"] for x in rs) if rs else None for k, rs in runs.items()}
    peak = {k: max(x["peak"] for x in rs) if rs else None for k, rs in runs.items()}
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"  # noqa: E731
    lines = ["| method | contender | wall s (median) | per round | wall × mergekit's | wall × I/O floor's "
             "| peak RSS GB (max) | peak × mergekit's |", "|---|---|---|---|---|---|---|---|"]
    for key, rs in runs.items():
        method, _, who = key.rpartition("/")
        mk = f"{method}/mergekit"
        cells = [method or "–", "I/O floor" if who == "floor" else who, f"{med[key]:.2f}" if rs else "failed",
                 " ".join(f"{x['wall']:.2f}" for x in rs), ratio(med[key], med.get(mk)), ratio(med[key], med["floor"]),
                 f"{peak[key] / 1e9:.2f}" if rs else "–", ratio(peak[key], peak.get(mk))]
        lines.append("| " + " | ".join(cells) + " |")
    goals, met = [], True
    for m in methods:
        o, mk = f"{m}/ours", f"{m}/mergekit"
        if not (runs[o] and runs[mk]):
            goals.append(f"{m}: not measured")
            met = False
            continue
        checks = [(med[mk], med[o], SPEED_GOAL[m], "faster than mergekit", True),
                  (peak[o], peak[mk], PEAK_GOAL, "mergekit's peak memory", False),
                  (med[o], med["floor"], FLOOR_GOAL, "the I/O floor's wall time", False)]
        for a, b, goal, what, at_least in checks:
            ok = a / b >= goal if at_least else a / b <= goal
            met &= ok
            bound = f"{'≥' if at_least else '≤'} {goal:g}×"
            goals.append(f"{m} {a / b:.2f}× {what} ({bound}: {'met' if ok else 'not met'})")
    return "\n".join(lines), "goals: " + "; ".join(goals) + f" → {'all met' if met else 'not met'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="full", help="full: 478M params; small: 27M (default full)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all contenders, order alternating (2)")
    p.add_argument("--methods", default="ties,task_arithmetic", help="comma-separated, of: " + ", ".join(DENSITY))
    p.add_argument("--ours-kwargs", default="{}", help="JSON of extra merge_models keywords, e.g. '{\"threads\": 2}'")
    p.add_argument("--keep", action="store_true", help="keep every merge output (in the results folder's out/)")
    p.add_argument("--cache-dir", help="models folder (default bench/.cache/merge-<scale>)")
    p.add_argument("--out", help="results folder (default bench/results/merge-<stamp>/)")
    p.add_argument("--_run-ours", help=argparse.SUPPRESS)
    p.add_argument("--_run-floor", help=argparse.SUPPRESS)
    p.add_argument("--_measure", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._run_ours:
        return run_ours(json.loads(a._run_ours)) or 0
    if a._measure:
        print(json.dumps(measure(**json.loads(a._measure))))
        return 0
    if a._run_floor:
        job = json.loads(a._run_floor)
        return read_all(job["inputs"], job["out"]) or 0
    methods, kwargs = [m for m in a.methods.split(",") if m], json.loads(a.ours_kwargs)
    if a.rounds < 1 or not methods or set(methods) - set(DENSITY) or not isinstance(kwargs, dict):
        p.error("--rounds >= 1, --methods among " + ", ".join(DENSITY) + ", --ours-kwargs a JSON object")
    cache = Path(a.cache_dir or ROOT / "bench" / ".cache" / f"merge-{a.scale}").resolve()
    work = Path(a.out or ROOT / "bench" / "results" / f"merge-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()
    t = time.perf_counter()
    info = build(cache, a.scale)
    print(f"models in {cache} ({'cached' if info['cached'] else f'built in {time.perf_counter() - t:.1f} s'}): "
          f"base + dense + sparse, {info['params'] / 1e6:.1f}M params each, bf16, {info['bytes'] / 1e9:.2f} GB "
          f"in {info['shards']} shard(s)", flush=True)
    from importlib.metadata import version

    import torch

    print(f"results in {work}; load {load_start[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), mergekit {version('mergekit')}; ours kwargs {kwargs}", flush=True)
    t = time.perf_counter()
    read_all([str(cache / m) for m in ("base", *VARIANTS)])
    print(f"warm-up read of the inputs (untimed): {time.perf_counter() - t:.1f} s", flush=True)
    order = [("floor", "")] + [(c, m) for m in methods for c in CONTENDERS]
    runs: dict[str, list[dict]] = {"floor": [], **{f"{m}/{c}": [] for c, m in order[1:]}}
    kept: dict[str, Path] = {}
    failures = []
    for r in range(a.rounds):
        for who, method in order if r % 2 == 0 else order[::-1]:
            key, out = f"{method}/{who}".lstrip("/"), work / "out" / f"r{r + 1}-{method or 'io'}-{who}"
            try:
                x = launch(command(who, method, cache, out, work, kwargs), work / "logs" / f"{out.name}.log")
            except RuntimeError as e:
                failures.append({"round": r + 1, "run": key, "error": str(e)})
                print(f"  round {r + 1}/{a.rounds}  {key:24} FAILED: {e}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                continue
            runs[key].append(x)
            inner = f", merge_models {x['merge_s']:.2f} s after imports {x['import_s']:.2f} s" if "merge_s" in x else ""
            print(f"  round {r + 1}/{a.rounds}  {key:24} {x['wall']:7.2f} s  peak {x['peak'] / 1e9:.2f} GB{inner}",
                  flush=True)
            old = out if who == "floor" else kept.get(key)  # keep the last ours / mergekit output of a method
            if who != "floor":
                kept[key] = out
            if old and not a.keep:
                shutil.rmtree(old, ignore_errors=True)
            os.sync()  # untimed: the next run starts without this one's writeback
    table, goals = report(runs, methods)
    checks = {}
    for m in methods:
        if f"{m}/ours" in kept and f"{m}/mergekit" in kept:
            checks[m] = agreement(cache, kept[f"{m}/ours"], kept[f"{m}/mergekit"], DENSITY[m])
    if not a.keep:
        shutil.rmtree(work / "out", ignore_errors=True)
    agree = "\n".join(agreement_line(m, r) for m, r in checks.items()) or "no pair of outputs to compare"
    md = f"{table}\n\nours against mergekit, entry by entry (last round's outputs):\n{agree}\n\n{goals}"
    load = os.getloadavg()
    print(f"\n{md}\n\nwall time {time.perf_counter() - started:.0f} s; load now "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(), "load_start": load_start,
            "load_end": load, "scale": a.scale, "models": info, "rounds": a.rounds, "methods": methods,
            "densities": DENSITY, "ours_kwargs": kwargs, "mergekit_options": MERGEKIT_OPTIONS,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "mergekit": version("mergekit")}
    (work / "merge.json").write_text(json.dumps({"meta": meta, "runs": runs, "failures": failures,
                                                 "agreement": checks, "goals": goals}, indent=1) + "\n")
    (work / "merge.md").write_text(md + "\n")
    print(f"written: {work / 'merge.json'}, {work / 'merge.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

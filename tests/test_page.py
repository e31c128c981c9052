"""The experiment report page: report.md + standalone report.html; structure here, rendering in real Chromium."""

from __future__ import annotations

import json
import math
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from paft.evaluate.page import write_report
from paft.evaluate.report import results_table

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MLFLOW = "http://127.0.0.1:5000/#/experiments/1/runs/"
CHART_METRICS = ["score", "task_em", "pref_accuracy", "style_rate", "rec_faithfulness", "delta_sparsity"]
EVIL = "<script>alert(1)</script>"


def metrics(em, style, pref, margin, faith, score=None, sparsity=None):
    row = {"task_em": em, "style_rate": style, "pref_accuracy": pref, "pref_margin": margin, "rec_faithfulness": faith}
    return row | ({"score": score} if score is not None else {}) | ({"delta_sparsity": sparsity} if sparsity else {})


def histogram(rng, centre, zeros):
    edges = np.linspace(-12, 0, 101)
    v = np.concatenate([rng.normal(centre, 0.8, 5000).clip(-11.9, -0.1), np.full(zeros, -12.0)])
    shares, _ = np.histogram(v, bins=edges, weights=np.full(v.size, 1 / v.size))
    return {"edges": edges.tolist(), "shares": shares.tolist(), "samples": int(v.size)}


def full_data() -> dict:
    rng = np.random.default_rng(0)
    results = {
        "base": metrics(0.0, 0.0, 0.08, -6.0, 1.4),
        "sft": metrics(0.56, 0.9, 0.2, -2.1, 3.1, 0.76),
        "align": metrics(0.05, 0.1, 0.95, 4.2, 2.2, 1.0, 0.62),
        "sequential": metrics(0.19, 0.5, 0.4, 0.5, 2.9, 0.59),
        "paft_ties": metrics(0.44, 0.8, 0.83, 2.5, 3.3, 1.27, 0.5),
        "paft_ties_l1": metrics(0.5, 0.85, float("nan"), 3.0, 3.4, 0.81, 0.71),
        "paft_dare_ties": metrics(0.41, 0.7, 0.8, 2.2, 3.0, 1.21, 0.9),
        "rec": {"rec_parse_rate": 1.0, "rec_rating_accuracy": 0.7},
    }
    steps = list(range(0, 200, 10))
    return {
        "title": "PAFT experiment 20261130-101500-ab12cd",
        "run": {"id": "0123abcd", "url": MLFLOW + "0123abcd", "name": "paft-20261130",
                "start_time": "2026-11-30 10:15 UTC", "tags": {"data_version": "9f8e7d", "git_commit": "abc1234"}},
        "results": results,
        "table": results_table(results),
        "verdict": {"text": "PAFT (paft_ties_l1) beat sequential training: score 0.81 vs 0.59 (+0.22)",
                    "paft": "paft_ties_l1", "sequential": "sequential",
                    "delta": {"score": 0.22, "task_em": 0.31, "pref_accuracy": -0.1}},
        "chart_metrics": CHART_METRICS,
        "search": {"objective": "score = 1.0·task_em + 1.0·pref_accuracy", "best": "ties-d0.5-w1-1",
                   "points": [{"name": n, "method": m, "density": d, "weights": [1.0, w],
                               "metrics": {"score": em + pa, "task_em": em, "pref_accuracy": pa}, "url": MLFLOW + n}
                              for n, m, d, w, em, pa in [("dare-d0.3-w1-1", "dare_ties", 0.3, 1.0, 0.3, 0.8),
                                                         ("ties-d0.5-w1-1", "ties", 0.5, 1.0, 0.5, 0.9),
                                                         ("ta-w1-0.5", "task_arithmetic", None, 0.5, 0.45, 0.6)]]},
        "sparsity": {"eps_abs": 1e-5, "eps_rel": 1e-3, "inputs": {
            "sft": {"overall": {"share_abs": 0.01, "share_rel": 0.2, "mean_abs": 1e-3, "entries": 123456},
                    "histogram": histogram(rng, -3.0, 50)},
            "align": {"overall": {"share_abs": 0.62, "share_rel": 0.9, "mean_abs": 2e-5, "entries": 123456},
                      "histogram": histogram(rng, -6.0, 8000)}}},
        "curves": {"train_sft": {"loss": [[s, 3 * math.exp(-s / 60) + 0.4] for s in steps],
                                 "learning_rate": [[s, 1e-4 * (1 - s / 200)] for s in steps]},
                   "train_align": {"loss": [[s, 0.69 * math.exp(-s / 150)] for s in steps],
                                   "rewards/accuracies": [[s, min(1, 0.5 + s / 300)] for s in steps]}},
        "rec_table": None,
        "links": [["train_sft", MLFLOW + "s1"], ["train_align", MLFLOW + "a1"]],
    }


# metric charts (6: every chart metric some candidate has) + sparsity (2 inputs + overlay)
# + curves (loss of both runs overlaid + one per run) + search scatter
N_CHARTS = len(CHART_METRICS) + 3 + 3 + 1


class Page(HTMLParser):
    """Tags with attributes, ids, text outside <svg>; enough to check the structure without a browser."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.svg_depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.svg_depth += tag == "svg"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self.svg_depth -= tag == "svg"

    def handle_data(self, data):
        if not self.svg_depth:
            self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def charts_of(page: Page) -> list[str]:
    return [a["id"] for a in page.find("figure", **{"class": "chart"})]


# ----------------------------------------------------------------------------- structure
def test_full_report(tmp_path):
    out = write_report(full_data(), tmp_path / "report")
    root = tmp_path / "report"
    assert out["markdown"] == str(root / "report.md") and out["html"] == str(root / "report.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # written atomically: no temp folder left
    assert len(out["charts"]) == N_CHARTS and all(Path(p).parent == root / "charts" for p in out["charts"])
    assert sorted(p.name for p in (root / "charts").iterdir()) == sorted(Path(p).name for p in out["charts"])

    md, text = (root / "report.md").read_text(), (root / "report.html").read_text()
    page = Page(text)
    visible = " ".join(page.text)
    for heading in ("Verdict", "Candidates", "REC evaluator quality", "Merge search", "Sparsity of the deltas",
                    "Training curves", "MLflow runs"):
        assert f"## {heading}" in md and heading in visible, heading
    assert [a["id"] for a in page.find("section")] == ["verdict", "candidates", "rec", "search", "sparsity",
                                                        "training", "runs"]
    assert md.index("## Verdict") < md.index("## Candidates") < md.index("## REC") < md.index("## Merge search")
    assert "PAFT (paft_ties_l1) beat sequential" in visible and "+0.220" in md and "-0.100" in visible
    assert page.find("p", **{"class": "verdict"})
    # every chart: an inline <svg> in a figure with a caption, the same SVG as the file, linked from the markdown
    ids = charts_of(page)
    assert len(ids) == N_CHARTS == text.count("<figcaption>") == text.count("<svg ")
    for p in out["charts"]:
        slug = Path(p).stem
        svg = Path(p).read_text()
        assert svg.startswith("<svg ") and "<?xml" not in svg and "DOCTYPE" not in svg
        assert f'id="chart-{slug}"' in text and svg in text and f"](charts/{slug}.svg)" in md
    for slug in ("metric-task-em", "metric-delta-sparsity", "sparsity-sft", "sparsity-align", "sparsity-all-inputs",
                 "curves-loss", "curves-train-sft", "curves-train-align", "search"):
        assert f"chart-{slug}" in ids, slug
    assert "metric-rec-parse-rate" not in " ".join(ids)  # REC rows are not candidates
    # the log axes' tick labels are mathtext (10, then the exponent as a superscript: 4 glyphs), not the raw string
    tick = re.search(r"<!-- \$\\mathdefault\{10\^\{-1\}\}\$ -->\s*<g [^>]*>((?:\s*<use [^>]*/>)+)",
                     (root / "charts" / "sparsity-sft.svg").read_text())
    assert tick and tick[1].count("<use") == 4
    # tables: candidates, REC (split from the results table), deltas, search sorted by the objective, sparsity
    assert "| paft_ties_l1 |" in md and "| held-out |" in md and "held-out" in visible
    search_rows = [ln for ln in md.splitlines() if "-w1" in ln and ln.startswith("| [")]
    assert [r.split("]")[0] for r in search_rows] == ["| [★ ties-d0.5-w1-1", "| [dare-d0.3-w1-1", "| [ta-w1-0.5"]
    assert "62.00%" in md and "62.00%" in visible and "123,456" in visible and "Objective: score" in visible
    assert len(page.find("table")) == 5
    # numbers as in the markdown tables; NaN as "–"
    row = next(ln for ln in md.splitlines() if ln.startswith("| paft_ties_l1 |"))
    assert "| 0.500 |" in row and "| – |" in row
    assert page.find("td", **{"class": "num"})
    # links: the MLflow runs (header, search points, stage runs)
    hrefs = [a["href"] for a in page.find("a")]
    assert MLFLOW + "0123abcd" in hrefs and MLFLOW + "s1" in hrefs and MLFLOW + "ties-d0.5-w1-1" in hrefs
    assert f"[train_sft]({MLFLOW}s1)" in md and "data_version" in md and "abc1234" in visible
    assert_standalone(page, text)


def assert_standalone(page: Page, text: str) -> None:
    """No external resource: http(s) only in <a href> (the MLflow links); no stylesheet links or scripts."""
    for tag, attrs in page.tags:
        for k, v in attrs.items():
            if k in ("src", "href", "xlink:href", "srcset", "data", "poster", "action") and v:
                assert tag == "a" or v.startswith("#"), (tag, k, v)
                assert not v.startswith(("javascript:", "data:")), (tag, k, v)
    assert not page.find("link") and not page.find("script") and not page.find("img") and not page.find("iframe")
    assert "@import" not in text and "url(http" not in text and "url(//" not in text
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)[:10]
    for ref in set(re.findall(r'(?:url\(#|href="#)([^")]+)', text)):  # every internal reference resolves
        assert ref in ids, ref


def test_text_is_escaped(tmp_path):
    data = full_data()
    data["title"] = f"run {EVIL}"
    data["results"][EVIL] = {"task_em": 0.1, "score": 0.2}
    data["results"][r"$\foo$ costs 5"] = {"task_em": 0.2}  # not mathtext (which would fail on an unknown command)
    data["table"] = results_table(data["results"])
    data["run"]["tags"]["note"] = EVIL + ' " & '
    data["verdict"]["text"] += EVIL
    data["search"]["points"][0]["name"] = EVIL
    data["search"]["points"][1]["url"] = "javascript:alert(1)"  # not a link
    data["links"].append(["<b>x</b>", "file:///etc/passwd"])
    out = write_report(data, tmp_path / "r")
    text, md = Path(out["html"]).read_text(), Path(out["markdown"]).read_text()
    page = Page(text)
    assert not page.find("script") and not page.find("b") and "<script" not in text.lower()
    assert "javascript:" not in text and "file:///" not in text and "javascript:" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;script&gt;" in md and "<script" not in md
    assert "&lt;b&gt;x&lt;/b&gt;" in text and EVIL in " ".join(page.text)  # shown as text
    assert any(c.startswith("chart-metric-") for c in charts_of(page))
    assert_standalone(page, text)


def test_missing_sections_are_left_out(tmp_path):
    data = {"title": "minimal", "run": {"id": "r1"},
            "results": {"base": {"task_em": 0.0, "pref_accuracy": float("nan")},
                        "paft_ties": {"task_em": 0.5, "pref_accuracy": 0.7}, "sequential": {"task_em": 0.2}}}
    out = write_report(data, tmp_path / "r")
    text, md = Path(out["html"]).read_text(), Path(out["markdown"]).read_text()
    page = Page(text)
    assert [a["id"] for a in page.find("section")] == ["candidates"]
    assert charts_of(page) == ["chart-metric-task-em", "chart-metric-pref-accuracy"]  # the default chart metrics
    assert [Path(p).name for p in out["charts"]] == ["metric-task-em.svg", "metric-pref-accuracy.svg"]
    for absent in ("Verdict", "Sparsity", "Training", "Merge search", "REC", "MLflow runs"):
        assert absent not in text and absent not in md, absent
    row = next(ln for ln in md.splitlines() if ln.startswith("| base |"))
    assert row == "| base | 0.000 | – |"
    assert [c.strip() for c in re.findall(r"<td[^>]*>([^<]*)</td>", text)[:3]] == ["base", "0.000", "–"]
    assert_standalone(page, text)


def test_rewrite_replaces_whole_folder(tmp_path):
    data = full_data()
    write_report(data, tmp_path / "r")
    (tmp_path / "r" / "stale.txt").write_text("x")
    first = (tmp_path / "r" / "charts" / "metric-task-em.svg").read_text()
    out = write_report(data, tmp_path / "r")
    assert not (tmp_path / "r" / "stale.txt").exists()
    assert Path(out["charts"][1]).read_text() == first  # deterministic SVG (no dates, salted ids)


# ----------------------------------------------------------------------------- in a real browser
def requests_of(driver) -> list[tuple[str, str]]:
    """(document, URL) of the requests the browser's pages started since the last call (DevTools Network events)."""
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return [(e["params"].get("documentURL", ""), e["params"]["request"]["url"])
            for e in events if e["method"] == "Network.requestWillBeSent"]


@pytest.mark.slow
def test_page_renders_in_headless_chromium(tmp_path, monkeypatch):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "`make test` installs them (as root, with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    monkeypatch.setenv("SE_OFFLINE", "true")

    def no_manager(*a, **k):
        raise AssertionError("Selenium Manager was asked for a driver or browser (it would download one)")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)

    out = write_report(full_data(), tmp_path / "report")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console; DevTools events
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(60)
        url = Path(out["html"]).as_uri()
        requested = requests_of(driver)  # the start page's (chrome://new-tab-page ...)
        start = time.monotonic()
        driver.get(url)
        load_s = time.monotonic() - start
        assert driver.title == "PAFT experiment 20261130-101500-ab12cd"
        assert driver.execute_script("return document.readyState") == "complete"
        charts = driver.execute_script("""
            return [...document.querySelectorAll('figure.chart')].map(f => {
              const svg = f.querySelector(':scope > svg');
              const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
              return {id: f.id, width: r.width, height: r.height,
                      drawn: svg ? svg.querySelectorAll('path, rect, use').length : 0,
                      caption: (f.querySelector('figcaption') || {}).textContent || ''};
            });""")
        assert len(charts) == N_CHARTS
        for c in charts:
            assert c["width"] > 200 and c["height"] > 100 and c["drawn"] > 10 and c["caption"], c
        # glyphs are <use> of ids prefixed per chart: every reference resolves to a drawn element in its own chart
        unresolved = driver.execute_script("""
            return [...document.querySelectorAll('figure.chart use')].filter(u => {
              const id = (u.getAttribute('xlink:href') || u.getAttribute('href') || '').slice(1);
              const t = document.getElementById(id);
              return !t || t.closest('figure') !== u.closest('figure');
            }).length;""")
        assert unresolved == 0
        tables = driver.execute_script("return [...document.querySelectorAll('table')].map(t => t.rows.length)")
        assert len(tables) == 5 and min(tables) >= 2
        # nothing but the page itself was fetched (resource timing lists every request the page made)
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources == [], resources
        nav = driver.execute_script("return performance.getEntriesByType('navigation').map(e => e.name)")
        assert nav == [url]
        requested += requests_of(driver)
        assert [u for doc, u in requested if doc == url] == [url], requested  # the report fetched nothing
        assert not [u for _, u in requested if re.match(r"(https?|wss?|ftp)://", u)], requested  # nor did the browser
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        # a screenshot of the whole page that is not blank
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 8000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.width >= 1000 and img.height >= 2000
    colours = img.resize((img.width // 4, img.height // 4)).getcolors(1 << 20)
    assert len(colours) > 50 and max(n for n, _ in colours) < 0.9 * sum(n for n, _ in colours)
    orange = sum(n for n, (r, g, b) in colours if r > 200 and 100 < g < 150 and b < 60)  # the PAFT bars
    assert orange > 100
    print(f"page loaded in {load_s:.2f}s; {len(charts)} charts; screenshot {img.size}")

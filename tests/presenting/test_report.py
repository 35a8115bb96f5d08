"""`mixspec plan --html`: a self-contained page whose data agrees with the Plan, safe with
hostile spec strings, written atomically and never over a file that is not a report; and,
in a real headless Chromium (Debian's, driven by playwright), a page that loads with no
console error and no network request, draws the tree and the memory bars, names every
component, answers hover and zoom, in light and dark mode. Screenshots go to
$MIXSPEC_ARTIFACTS (default tests-artifacts/) for a person to look at."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, seed_spec

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SPEC = seed_spec(more=r"""  late_vit_blocks:
    modules: ['model\.visual\.blocks\.(2[4-9]|3[01])']
    train: full
    lr: 5.0e-6
  embeddings: {train: freeze}
training: {precision: bf16, weight_decay: 0.01}
distributed: {nodes: 1, gpus_per_node: 8, zero_stage: 3, offload: optimizer, gpu_memory_gb: 2}
""")

COMPONENTS = ["vision", "aligner", "language", "late_vit_blocks", "embeddings"]


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC).lstrip(), encoding="utf-8")
    return path


def page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="plan-data">(.*?)</script>', html, re.S)
    assert m
    return json.loads(m.group(1))


def flatten(node):
    yield node
    for kid in node[7]:
        yield from flatten(kid)


def test_report_data_agrees_with_the_plan(run_cli, spec_file, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("plan", str(spec_file), "--html", str(out))
    assert result.exit_code == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    plan = json.loads(run_cli("plan", str(spec_file), "--json").stdout)
    data = page_data(html)
    root = data["tree"]
    # sizes: the root holds every base parameter once (a tied pair once), children sum up
    assert root[1] == plan["totals"]["base_params"] == 8_292_166_656
    assert root[3] == plan["totals"]["trainable_params"]
    for node in flatten(root):
        if node[7]:
            assert node[1] >= sum(k[1] for k in node[7])
    names = [c["name"] for c in data["components"]]
    assert names == COMPONENTS == [c["name"] for c in plan["components"]]
    # each top-level claim: the rule explain gives, the component's trainable count
    by_path = {}

    def walk(node, path):
        by_path[path] = node
        for kid in node[7]:
            walk(kid, f"{path}.{kid[0]}" if path else kid[0])

    walk(root, "")
    merger = by_path["model.visual.merger"]
    assert names[merger[2]] == "aligner" and data["rules"][merger[4]] == "role 'aligner' (module model.visual.merger)"
    explain = run_cli("explain", str(spec_file), "model.visual.merger").stdout
    assert "role 'aligner' (module model.visual.merger)" in explain
    block = by_path["model.visual.blocks.30"]
    assert names[block[2]] == "late_vit_blocks" and "late_vit_blocks.modules[0]" in data["rules"][block[4]]
    lang = next(c for c in plan["components"] if c["name"] == "language")
    assert by_path["model.language_model"][3] == lang["trainable_params"]
    assert by_path["model.language_model"][6] == len(lang["lora"]["target_modules"]) == 196
    assert by_path["model.visual"][2] == -2  # vision, aligner and late_vit_blocks share it
    assert by_path["lm_head"][2] == -1
    # memory: what the estimate says, term by term
    assert data["estimate"] == plan["estimate"]
    assert any("exceeds gpu_memory_gb (2 GB)" in w for w in data["warnings"])
    # self-contained: no URL to fetch anything from
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    # deterministic
    again = tmp_path / "again.html"
    assert run_cli("plan", str(spec_file), "--html", str(again)).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_hostile_strings_stay_data(run_cli, tmp_path):
    evil = "</script><script>window.PWNED=1</script><!--"
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        version: 1
        model: Qwen/Qwen2.5-VL-7B-Instruct
        components:
          projector:
            modules: ['model\\.visual\\.merger|{evil}']
            train: full
            lr: 1.0e-5
        data: {{train: "{evil}.jsonl"}}
        """).lstrip(), encoding="utf-8")
    out = tmp_path / "r.html"
    result = run_cli("plan", str(spec), "--html", str(out))
    assert result.exit_code == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    assert evil not in html and "</script><script>" not in html
    assert html.count("<script") == 2  # the data block and the page's own script
    data = page_data(html)
    assert any(evil in r for r in data["rules"])  # the rule is shown as written, as data


def test_never_overwrites_a_file_that_is_not_a_report(run_cli, spec_file, tmp_path):
    other = tmp_path / "notes.html"
    other.write_text("<p>my notes</p>", encoding="utf-8")
    result = run_cli("plan", str(spec_file), "--html", str(other))
    assert result.exit_code == 1 and "not a mixspec report" in result.stderr
    assert other.read_text(encoding="utf-8") == "<p>my notes</p>"
    assert run_cli("plan", str(spec_file), "--html", str(tmp_path)).exit_code == 1
    assert run_cli("plan", str(spec_file), "--html", str(tmp_path / "no" / "r.html")).exit_code == 1
    report = tmp_path / "r.html"
    assert run_cli("plan", str(spec_file), "--html", str(report)).exit_code == 0
    assert run_cli("plan", str(spec_file), "--html", str(report)).exit_code == 0  # its own report: replaced
    # an invalid spec writes nothing
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_file.read_text(encoding="utf-8").replace("rank: 16", "rank: 0"), encoding="utf-8")
    result = run_cli("plan", str(bad), "--html", str(tmp_path / "bad.html"))
    assert result.exit_code == 1 and "bad.yaml:" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "notes.html", "r.html", "spec.yaml"]


def _artifacts() -> Path:
    path = Path(os.environ.get("MIXSPEC_ARTIFACTS") or ROOT / "tests-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


@pytest.mark.slow
def test_report_in_headless_chromium(run_cli, spec_file, tmp_path, monkeypatch):
    sync_playwright = _browser_or_skip()
    out = tmp_path / "report.html"
    assert run_cli("plan", str(spec_file), "--html", str(out)).exit_code == 0
    # a term the estimate may gain (activations) is drawn from its JSON, with no change here
    from mixspec.planning.estimate import Estimate

    plain = Estimate.to_json

    def with_activations(self):
        data = plain(self)
        data["per_gpu_bytes"]["activations"] = 3 * 1024 ** 3
        data["per_gpu_bytes"]["total"] += 3 * 1024 ** 3
        return data

    monkeypatch.setattr(Estimate, "to_json", with_activations)
    more = tmp_path / "activations.html"
    assert run_cli("plan", str(spec_file), "--html", str(more)).exit_code == 0
    monkeypatch.setattr(Estimate, "to_json", plain)
    artifacts = _artifacts()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for scheme in ("light", "dark"):
                page = browser.new_page(viewport={"width": 1366, "height": 768}, color_scheme=scheme)
                problems, requests = [], []
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("file:") else None)
                page.goto(out.as_uri())
                page.wait_for_selector("body[data-ready='1']", timeout=10_000)
                assert problems == [] and requests == []
                # the tree: rects drawn with a width, every component visible on it
                rects = page.eval_on_selector_all(
                    "#icicle rect[data-component]",
                    "els => els.map(e => [e.dataset.component, e.dataset.name, +e.getAttribute('width')])")
                assert len(rects) > 100 and all(w > 0 for _, _, w in rects)
                shown = {c for c, _, _ in rects}
                assert set(COMPONENTS) | {"unassigned", "mixed"} <= shown
                # the bars: one segment per numeric term of the estimate
                terms = page.eval_on_selector_all("#memory rect[data-term]", "els => els.map(e => e.dataset.term)")
                assert {"weights", "gradients"} <= set(terms)
                assert "offloaded" in terms  # ZeRO-3 with optimizer offload: CPU memory shown
                rows = page.eval_on_selector_all("#components tbody tr", "els => els.map(e => e.dataset.component)")
                assert rows == COMPONENTS + ["unassigned"]
                legend = page.inner_text("#legend")
                assert all(c in legend for c in COMPONENTS)
                assert "gpu_memory_gb 2 GB" in page.text_content("#memory")
                assert "exceeds gpu_memory_gb (2 GB)" in page.inner_text("#warnings")
                # hover card: the rule and the LoRA settings of a LoRA module
                page.hover("#icicle rect[data-name='model.language_model.layers']")
                card = page.inner_text("#card")
                assert "language (LoRA)" in card and "rank 16, alpha 32" in card and "role 'language'" in card
                assert "lr\n0.0001" in card
                page.hover("#icicle rect[data-name='model.visual']", position={"x": 5, "y": 5})
                assert "vision (full), aligner (full), late_vit_blocks (full)" in page.inner_text("#card")
                page.screenshot(path=str(artifacts / f"report-{scheme}.png"), full_page=True)
                # zoom: clicking the ViT shows its blocks across the whole width
                page.click("#icicle rect[data-name='model.visual']", position={"x": 5, "y": 5})
                assert "visual" in page.inner_text("#crumbs")
                widths = page.eval_on_selector_all(
                    "#icicle rect[data-name^='model.visual.blocks.']",
                    "els => els.map(e => +e.getAttribute('width'))")
                assert widths and max(widths) > 15
                if scheme == "light":
                    page.screenshot(path=str(artifacts / "report-zoomed.png"))
                assert problems == [] and requests == []
                page.close()
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(more.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            terms = page.eval_on_selector_all("#memory rect[data-term]", "els => els.map(e => e.dataset.term)")
            assert terms[:4] == ["weights", "gradients", "optimizer_states", "activations"]
            assert "activations: 3.00 GiB" in page.text_content("#memory")
            page.close()
        finally:
            browser.close()
    print(f"\nscreenshots: {artifacts}/report-light.png, report-dark.png, report-zoomed.png")

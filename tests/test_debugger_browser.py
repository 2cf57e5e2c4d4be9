"""The debugger in a real browser (Debian's chromium driven by Playwright) against uvicorn on
127.0.0.1: enter a prompt, wait for the node table, trace a head through its query, ablate a node
and see the diff column, open a unit page, run a search (real MiniLM embeddings), explain and score
the unit, steer it by a quantile. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import json
import threading
import urllib.parse
from pathlib import Path

import pytest

from tdb_lens.debugger import Investigation
from tdb_lens.debugger.app import create_app
from test_debugger_support import IOI, harvest_and_store, tiny_model

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    model = tiny_model()
    hdir, store = harvest_and_store(model, tmp_path_factory.mktemp("browser"))
    app = create_app(Investigation(model, store=store, harvest_dirs=[hdir]))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(600):
        if srv.started:
            break
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}/"
    srv.should_exit = True
    th.join(timeout=30)


def test_browser_workflow(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is a test dependency (scripts/setup.sh --test installs it)"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        page.fill("#prompt", IOI)
        page.fill("#target", " Mary")
        page.fill("#distractor", " John")
        page.click("#run")
        page.wait_for_selector("#nodes tbody tr")
        n_rows = page.locator("#nodes tbody tr").count()
        assert n_rows >= 20
        assert "logit(' Mary') - logit(' John')" in page.inner_text("#objective")
        page.screenshot(path=str(shots / "1-node-table.png"), full_page=True)

        # click a head -> trace through its query
        head = page.locator("#nodes tbody tr[data-family='head']").first
        head_node = head.get_attribute("data-node")
        head.locator("button.trace-q").click()
        page.wait_for_selector("#trace-chip")
        page.wait_for_function("document.querySelector('#objective').innerText.includes('trace')")
        assert f"tracing {head_node} through q" in page.inner_text("#trace-chip")
        state = json.loads(urllib.parse.parse_qs(urllib.parse.urlparse(page.url).fragment)["s"][0])
        assert state["trace"] == {"node": head_node, "through": "q"}  # the state is in the URL
        page.screenshot(path=str(shots / "2-trace.png"), full_page=True)

        # back to the logit objective; ablate the top node and see the diff column
        page.click("#untrace")
        page.wait_for_function("!document.querySelector('#objective').innerText.includes('trace')")
        assert page.locator("#nodes thead th", has_text="act*grad diff").count() == 0
        first = page.locator("#nodes tbody tr").first
        ablated = first.get_attribute("data-node")
        first.locator("button.ablate").click()
        page.wait_for_selector("#nodes thead th:has-text('act*grad diff')")
        assert f"zero {ablated}" in page.inner_text("#interventions")
        diffs = page.locator("#nodes tbody tr").evaluate_all(
            "rows => rows.map(r => Array.from(r.cells).map(c => c.dataset.v))")
        header = page.locator("#nodes thead th").all_inner_texts()
        col = header.index("act*grad diff")
        assert any(r[col] not in (None, "NaN") and abs(float(r[col])) > 0 for r in diffs)
        page.screenshot(path=str(shots / "3-ablation.png"), full_page=True)

        # a shared link reproduces the state
        page2 = browser.new_page()
        page2.goto(page.url)
        page2.wait_for_selector("#nodes thead th:has-text('act*grad diff')", timeout=120_000)
        page2.close()

        # unit page of a harvested neuron
        page.fill("#search-q", "cities in Europe")
        page.click("#search-run")
        page.wait_for_selector("#search-results a.hit")
        hits = page.locator("#search-results a.hit").all_inner_texts()
        assert hits[0] == "L0.N2"
        page.screenshot(path=str(shots / "4-search.png"), full_page=True)
        page.locator("#search-results a.hit").first.click()
        page.wait_for_selector("#unit-label")
        assert page.inner_text("#unit-label") == "L0.N2"
        assert "cities in Europe" in page.inner_text("#unit-page")
        assert page.locator("#unit-page .example").count() >= 3
        page.screenshot(path=str(shots / "5-unit-page.png"), full_page=True)

        # explain and score this unit: the score is shown, and the unit page lists it with the explanation
        n_expl = page.locator("#unit-page .explanation").count()
        page.click("#explain")
        page.wait_for_function("document.querySelector('#explain-out') && "
                               "document.querySelector('#explain-out').innerText.includes('correlation')")
        out = page.inner_text("#explain-out")
        assert "top-tokens" in out and "scored by likelihood:" in out, out
        new = page.locator("#unit-page .explanation").all_inner_texts()
        assert len(new) == n_expl + 1 and any(t.startswith("top-tokens") and "correlation" in t for t in new), new
        page.screenshot(path=str(shots / "6-explained.png"), full_page=True)

        # steer by a quantile of the unit's harvested activations
        page.fill("#steer-node", "L0.N2@-1")
        page.fill("#steer-quantile", "0.999")
        page.click("#steer-add")
        page.wait_for_selector("#interventions .chip:has-text('clamp L0.N2@-1 = quantile 0.999')")
        page.wait_for_function("document.querySelector('#status').innerText === 'done'")
        assert page.inner_text("#error") == ""
        page.screenshot(path=str(shots / "7-steered.png"), full_page=True)
        browser.close()
        assert not errors, errors
    assert len(list(shots.glob("*.png"))) == 7
    print(f"screenshots in {shots}")

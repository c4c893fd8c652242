"""The playground page in a real headless browser (Playwright driving the system Chromium):
it loads the model, streams a completion, colours each token by its top-1 expert in the
chosen layer, and shows a token's experts per layer on hover. Skipped where no browser is
installed (Debian: apt-get install chromium).

SLMS_PLAYGROUND_SCREENSHOT=PATH also saves a screenshot of the page."""

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import tiny_config  # noqa: E402
from slms.model import GPT  # noqa: E402
from slms.serve.app import create_app, running  # noqa: E402


def chromium() -> str | None:
    """The system Chromium's binary (Playwright's own browser download is not needed)."""
    for path in (os.environ.get("SLMS_CHROMIUM"), "/usr/lib/chromium/chromium",
                 shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if path and Path(path).is_file():
            return path
    return None


pytestmark = pytest.mark.skipif(chromium() is None, reason="no Chromium installed")


def drive(url: str, screenshot: str | None = None, prompt: str = "Once upon a time",
          max_tokens: int = 24) -> dict:
    """Open the playground, generate, switch layer, hover a token; what the page showed."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('layer').options.length > 0")
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", str(max_tokens))
            page.fill("#temperature", "0.7")
            page.fill("#seed", "7")
            page.click("#go")
            page.wait_for_selector("body[data-done='1']", timeout=30_000)
            first = page.eval_on_selector_all(
                "#output .tok", "s => s.map(e => [e.dataset.expert, e.style.background])")
            page.select_option("#layer", index=1)
            second = page.eval_on_selector_all("#output .tok", "s => s.map(e => e.dataset.expert)")
            page.hover("#output .tok >> nth=2")
            tip = page.inner_text("#tip")
            out = {"first": first, "second": second, "tip": tip,
                   "stats": page.inner_text("#stats"), "error": page.inner_text("#error"),
                   "model": page.inner_text("#model"), "legend": page.inner_text("#legend"),
                   "layers": page.eval_on_selector_all("#layer option", "o => o.length")}
            if screenshot:
                page.screenshot(path=screenshot)
            return out
        finally:
            browser.close()


def test_playground_streams_and_colours_tokens_by_expert(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True, block_size=64, n_layer=3)).eval()
    with running(create_app(model, tokenizer, "tiny")) as url:
        seen = drive(url, os.environ.get("SLMS_PLAYGROUND_SCREENSHOT"))
    assert seen["error"] == "" and "finished" in seen["stats"]
    assert "3 layers, MoE, 4 experts, top-2" in seen["model"] and seen["layers"] == 3
    tokens = seen["first"]
    assert len(tokens) == 24
    # every token but the last (never fed back, so never routed) has an expert and a colour
    assert all(e is not None and bg.startswith("rgb") for e, bg in tokens[:-1])
    assert {int(e) for e, _ in tokens[:-1]} <= {0, 1, 2, 3}
    assert all(e is not None for e in seen["second"][:-1])
    assert "layer" in seen["tip"] and "expert 0:" in seen["legend"]

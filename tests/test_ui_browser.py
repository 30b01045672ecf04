"""`higgs-tune ui` in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium): the demo path on the tiny stack. Prepare the bundled data, see the inspect summary
and play a clip, check a config (every problem at once), start a short run and watch the loss
chart update, hear a sample, generate from the final checkpoint beside the base model, export.
Screenshots of each tab are saved in the test's tmp folder (ui-*.png)."""

from __future__ import annotations

from pathlib import Path

import pytest

from higgs_tune.app.ui.paths import Roots
from higgs_tune.app.ui.server import demo_paths, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="headless Chromium not installed at /usr/bin/chromium + /usr/bin/chromedriver "
        "(apt-get install -y chromium chromium-driver)",
    ),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="selenium not installed (pip install -e '.[test]')"),
]

# fetch the element's audio URL: status and the first 12 bytes (RIFF....WAVE)
_FETCH_AUDIO = """
const done = arguments[arguments.length - 1];
fetch(arguments[0].currentSrc || arguments[0].src).then(async (r) => {
  const b = new Uint8Array(await r.arrayBuffer());
  done([r.status, String.fromCharCode(...b.slice(0, 4)), String.fromCharCode(...b.slice(8, 12)), b.length]);
}).catch((e) => done([0, String(e), "", 0]));
"""


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait_for(driver, condition, timeout=300, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: condition(d), message=what)


def _check_audio(driver, element) -> None:
    status, riff, wave, size = driver.execute_async_script(_FETCH_AUDIO, element)
    assert (status, riff, wave) == (200, "RIFF", "WAVE") and size >= 44


def test_demo_path_in_chromium(browser, tmp_path, tiny_dir):
    from selenium.webdriver.common.by import By

    d = browser
    ws = tmp_path / "ws"
    ws.mkdir()
    demo = demo_paths()
    server, app, url = serve_in_thread(Roots([ws, tiny_dir.parent], read_only=[demo["dir"]]))
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def field(i):
        return d.find_element(By.ID, i)

    def text(i):  # read through JS: polled elements are re-rendered (a held WebElement would go stale)
        return d.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;", i)

    def fill(i, value):
        field(i).clear()
        field(i).send_keys(str(value))

    try:
        d.get(url)
        _wait_for(d, lambda d: "files under:" in field("roots").text, 30, "the page loads /api/info")

        # ---- 1. data: the bundled demo manifest, prepared with the tiny stack's codec
        field("btn-demo-data").click()
        assert field("data-source").get_attribute("value") == demo["manifest"]
        fill("data-model", tiny_dir)
        field("btn-prepare").click()
        _wait_for(d, lambda d: text("prep-state") == "finished", 300, "prepare finishes")
        assert d.execute_script("const p = document.getElementById('prep-progress'); return p.value === p.max;")
        _wait_for(d, lambda d: field("inspect-card").is_displayed(), 60, "the inspect summary")
        summary = field("inspect-summary").text
        assert "26" in summary and "ar_a" in summary and "en_b" in summary
        rows = d.find_elements(By.CSS_SELECTOR, "#clips button.play")
        assert len(rows) == 26
        rows[0].click()
        _wait_for(d, lambda d: field("clip-player").get_attribute("src"), 10, "the clip player gets a source")
        _check_audio(d, field("clip-player"))
        assert field("clip-text").text == "en_a_000: The morning train was right on time."
        d.save_screenshot(str(shots / "ui-data.png"))

        # ---- 2. train: every problem at once, then a short run
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=train]").click()
        assert field("cfg-preset").get_attribute("value") == "demo-tiny-cpu.yaml"
        assert field("cfg-train_cache").get_attribute("value") == "cache/train"  # filled by the data tab
        fill("cfg-output_dir", "run")
        fill("cfg-max_steps", 24)
        fill("cfg-lora_r", 0)
        fill("cfg-extra", "train.bogus=1")
        field("btn-check").click()
        _wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cfg-problems li")) > 0, 30, "problems")
        problems = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#cfg-problems li")]
        assert "train.bogus: unknown key." in problems and "finetune.lora_r must be > 0, got 0." in problems
        fill("cfg-lora_r", 8)
        field("cfg-extra").clear()
        field("cfg-extra").send_keys(
            "train.log_steps=2\ncheckpoint.save_steps=12\ntrain.sample_steps=12\ntrain.eval_steps=12\n"
            "data.eval_fraction=0.2"
        )
        field("btn-check").click()
        _wait_for(d, lambda d: field("cfg-yaml-box").is_displayed(), 30, "the validated config")
        assert "max_steps: 24" in field("cfg-yaml").get_attribute("textContent")
        assert d.find_elements(By.CSS_SELECTOR, "#cfg-problems li") == []

        field("btn-start").click()
        _wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#charts svg"), 300, "the first loss chart")
        first_step = _step(text("run-last"))
        first_chart = field("charts").get_attribute("innerHTML")
        _wait_for(d, lambda d: _step(text("run-last")) > first_step, 300, "a later logged step")
        assert field("charts").get_attribute("innerHTML") != first_chart  # the chart was redrawn with more points
        titles = [t.text for t in d.find_elements(By.CSS_SELECTOR, "#charts .chart-title")]
        assert "Audio loss (mean over codebooks)" in titles and "Per-codebook accuracy (train)" in titles
        _wait_for(d, lambda d: text("job-state") == "finished", 600, "the run finishes")
        assert _step(text("run-last")) == 24
        samples = d.find_elements(By.CSS_SELECTOR, "#samples audio.sample")
        assert len(samples) == 4  # 2 prompts at steps 12 and 24
        _check_audio(d, samples[0])
        assert "final (step 24)" in field("run-checkpoints").text
        d.save_screenshot(str(shots / "ui-train.png"))

        # ---- 3. listen: the final checkpoint and the base model, side by side
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=listen]").click()
        assert field("gen-run").get_attribute("value") == "run"
        checked = d.find_elements(By.CSS_SELECTOR, "input[name=ckpt]:checked")
        assert [c.get_attribute("value") for c in checked] == [str((ws / "run" / "final").resolve())]
        fill("gen-text", "Please close the window.")
        fill("gen-max", 40)
        field("btn-generate").click()
        _wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gen-results .result")) == 2, 300, "outputs")
        labels = [
            r.find_element(By.TAG_NAME, "b").text for r in d.find_elements(By.CSS_SELECTOR, "#gen-results .result")
        ]
        assert labels == ["final", "base model"]
        for audio in d.find_elements(By.CSS_SELECTOR, "#gen-results audio.generated"):
            _check_audio(d, audio)
        assert field("gen-error").text == ""
        d.save_screenshot(str(shots / "ui-listen.png"))

        # ---- 4. export the final checkpoint, with its model card
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=export]").click()
        fill("exp-out", "export")
        field("btn-export").click()
        _wait_for(d, lambda d: "exported to" in field("exp-result").text, 300, "the export")
        assert (ws / "export" / "model.safetensors").is_file()
        assert "model card (final/README.md)" in field("exp-result").text
        d.save_screenshot(str(shots / "ui-export.png"))
    finally:
        server.shutdown()
        server.server_close()
        app.jobs.shutdown(timeout=60)
    for name in ("ui-data.png", "ui-train.png", "ui-listen.png", "ui-export.png"):
        png = (shots / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    print(f"screenshots: {shots}")


def _step(text: str) -> int:
    return int(text.split(":")[0].split()[1]) if text.startswith("step ") else -1

"""The playground and the API reference in a real browser: Debian's Chromium, headless,
driven by Playwright, against a real server with the bundled nano model.

Skipped with the reason where Playwright or Chromium is missing (.ci/run installs both).
Screenshots of each stage are written to the test's tmp_path."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from .helpers import Server, wait_for

CHROMIUM = os.environ.get("INCONTEXT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
EDIT_TIMEOUT_MS = 240_000  # a loaded 2-core machine; an edit alone takes about a second

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def nano_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("playground")
    env = {"OMP_NUM_THREADS": "1", "INCONTEXT_ENGINE_COMPILE": "false", "INCONTEXT_POLL_INTERVAL_SECONDS": "0.2"}
    srv = Server(data_dir, env)  # no key: a first start on loopback makes one for the page
    srv.start()
    # The line a new user opens: the page's address with the key in the fragment.
    printed = wait_for(lambda: re.search(r"The playground: (\S+)", srv.log()))
    srv.page_url = printed[1]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def offline(page, server) -> list[str]:
    """Abort every request that leaves the loopback server; returns the URLs refused."""
    refused: list[str] = []

    def route(r):
        if r.request.url.startswith((server.url, "data:", "blob:")):
            return r.continue_()
        refused.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    return refused


def wait_for_result(page, turns: int) -> None:
    """The live progress shows and ends, and the timeline holds `turns` turns."""
    expect = sync_api.expect
    live = page.locator("#live-text")
    expect(live).to_contain_text(re.compile("succeeded|failed|canceled"), timeout=EDIT_TIMEOUT_MS)
    assert "succeeded" in live.text_content(), page.locator("#err-form").text_content()
    expect(page.locator("#timeline .turn")).to_have_count(turns)
    expect(page.locator("#results .result")).not_to_have_count(0)


def test_a_three_turn_edit_with_a_branch_survives_a_reload(browser, nano_server, tmp_path):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = offline(page, nano_server)
    assert re.fullmatch(re.escape(nano_server.url) + r"/#key=ic_live_[\w-]+", nano_server.page_url)
    page.goto(nano_server.page_url)
    expect(page.locator("#model option")).not_to_have_count(0)
    key = nano_server.page_url.split("#key=")[1]
    assert page.evaluate("location.href") == nano_server.url + "/"  # the key is off the address bar
    assert page.evaluate("localStorage.getItem('incontext.apiKey')") == key
    assert page.get_by_label("API key, kept in this browser only").input_value() == key

    # An error from the server shows beside its field: an edit with no instruction.
    page.locator("#file").set_input_files(str(EXAMPLE))
    expect(page.locator("#source-img")).to_be_visible()
    page.get_by_role("button", name="Edit", exact=True).click()
    expect(page.locator("#err-prompt")).to_contain_text("VALIDATION_ERROR")
    page.screenshot(path=tmp_path / "0-error.png")

    # Turn 1: the uploaded image, watched through the live progress.
    page.get_by_label("Instruction").fill("make the red circle blue")
    page.get_by_label("Format").select_option("png")
    page.get_by_role("button", name="Edit", exact=True).click()
    expect(page.locator("#live")).to_be_visible()
    wait_for_result(page, 1)
    steps = page.locator("#live-text").text_content()
    assert page.locator("#bar").evaluate("b => b.value") == 1, steps
    page.screenshot(path=tmp_path / "1-first-turn.png")
    first_run = page.evaluate("location.hash")

    # Turn 2 continues from turn 1's output, with no upload.
    expect(page.locator("#continuing")).to_contain_text("turn 1")
    page.get_by_label("Instruction").fill("make the background white")
    page.get_by_role("button", name="Edit", exact=True).click()
    wait_for_result(page, 2)
    page.screenshot(path=tmp_path / "2-second-turn.png")

    # A branch from turn 1.
    page.locator("#timeline .turn").first.click()
    expect(page.locator("#continuing")).to_contain_text("turn 1")
    assert page.evaluate("location.hash") == first_run
    page.get_by_label("Instruction").fill("make the triangle green")
    page.get_by_role("button", name="Edit", exact=True).click()
    wait_for_result(page, 3)
    page.screenshot(path=tmp_path / "3-branch.png")

    # After a reload the timeline is the server's lineage: three turns, the branch current.
    page.reload()
    expect(page.locator("#timeline .turn")).to_have_count(3)
    expect(page.locator("#timeline .turn[aria-current]")).to_contain_text("Turn 2")
    expect(page.locator("#timeline .turn.off-path")).to_have_count(1)  # the other turn 2

    # The before/after slider moves the split, and the changed region can be shown.
    split = page.locator("#results .split").first
    after = page.locator("#results .after").first
    expect(split).to_be_visible()
    before = after.evaluate("img => img.style.clipPath")
    split.focus()
    for _ in range(20):
        page.keyboard.press("ArrowLeft")
    moved = after.evaluate("img => img.style.clipPath")
    assert before == "inset(0px 0px 0px 50%)" and moved == "inset(0px 0px 0px 30%)", (before, moved)
    page.locator("#results .show-mask").first.check()
    expect(page.locator("#results .mask").first).to_be_visible()
    page.wait_for_function("document.querySelector('#results .mask').width > 0")  # the mask has loaded
    page.screenshot(path=tmp_path / "4-after-reload.png", full_page=True)

    # Turn 1's "before" is the upload, which the server keeps as long as the outputs.
    page.locator("#timeline .turn").first.click()
    before_img = page.locator("#results .before").first
    expect(before_img).to_have_attribute("src", re.compile(r"/input\?"))
    # decode() waits for the image and fails if it cannot load (the page's CSP forbids the
    # eval that a polling wait_for_function would need).
    assert before_img.evaluate("img => img.decode().then(() => img.naturalWidth)") == 256
    assert refused == []


def pick_fewest_steps(page) -> None:
    """The preset with the fewest steps the page offers: the model's quality is not under test."""
    values = page.locator("#steps option").evaluate_all("os => os.map(o => o.value).filter(Boolean)")
    page.get_by_label("Preset").select_option(min(values, key=int))


def test_a_segmentation_run_from_the_page_shows_its_mask_and_boxes(browser, nano_server, tmp_path):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = offline(page, nano_server)
    page.goto(nano_server.page_url)
    task = page.get_by_label("Task")
    expect(task.locator("option")).to_have_count(5)  # the plain edit and the four workflows
    expect(page.locator("#model option[value=segmentation]")).to_have_count(0)  # a task, not a model

    # Each workflow shows the fields it takes: logo placement a logo and an optional mask.
    task.select_option("logo-placement")
    expect(page.get_by_role("group", name="Logo", exact=True)).to_be_visible()
    expect(page.get_by_role("group", name="Where the logo may go (optional)")).to_be_visible()
    expect(page.get_by_label("Instruction (optional)")).to_be_visible()
    expect(page.get_by_label("Aspect ratio")).to_be_hidden()

    task.select_option("segmentation")
    expect(page.locator("#second-box")).to_be_hidden()
    expect(page.locator("#mask-box")).to_be_hidden()
    expect(page.get_by_label("Format")).to_be_hidden()  # its output is the mask, a PNG
    prompt = page.get_by_label("What to segment")
    expect(prompt).to_have_attribute("placeholder", "the red circle")
    page.locator("#file").set_input_files(str(EXAMPLE))
    prompt.fill("the red circle")
    pick_fewest_steps(page)
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Run segmentation").click()
    expect(page.locator("#live")).to_be_visible()
    wait_for_result(page, 1)
    expect(page.locator("#results-title")).to_contain_text("segmentation: the red circle")

    # The output, the returned mask and the boxes, over the image and listed.
    result = page.locator("#results .result").first
    for img in (result.locator(".after"), result.locator(".mask-out")):
        assert img.evaluate("img => img.decode().then(() => img.naturalWidth)") == 256
    run = page.evaluate("fetch('/v1/runs/' + location.hash.split('=')[1], "
                        "{headers: {Authorization: 'Bearer ' + localStorage.getItem('incontext.apiKey')}}).then(r => r.json())")
    boxes = run["output"]["outputs"][0]["boxes"]
    expect(result.locator(".boxes rect")).to_have_count(len(boxes))
    expect(result.locator(".box-list li")).to_have_count(max(1, len(boxes)))
    if boxes:
        x0, y0, x1, y1 = boxes[0]
        expect(result.locator(".box-list li").first).to_have_text(f"region 1: {x0}, {y0} to {x1}, {y1} ({x1 - x0}×{y1 - y0} px)")
    page.screenshot(path=tmp_path / "segmentation.png", full_page=True)
    # The next edit starts from the segmented image, not from its mask.
    expect(page.locator("#source-img")).to_have_attribute("src", re.compile("^data:"))
    assert refused == []


def test_a_logo_placement_from_the_page_shows_where_the_logo_went(browser, nano_server, tmp_path):
    expect = sync_api.expect
    logo = tmp_path / "logo.png"
    Image.new("RGB", (40, 20), (250, 210, 20)).save(logo)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = offline(page, nano_server)
    page.goto(nano_server.page_url)
    page.get_by_label("Task").select_option("logo-placement")
    page.locator("#file").set_input_files(str(EXAMPLE))
    page.locator("#second-file").set_input_files(str(logo))
    expect(page.locator("#second-img")).to_be_visible()  # the logo's thumbnail
    pick_fewest_steps(page)
    page.get_by_role("button", name="Run logo-placement").click()
    wait_for_result(page, 1)

    # No mask given: the server picked a spot, drawn over the image and named in the list.
    result = page.locator("#results .result").first
    expect(page.locator("#results-title")).to_have_text("Turn 1: logo-placement")  # no prompt: the default instruction
    expect(result.locator(".boxes rect.placement")).to_have_count(1)
    expect(result.locator(".box-list li.placement")).to_contain_text(re.compile(r"^logo placement: \d+, \d+ to \d+, \d+"))
    assert result.locator(".mask-out").evaluate("img => img.decode().then(() => img.naturalWidth)") == 256
    page.screenshot(path=tmp_path / "logo-placement.png", full_page=True)
    assert refused == []


def test_api_docs_render_with_the_network_blocked(browser, nano_server, tmp_path):
    expect = sync_api.expect
    page = browser.new_page()
    refused = offline(page, nano_server)
    page.goto(nano_server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("incontext", timeout=60_000)
    expect(page.locator(".opblock").first).to_be_visible()
    page.screenshot(path=tmp_path / "docs.png")
    page.goto(nano_server.url + "/redoc")
    expect(page.locator("h1").first).to_contain_text("incontext", timeout=60_000)
    page.screenshot(path=tmp_path / "redoc.png")
    assert refused == []

"""The page of `llm serve` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium; nothing is downloaded) on a real server that needs an API key. Without the browser the
tests skip, and fail in CI (CI=true), where `.ci/run` installs it."""

import shutil
import time

import httpx
import pytest

from llm.classifier import classify, load_classifier
from tests.conftest import unavailable
from tests.serve_process import llm_serve

KEY = "page-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(long_ckpt, instruct_ckpt, classifier_ckpt):
    models = [
        "--model",
        f"long={long_ckpt}",
        "--model",
        f"ins={instruct_ckpt}",
        "--model",
        f"spam={classifier_ckpt[0]}",
    ]
    with llm_serve(*models, "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or not shutil.which(CHROMEDRIVER):
        unavailable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 60, what: str = ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _open(browser, server, model: str):
    """Load the page, give it the key it asks for, pick `model`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "api-key")
    _wait(key.is_displayed, what="the page to ask for the API key")
    assert "needs an API key" in browser.find_element(By.ID, "page-error").text
    key.send_keys(KEY, Keys.ENTER)
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#model option")) == 3, what="the models")
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    return lambda element_id: browser.find_element(By.ID, element_id)


def _generated(browser) -> str:
    return browser.execute_script("const g = document.getElementById('generated'); return g ? g.textContent : '';")


def test_a_prompt_streams_its_text_into_the_page(browser, server):
    find = _open(browser, server, "long")
    find("prompt").send_keys("Hi")
    find("max-tokens").clear()
    find("max-tokens").send_keys("1000")
    find("generate").click()
    # text on the page while the response is still coming in: streamed, not shown at the end
    _wait(lambda: _generated(browser) and find("stop").is_enabled(), what="text before the end")
    partial = _generated(browser)
    _wait(lambda: "finish: length" in find("status").text, what="the end")
    text = _generated(browser)
    assert len(text) > len(partial) and text.startswith(partial)
    assert find("output").text.startswith("Hi")  # the prompt, then the continuation
    assert "1000 tokens in" in find("status").text
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "long", "prompt": "Hi", "max_tokens": 1000, "temperature": 0}
    api = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120).json()
    assert text == api["choices"][0]["text"]  # the page's defaults are greedy


def test_stop_ends_the_generation_on_the_server(browser, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(server.url + "/health", headers=headers).json()["cancelled"]
    find = _open(browser, server, "long")
    find("prompt").send_keys("Hi")
    find("max-tokens").clear()
    find("max-tokens").send_keys("1000")
    find("generate").click()
    _wait(lambda: _generated(browser), what="the first text")
    find("stop").click()
    _wait(lambda: find("status").text == "stopped", what="the page to stop")
    health = _wait(
        lambda: (h := httpx.get(server.url + "/health", headers=headers).json())["cancelled"] == before + 1 and h,
        what="the server to stop generating",
    )
    assert health["active"] == 0


def test_an_instruction_and_its_input_are_answered_on_the_page(browser, server):
    find = _open(browser, server, "ins")
    assert find("input-box").is_displayed() and find("prompt-label").text == "instruction"
    find("prompt").send_keys("Rewrite the sentence.")
    find("input").send_keys("The cake was baked by Sam.")
    find("max-tokens").clear()
    find("max-tokens").send_keys("8")
    find("generate").click()
    _wait(lambda: "finish:" in find("status").text, what="the answer")
    messages = [
        {"role": "system", "content": "The cake was baked by Sam."},
        {"role": "user", "content": "Rewrite the sentence."},
    ]
    body = {"model": "ins", "messages": messages, "max_tokens": 8, "temperature": 0}
    api = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert _generated(browser) == api.json()["choices"][0]["message"]["content"]


def test_a_message_is_classified_on_the_page(browser, server, classifier_ckpt):
    model, info = load_classifier(classifier_ckpt[0])
    for message in ["WINNER!! Claim your free prize now", "see you at 5"]:
        find = _open(browser, server, "spam")
        assert not find("generate-panel").is_displayed() and find("classify-panel").is_displayed()
        find("message").send_keys(message)
        find("classify").click()
        label = _wait(lambda find=find: find("label").text, what="the label")
        scores = classify(model, info, [message])
        assert label == ("spam" if scores.labels[0] == "spam" else "ham (not spam)")
        assert find("classify-status").text == f"spam probability {scores.spam_probability[0]:.3f}"


def test_the_page_logs_no_console_error(browser, server):
    """Loaded, given its key and used, the page leaves one thing in the browser's console at level
    SEVERE: the 401 of its first /v1/models, which is how it learns that this server needs a key
    (Chromium logs every failed load). Before: also a 404 for /favicon.ico, or a 401 behind a key."""
    browser.get_log("browser")  # drop what earlier tests left
    field = _open(browser, server, "long")
    field("prompt").clear()
    field("prompt").send_keys("Hello")
    field("max-tokens").clear()
    field("max-tokens").send_keys("5")
    field("generate").click()
    _wait(lambda: "finish:" in field("status").text, what="the answer")
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert len(severe) == 1 and "/v1/models - Failed to load resource" in severe[0] and "401" in severe[0], severe

"""The README's pictures of the `llm serve` page, taken in headless Chromium on the pipeline's models.

    .venv/bin/python -m bench.serve_screenshot   # writes docs/serve.png and docs/serve-classify.png

Starts `llm serve --model models/pretrain --model models/instruct --model models/spam` on a free port,
asks the instruction model a question and the classifier about a message on the page, and saves the
window each time. Needs Debian's chromium and chromium-driver (as tests/test_serve_browser.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench._common import ROOT, use_mirrored_tiktoken
from tests.serve_process import llm_serve


def _wait(condition, timeout: float = 120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models", help="the folder of pretrain/, instruct/ and spam/ (default models)")
    p.add_argument("--out", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    use_mirrored_tiktoken()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    models = Path(args.models)
    specs = [arg for name in ("pretrain", "instruct", "spam") for arg in ("--model", str(models / name))]
    out = Path(args.out)
    try:
        with llm_serve(*specs) as served:
            driver.get(served.url + "/")
            find = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731
            _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
            Select(find("model")).select_by_value("pretrain")
            find("prompt").send_keys("Every effort moves you")
            find("max-tokens").clear()
            find("max-tokens").send_keys("60")
            find("generate").click()
            _wait(lambda: "finish:" in find("status").text)
            driver.save_screenshot(str(out / "serve.png"))
            Select(find("model")).select_by_value("spam")
            find("message").send_keys("WINNER!! You have won a free prize. Call now to claim")
            find("classify").click()
            _wait(lambda: find("label").text)
            driver.save_screenshot(str(out / "serve-classify.png"))
    finally:
        driver.quit()
    print(f"wrote {out / 'serve.png'} and {out / 'serve-classify.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by selenium, for tests that
look at Label Studio's pages the way a person does.

    from tests.browser import ensure_browser, headless_chromium, ls_login, save_evidence, stage_layers

    ensure_browser()                                  # scripts/browser_deps.sh; fails with what to install
    with headless_chromium() as driver:
        ls_login(driver, ls)                          # the login form at /user/login
        driver.get(f"{ls.url}/projects/{pid}/data?task={tid}")
        layers = stage_layers(driver)                 # pixels of the labeling canvas, per layer

- ``ensure_browser()`` runs scripts/browser_deps.sh: Chromium and its driver are installed with apt-get
  when missing (as root), otherwise it fails with a sentence naming the packages.
- ``headless_chromium()`` starts Chromium headless, sandbox off and /dev/shm unused (as a container
  needs), at 1400x1000, proxies off. Both binary paths are passed explicitly, so selenium's driver
  manager never runs and nothing is downloaded. Paths: TAG2MASK_CHROMIUM, TAG2MASK_CHROMEDRIVER
  (default /usr/bin/chromium, /usr/bin/chromedriver).
- ``ls_login(driver, ls)`` logs in with the user the Label Studio harness created.
- ``save_evidence(driver, folder, name)`` writes the page HTML and a screenshot and returns both paths.
- ``stage_layers(driver)`` returns the photo's on-screen box, its natural size and each canvas layer of
  the Konva stage as an RGBA array cropped to the photo, in CSS pixels.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
from pathlib import Path

import numpy as np

from tests.labelstudio import REPO

CHROMIUM = os.environ.get("TAG2MASK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TAG2MASK_CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1400, 1000)

__all__ = ["CHROMEDRIVER", "CHROMIUM", "ensure_browser", "headless_chromium", "ls_login", "save_evidence",
           "stage_layers"]


def ensure_browser() -> None:
    """Chromium and ChromeDriver are there (installed by scripts/browser_deps.sh when missing), or AssertionError."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "browser_deps.sh")], capture_output=True, text=True,
                         check=False, timeout=900, env={**os.environ, "TAG2MASK_CHROMIUM": CHROMIUM,
                                           "TAG2MASK_CHROMEDRIVER": CHROMEDRIVER})
    assert out.returncode == 0, f"the headless browser is not available:\n{out.stderr[-3000:]}"


@contextlib.contextmanager
def headless_chromium(page_load_timeout: float = 120):
    """A selenium Chrome WebDriver on headless Chromium; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--no-proxy-server", "--no-first-run", "--disable-background-networking", "--disable-extensions",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        driver.quit()


def ls_login(driver, ls, timeout: float = 60) -> None:
    """Log in through Label Studio's form at /user/login with the harness's user."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(ls.url + "/user/login")
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#login-form input[name=email]"))
    driver.find_element(By.CSS_SELECTOR, "#login-form input[name=email]").send_keys(ls.username)
    driver.find_element(By.CSS_SELECTOR, "#login-form input[name=password]").send_keys(ls.password)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(lambda d: "/user/login" not in d.current_url)
    assert any(c["name"] == "sessionid" for c in driver.get_cookies()), \
        f"logging in to Label Studio set no session cookie (now at {driver.current_url})"


def save_evidence(driver, folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.html`` (the live DOM) and ``<name>.png`` (the viewport) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    html, png = folder / f"{name}.html", folder / f"{name}.png"
    try:
        html.write_text(driver.page_source, encoding="utf-8")
    except Exception as e:  # noqa: BLE001 -- evidence of a failure must not hide the failure
        html.write_text(f"could not read the page: {e}")
    with contextlib.suppress(Exception):
        driver.save_screenshot(str(png))
    return html, png


_LAYERS_JS = """
const img = document.querySelector('.lsf-image img');
const stage = document.querySelector('.konvajs-content');
if (!img || !stage) return null;
const ir = img.getBoundingClientRect(), sr = stage.getBoundingClientRect();
return {img: {x: ir.x - sr.x, y: ir.y - sr.y, w: ir.width, h: ir.height, complete: img.complete,
              natural_w: img.naturalWidth, natural_h: img.naturalHeight},
        stage_w: sr.width,
        layers: Array.from(stage.querySelectorAll('canvas')).map(c => c.toDataURL('image/png'))};
"""


def stage_layers(driver) -> dict | None:
    """The photo's box and each Konva canvas layer as an (h, w, 4) uint8 array over the photo, in CSS pixels."""
    from PIL import Image

    info = driver.execute_script(_LAYERS_JS)
    if info is None:
        return None
    box = info["img"]
    layers = []
    for url in info["layers"]:
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA")
        scale = im.width / info["stage_w"] if info["stage_w"] else 1.0
        if scale != 1.0:
            im = im.resize((round(im.width / scale), round(im.height / scale)), Image.NEAREST)
        x, y = round(box["x"]), round(box["y"])
        layers.append(np.asarray(im)[y:y + round(box["h"]), x:x + round(box["w"])])
    return {"img": box, "layers": layers}

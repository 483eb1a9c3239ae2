"""A page-object driver of the OHIF v3 viewer that MONAI Label serves at ``/ohif/``, in headless Chromium.

It clicks what a user clicks (study list, MONAI Label mode, the panel's server field and its Auto / Point / Class
tabs) and records what the browser exchanged with the server from Chromium's performance log (DevTools ``Network``
events; bodies fetched with ``Network.getResponseBody``), so tests can check OHIF's real requests and answers.

Selectors relied on (OHIF 3.9 and the ``@ohif/extension-monai-label`` panel that MONAI Label 0.8.5 ships):
``[data-cy="studyRow-<StudyUID>"]``, ``[data-cy="mode-monai-label-<StudyUID>"]``,
``[data-cy="confirm-and-hide-button"]``, ``[data-viewport-uid="mpr-axial"] canvas``, ``#monailabelServerURL`` and
the ``.settingsTable`` connect button, the tabs' ``label.tab-label`` texts, ``select.selectBox`` and
``.modelSelector button.actionButton`` inside a tab, the Point tab's ``tr.clickable-row`` organ rows and the Class
tab's ``table.optionsTable`` checkboxes.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import nrrd
import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
AXIAL = "mpr-axial"  # the MONAI Label mode's hanging protocol is "mpr": axial, sagittal, coronal volume viewports
UPDATED = "updated the segmentation's scalar data"  # the panel's console line once a result is in the labelmap
T = TypeVar("T")


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """``check()``'s first truthy value; missing or stale elements (React re-renders) count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"OHIF: {what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Exchange:
    """One HTTP request the page made and, once finished, its answer."""

    request_id: str
    url: str
    method: str
    headers: dict[str, str]
    post_data: bytes
    status: int | None = None
    body: bytes | None = None
    finished: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    @property
    def query(self) -> dict[str, str]:
        return {key: values[-1] for key, values in parse_qs(urlsplit(self.url).query).items()}

    def form(self) -> dict[str, bytes]:
        """The multipart/form-data fields of the request body (OHIF posts ``params`` as one JSON field)."""
        content_type = next((v for k, v in self.headers.items() if k.lower() == "content-type"), "")
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + self.post_data)
        if not message.is_multipart():
            raise ValueError(f"{self.url}: not a multipart body ({content_type!r})")
        parts = message.iter_parts()
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in parts}

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.form()["params"])

    def nrrd(self) -> tuple[dict[str, Any], np.ndarray, int]:
        """The answer as an NRRD file: (header, data in the file's i, j, k order, header length in bytes)."""
        if self.body is None:
            raise ValueError(f"{self.url}: no answer body recorded")
        stream = io.BytesIO(self.body)
        header = nrrd.read_header(stream)
        header_bytes = stream.tell()
        return header, nrrd.read_data(header, stream), header_bytes


@dataclass
class BrowserLog:
    """Chromium's performance log (DevTools ``Network`` events) and console, drained as they come.

    ChromeDriver hands each log entry out once, so everything read is kept here. Bodies of requests whose path
    contains one of ``bodies_for`` are fetched over CDP as soon as they finish (Chromium keeps recent bodies in
    memory only), not those of the viewer's own scripts and images.
    """

    driver: webdriver.Chrome
    bodies_for: tuple[str, ...] = ("/infer/", "/info/")
    exchanges: list[Exchange] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    _by_id: dict[str, Exchange] = field(default_factory=dict)

    def poll(self) -> None:
        for entry in self.driver.get_log("browser"):
            self.console.append(entry["message"])
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            self._on_event(message["method"], message.get("params", {}))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        request_id = params.get("requestId", "")
        if method == "Network.requestWillBeSent":
            request = params["request"]
            post = request.get("postData")
            if post is None and request.get("hasPostData"):
                post = self._cdp("Network.getRequestPostData", request_id).get("postData")
            exchange = Exchange(
                request_id, request["url"], request["method"], request["headers"], (post or "").encode()
            )
            self._by_id[request_id] = exchange
            self.exchanges.append(exchange)
        elif method == "Network.responseReceived" and request_id in self._by_id:
            self._by_id[request_id].status = params["response"]["status"]
        elif method in ("Network.loadingFinished", "Network.loadingFailed") and request_id in self._by_id:
            exchange = self._by_id[request_id]
            wanted = any(part in exchange.path for part in self.bodies_for) and exchange.method != "OPTIONS"
            if method == "Network.loadingFinished" and wanted:
                answer = self._cdp("Network.getResponseBody", request_id)
                text = answer.get("body", "")
                exchange.body = base64.b64decode(text) if answer.get("base64Encoded") else text.encode()
            exchange.finished = True

    def _cdp(self, command: str, request_id: str) -> dict[str, Any]:
        """A DevTools call about one request; empty when Chromium no longer has its data (a page left since)."""
        try:
            return self.driver.execute_cdp_cmd(command, {"requestId": request_id})
        except WebDriverException:
            return {}

    def mark(self) -> tuple[int, int]:
        """Where the log stands now, to wait for what comes after."""
        self.poll()
        return len(self.exchanges), len(self.console)

    def wait_for_request(self, path_part: str, after: tuple[int, int], timeout: float) -> Exchange:
        """The first finished request after ``after`` whose path contains ``path_part``."""

        def finished() -> Exchange | None:
            self.poll()
            found = [e for e in self.exchanges[after[0] :] if path_part in e.path and e.method != "OPTIONS"]
            return found[0] if found and found[0].finished else None

        return wait_until(finished, timeout, f"a finished request to {path_part!r}")

    def wait_for_console(self, text: str, after: tuple[int, int], timeout: float) -> bool:
        """Whether the page logged ``text`` (after ``after``) within ``timeout`` seconds."""

        def logged() -> bool:
            self.poll()
            return any(text in line for line in self.console[after[1] :])

        try:
            return wait_until(logged, timeout, f"console line {text!r}")
        except TimeoutError:
            return False


class OhifViewer:
    """The study list, the MONAI Label mode's viewer and its panel, as a user drives them."""

    def __init__(self, driver: webdriver.Chrome, server_url: str, artefacts: Path) -> None:
        self.driver, self.server_url, self.artefacts = driver, server_url.rstrip("/"), artefacts
        self.log = BrowserLog(driver)

    # study list and viewer
    def open_study_list(self, timeout: float = 60) -> dict[str, str]:
        """Open ``/ohif/`` and dismiss the "investigational use" banner; ``{StudyInstanceUID: row text}``."""
        self.driver.get(f"{self.server_url}/ohif/")
        rows = wait_until(lambda: self._all('[data-cy^="studyRow-"]'), timeout, "the study list")
        for banner in self._all('[data-cy="confirm-and-hide-button"]'):
            banner.click()
        return {row.get_attribute("data-cy").removeprefix("studyRow-"): row.text for row in rows}

    def open_study(self, study_uid: str, timeout: float = 90) -> None:
        """Expand the study's row, start the "MONAI Label" mode and wait until the axial view shows the image."""
        self._click(self._one(f'[data-cy="studyRow-{study_uid}"]'))
        button = wait_until(lambda: self._all(f'[data-cy="mode-monai-label-{study_uid}"]'), 30, "the mode buttons")
        self._click(button[0])
        wait_until(lambda: self.viewport_image().std() > 20, timeout, "the image in the axial viewport")

    def viewport_image(self, viewport: str = AXIAL) -> np.ndarray:
        """What the viewport shows now (H x W x 3 RGB, screen pixels; overlays drawn on it included)."""
        element = self._one(f'[data-viewport-uid="{viewport}"] canvas')
        return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))

    def screenshot(self, name: str) -> Path:
        self.artefacts.mkdir(parents=True, exist_ok=True)
        path = self.artefacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    # MONAI Label panel
    def connect(self, timeout: float = 60) -> Exchange:
        """Type the server's URL into the panel's server field and connect; the ``/info/`` exchange."""
        after = self.log.mark()
        field_ = self._one("#monailabelServerURL")
        field_.send_keys(Keys.CONTROL, "a")  # not clear(): the panel re-renders after it and the field goes stale
        field_.send_keys(f"{self.server_url}/")
        self._click(self._one(".settingsTable button.actionButton"))
        info = self.log.wait_for_request("/info/", after, timeout)
        wait_until(lambda: self._tab("Auto-Segmentation"), timeout, "the panel's tabs")
        return info

    def run_auto(self, model: str, timeout: float = 240) -> Exchange:
        """The Auto-Segmentation tab's Run with ``model``."""
        tab = self._open_tab("Auto-Segmentation", model)
        return self._run(tab, timeout)

    def run_point(
        self, model: str, label: str, voxel: tuple[int, int], grid: tuple[int, int], timeout: float = 240
    ) -> Exchange:
        """The Point Prompts tab: pick ``label``, click voxel (i, j) of the axial view, Run.

        ``grid`` is the (columns, rows) of the axial slice. The view is assumed to show column i to the right and
        row j downwards (an LPS-stored series with identity directions, as the phantom's DICOM is), fitted to the
        canvas; the image's extent is found on screen. The voxel index OHIF sends back is in the request.

        Entering the tab makes OHIF's point tool the left button's. In one of the first runs here a click drew no
        point (cause not pinned down) and OHIF's Run then failed in the browser, so a click that draws no point is
        retried, with a warning, after leaving and entering the tab again (which activates the tool again).
        """
        handles = f'[data-viewport-uid="{AXIAL}"] svg circle'  # the point tool draws each point as a handle
        for attempt in range(1, 4):
            if attempt > 1:
                warnings.warn(f"OHIF: click {attempt - 1} drew no point; entering the Point tab again", stacklevel=2)
                auto = wait_until(lambda: self._tab("Auto-Segmentation"), 10, "the Auto tab")
                self._click(auto.find_element(By.CSS_SELECTOR, "label.tab-label"))
            tab = self._open_tab("Point Prompts", model)
            rows = tab.find_elements(By.CSS_SELECTOR, "tr.clickable-row")
            self._click(next(row for row in rows if row.text.strip() == label))
            x, y = _screen_position(self.viewport_image(), voxel, grid)
            canvas = self._one(f'[data-viewport-uid="{AXIAL}"] canvas')
            offset = (round(x - canvas.size["width"] / 2), round(y - canvas.size["height"] / 2))  # from its centre
            placed = len(self._all(handles))
            ActionChains(self.driver).move_to_element_with_offset(canvas, *offset).click().perform()
            if self._more(handles, placed, timeout=5):
                return self._run(tab, timeout)
        raise TimeoutError("OHIF: three clicks on the axial view drew no point (is the point tool active?)")

    def run_class(self, model: str, labels: list[str], timeout: float = 240) -> Exchange:
        """The Class Prompts tab: tick ``labels`` (none: OHIF's default, nothing ticked) and Run."""
        tab = self._open_tab("Class Prompts", model)
        for ticked in tab.find_elements(By.CSS_SELECTOR, "table.optionsTable input[type=checkbox]:checked"):
            self._click(ticked)
        for label in labels:  # the row's last cell is the label's name
            self._click(tab.find_element(By.XPATH, f".//table//tr[td[last()]='{label}']//input[@type='checkbox']"))
        return self._run(tab, timeout)

    # helpers
    def _open_tab(self, name: str, model: str) -> WebElement:
        tab = wait_until(lambda: self._tab(name), 30, f"the {name} tab")
        switch = tab.find_element(By.CSS_SELECTOR, "input.tab-switch")
        if not switch.is_selected():
            self._click(tab.find_element(By.CSS_SELECTOR, "label.tab-label"))
            wait_until(switch.is_selected, 10, f"the {name} tab opening")
        Select(tab.find_element(By.CSS_SELECTOR, "select.selectBox")).select_by_value(model)
        return tab

    def _run(self, tab: WebElement, timeout: float) -> Exchange:
        after = self.log.mark()
        self._click(tab.find_element(By.CSS_SELECTOR, ".modelSelector button.actionButton"))
        exchange = self.log.wait_for_request("/infer/", after, timeout)
        if exchange.status == 200:  # the panel puts the answer into the labelmap, then the viewports redraw
            self.log.wait_for_console(UPDATED, after, timeout=20)
            time.sleep(0.5)
        return exchange

    def _more(self, css: str, count: int, timeout: float) -> bool:
        """Whether more than ``count`` elements match ``css`` within ``timeout`` seconds."""
        try:
            return wait_until(lambda: len(self._all(css)) > count, timeout, f"more than {count} {css!r}")
        except TimeoutError:
            return False

    def _tab(self, name: str) -> WebElement | None:
        found = self.driver.find_elements(By.XPATH, f"//div[label[@class='tab-label' and normalize-space()='{name}']]")
        return found[0] if found else None

    def _one(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def _all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def _click(self, element: WebElement, timeout: float = 15) -> None:
        """Click as a user would, waiting out notifications that cover the element for a few seconds and content
        that is still being shown (a tab's table right after the tab opens was once not interactable in CI)."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)

        def clicked() -> bool:
            try:
                element.click()
                return True
            except (ElementClickInterceptedException, ElementNotInteractableException):
                return False

        wait_until(clicked, timeout, "a click on a shown element not covered by a notification")


def _screen_position(view: np.ndarray, voxel: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
    """Where voxel (i, j) is in a screenshot of an axial viewport: the image is the block of grey pixels (the
    viewport is black around it; overlay text and labels are coloured or sparse)."""
    grey = (view.max(-1).astype(int) - view.min(-1) < 12) & (view.max(-1) > 0)
    columns = np.flatnonzero(grey.sum(0) > grey.sum(0).max() / 2)
    rows = np.flatnonzero(grey.sum(1) > grey.sum(1).max() / 2)
    (x0, x1), (y0, y1) = (columns[0], columns[-1] + 1), (rows[0], rows[-1] + 1)
    return x0 + (voxel[0] + 0.5) * (x1 - x0) / grid[0], y0 + (voxel[1] + 0.5) * (y1 - y0) / grid[1]


def coloured_pixels(view: np.ndarray) -> int:
    """Pixels of clearly saturated colour (label overlays; the CT itself is grey)."""
    return int((view.max(-1).astype(int) - view.min(-1) > 40).sum())


@contextmanager
def launch(server_url: str, artefacts: Path, size: tuple[int, int] = (1920, 1080)) -> Iterator[OhifViewer]:
    """Headless Chromium on a fresh profile that reaches nothing but 127.0.0.1; on exit, the last screenshot and
    the console go to ``artefacts`` and the browser quits."""
    profile = Path(tempfile.mkdtemp(prefix="ohif-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1",
        "--enable-unsafe-swiftshader", "--use-angle=swiftshader",  # software WebGL for Cornerstone's volume viewports
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))  # no selenium-manager download
    viewer = OhifViewer(driver, server_url, artefacts)
    try:
        yield viewer
    finally:
        try:
            viewer.screenshot("last")
            viewer.log.poll()
            (artefacts / "console.log").write_text("\n".join(viewer.log.console))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)

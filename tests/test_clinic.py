"""The clinic page (`medmpc clinic`) in a real browser, Debian's headless Chromium driven by Selenium,
against a real running prediction service: upload, result, error cases, keyboard, and the API's
refusals of other web sites."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicoms import write_dicom
from medmpc_cli import MEDMPC, medmpc
from PIL import Image

from medmpc.serving.launch import LocalService

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver, which scripts/bootstrap.sh installs when run as root",
)
TOKEN = "clinic-" + uuid.uuid4().hex
WAIT_S = 60


@pytest.fixture(scope="module")
def service(trained_checkpoint, tmp_path_factory) -> Iterator[LocalService]:
    tokens = tmp_path_factory.mktemp("clinic-tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    with LocalService(trained_checkpoint, tokens, share_timeout_s=5, peer_timeout_s=60) as svc:
        yield svc


def _token_file(folder: Path, token: str) -> Path:
    path = folder / f"token-{uuid.uuid4().hex[:6]}"
    path.write_text(token + "\n")
    return path


class Clinic:
    """``medmpc clinic`` in its own process, on a port it picks."""

    def __init__(self, servers: list[str], token_file: Path) -> None:
        argv = [*MEDMPC, "clinic", "--servers", ",".join(servers), "--token-file", str(token_file), "--port", "0"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_S)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"clinic page at ((http://\S+/)\?key=(\S+))", line)
        if match is None:
            self.close()
            raise AssertionError(f"medmpc clinic did not start: {line!r}")
        self.address, self.url, self.key = match.groups()  # what a person opens; the page; its session key

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def clinic(service, tmp_path_factory) -> Iterator[Clinic]:
    running = Clinic(service.urls, _token_file(tmp_path_factory.mktemp("clinic"), TOKEN))
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,1300",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _upload(browser, address: str, files: list[Path]) -> list:
    """Open the page, choose ``files`` in its file input, and return the finished result items."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(address)
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))

    def finished(driver):
        items = driver.find_elements(By.CSS_SELECTOR, "#results li")
        done = [i for i in items if i.get_attribute("data-state") in ("done", "error")]
        return done if len(done) == len(files) else False

    items = WebDriverWait(browser, WAIT_S).until(finished)
    return list(reversed(items))  # newest first on the page


def _xray(chest_xray: Path) -> Path:
    return sorted((chest_xray / "val" / "PNEUMONIA").glob("*.jpeg"))[0]


def _shown(item) -> dict[str, object]:
    """What a person reads in a finished result: class, percentages, time, or the error."""
    from selenium.webdriver.common.by import By

    text = item.text
    if item.get_attribute("data-state") == "error":
        return {"error": text, "role": item.get_attribute("role")}
    names = [dt.text.lower().replace(" (predicted)", "") for dt in item.find_elements(By.TAG_NAME, "dt")]
    percents = [float(dd.text.split()[0]) for dd in item.find_elements(By.CSS_SELECTOR, "dd .percent")]
    return {
        "prediction": item.find_element(By.CSS_SELECTOR, ".prediction strong").text.lower(),
        "probabilities": dict(zip(names, percents)),
        "text": text,
    }


def test_a_chosen_xray_shows_the_prediction_medmpc_predict_gives(
    browser, clinic, service, chest_xray, tmp_path, trained_checkpoint
):
    from selenium.webdriver.common.by import By

    xray = _xray(chest_xray)
    broken = tmp_path / "broken scan.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with Image.open(xray) as img:  # the same X-ray as a hospital's archive holds it
        dicom = write_dicom(
            tmp_path / "xray.dcm", 255 - np.asarray(img.convert("L")), bits=8, photometric="MONOCHROME1"
        )
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 0).save(blank)  # what a wrong window or rescale gives
    good, bad, wrong_kind, empty, from_dicom = (
        _shown(i) for i in _upload(browser, clinic.address, [xray, broken, notes, blank, dicom])
    )

    token = _token_file(tmp_path, TOKEN)
    cli = medmpc("predict", xray, "--servers", ",".join(service.urls), "--token-file", token, "--json")
    answer = json.loads(cli.stdout)
    [expected] = answer["predictions"]
    assert answer["model_trained_on_synthetic_data"] is True  # the test model was trained on synthetic images
    assert "synthetic images only" in browser.find_element(By.ID, "status").text
    assert good["prediction"] == expected["prediction"]
    assert set(good["probabilities"]) == set(expected["probabilities"])
    for name, p in expected["probabilities"].items():  # two encryptions differ in the last fixed-point bits
        assert good["probabilities"][name] == pytest.approx(100 * p, abs=0.15)
    assert f"{expected['prediction']} (predicted)" in good["text"].lower()
    assert re.search(r"Took \d+\.\d\d s", good["text"]) and "random-looking share" in good["text"]

    # one bad file does not stop the others, and each says what is wrong with which file
    assert bad["role"] == "alert" and "broken scan.png" in bad["error"] and "cannot read image" in bad["error"]
    assert str(tmp_path) not in bad["error"]  # the clinic's temporary copy is never named
    assert wrong_kind["role"] == "alert" and "notes.txt is not an image file" in wrong_kind["error"]
    assert from_dicom["prediction"] == good["prediction"]  # DICOM reads as the viewer shows it
    for name, p in good["probabilities"].items():
        assert from_dicom["probabilities"][name] == pytest.approx(p, abs=0.3)
    assert "blank.png" in empty["error"] and "blank" in empty["error"]  # never a confident prediction on nothing

    screenshot = os.environ.get("MEDMPC_CLINIC_SCREENSHOT")  # docs/clinic.png is made this way
    if screenshot:
        browser.save_screenshot(screenshot)


def test_the_page_works_from_the_keyboard(browser, clinic):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(clinic.address)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "files"  # the first stop is the file chooser
    assert browser.find_element(By.CSS_SELECTOR, "label[for=files]").text  # and it is labelled


def test_a_bad_token_is_shown_as_such(browser, service, tmp_path, chest_xray):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stranger = Clinic(service.urls, _token_file(tmp_path, "not-" + TOKEN))
    try:
        browser.get(stranger.address)
        status = WebDriverWait(browser, WAIT_S).until(
            lambda d: (s := d.find_element(By.ID, "status")).get_attribute("class") == "problem" and s
        )
        assert "refused this clinic's token" in status.text
        [item] = _upload(browser, stranger.address, [_xray(chest_xray)])
        assert "refused this clinic's token" in _shown(item)["error"]
    finally:
        stranger.close()


def test_only_the_printed_address_opens_the_page_and_its_api(clinic):
    """Another program or user on this machine has no session key; another web site in the browser
    cannot add the clinic's header, and a DNS-rebinding page names its own host."""
    upload = {"X-Filename": "x.png", "Content-Type": "application/octet-stream", "X-Medmpc-Clinic": "1"}
    assert httpx.get(clinic.url, timeout=10).status_code == 401  # no key: no page
    assert httpx.get(clinic.url + "?key=" + clinic.key[::-1], timeout=10).status_code == 401
    stranger = httpx.post(clinic.url + "api/predict", content=b"x", headers=upload, timeout=10)
    assert stranger.status_code == 401 and "no clinic session" in stranger.json()["detail"]

    with httpx.Client(timeout=30) as person:  # opens the printed address, as a browser does
        page = person.get(clinic.address, follow_redirects=True)
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert clinic.key not in str(page.url)  # moved into an HttpOnly cookie, out of the address bar
        session = person.cookies.jar
        assert any(c.has_nonstandard_attr("HttpOnly") for c in session)
        forged_headers = {k: v for k, v in upload.items() if k != "X-Medmpc-Clinic"}
        forged = person.post(clinic.url + "api/predict", content=b"x", headers=forged_headers)
        assert forged.status_code == 403 and "X-Medmpc-Clinic" in forged.json()["detail"]
        rebound = person.get(clinic.url, headers={"Host": "attacker.example:80"})
        assert rebound.status_code == 421
        control = person.post(clinic.url + "api/predict", content=b"x", headers=upload)  # as the page sends it
        assert control.status_code == 422 and "x.png" in control.json()["detail"]


def test_a_taken_port_fails_at_once_in_one_line(clinic, service, tmp_path):
    port = clinic.url.rstrip("/").rsplit(":", 1)[1]
    token = _token_file(tmp_path, TOKEN)
    proc = medmpc("clinic", "--servers", ",".join(service.urls), "--token-file", token, "--port", port, check=False)
    assert proc.returncode == 2 and f"cannot listen at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_party_down_is_shown_in_the_page(browser, clinic, service, chest_xray):
    """Last in this module: it stops the service's compute party."""
    service.stop("compute")
    xray = _xray(chest_xray)
    [item] = _upload(browser, clinic.address, [xray])
    error = _shown(item)["error"]
    assert xray.name in item.text and ("unreachable" in error or "down" in error or "in time" in error)

"""The web viewer in a real browser (issue 7; R-RT-5, R-CE-8, R-PF-1, R-FE-1, R-VW-1).

Debian's Chromium, headless, driven by Playwright, renders through SwiftShader WebGL2 against a
live front-end holding the phantoms of ``tests/viewer_phantom.py`` (known geometry, so what the
UI measures is checked against truth). Every tool is used through the UI (toolbar buttons, keys,
mouse drags on the canvas) and has an asserted effect on the painted pixels or the measurement
panel. Screenshots go to ``tests/artifacts/`` (not in git); the first-image time and stack load
rate go to ``tests/artifacts/viewer-timings.json``.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, generate_uid
from scipy import ndimage  # type: ignore[import-untyped]

from api import viewer as viewer_module
from api.viewer import SETTINGS
from gateway.frontend import Frontend
from gateway.sample import ct_series
from gateway.security.permissions import Role
from tests.conftest import dcmtk, frontend_config, node_url, token
from tests.peers.ports import free_port
from tests.viewer_phantom import (
    INSERT,
    MARKERS,
    PET_HOT_BQML,
    SPACING,
    SQUARE,
    suv_bw,
    write_ct_phantom,
    write_pet_phantom,
    write_volume_phantom,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
HIDE_OVERLAY = ".corner, .orient { visibility: hidden !important; }"


@dataclass
class Studies:
    fe: Frontend
    base: str
    token: str
    phantom: str  # CT phantom (series 1) + volume phantom (series 2)
    prior: str  # the same patient, another hospital and date (history comparison)
    rate: str  # a 512 x 512 CT series for the load rate
    jls: str  # the same, JPEG-LS lossless
    fusion: str  # the volume phantom as CT + a PET phantom (PET-CT fusion)
    fusion_no_weight: str  # the same, the PET's header without PatientWeight (no SUV)
    received: Path  # what the workstation (storescp) stored


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    root = tmp_path_factory.mktemp("viewer")
    # a workstation for one-click send: dcmtk storescp, named in the node's viewer settings
    received = root / "workstation"
    received.mkdir()
    ws_port = free_port()
    storescp = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "RAD_WS1", "+xa", "-od", str(received), str(ws_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = root / "viewer.toml"
    settings.write_text(
        SETTINGS.read_text(encoding="utf-8")
        + f'\n[send.targets.RAD_WS1]\nae_title = "RAD_WS1"\nhost = "127.0.0.1"\nport = {ws_port}\n'
        + 'description = "reading room"\n'
        + "[weasis]\nenabled = true\n",  # the launch link (R-VW-1 u); off by default
        encoding="utf-8",
    )
    patch = pytest.MonkeyPatch()
    patch.setattr(viewer_module, "SETTINGS", settings)
    fe = Frontend.start(frontend_config(root / "fe"))
    try:
        phantom, paths = write_ct_phantom(root / "ct")
        paths += write_volume_phantom(root / "vol", phantom)
        prior, more = write_ct_phantom(
            root / "prior", slices=4, InstitutionName="OTHER_HOSPITAL", StudyDate="20250101"
        )
        paths += more
        rate_paths = ct_series(root / "rate", slices=100)
        # the same CT as JPEG-LS lossless (the archive's compressed form, decoded in the browser)
        jls_paths = []
        (root / "jls").mkdir()
        for i, src in enumerate(ct_series(root / "rate2", slices=100, study_uid=generate_uid())):
            dst = root / "jls" / f"{i:03d}.dcm"
            subprocess.run([dcmtk("dcmcjpls"), str(src), str(dst)], check=True)
            jls_paths.append(dst)
        # PET-CT: the volume phantom as CT and a PET on the same grid and frame of reference
        fusion, frame = generate_uid(), generate_uid()
        paths += write_volume_phantom(root / "fct", fusion, frame)
        paths += write_pet_phantom(root / "fpt", fusion, frame)
        no_weight, frame2 = generate_uid(), generate_uid()
        paths += write_volume_phantom(root / "fct2", no_weight, frame2)
        paths += write_pet_phantom(root / "fpt2", no_weight, frame2, weight=None)
        for p in paths + rate_paths + jls_paths:
            fe.ingest.accept_file(p, source="TEST")
        rate = dcmread_study(rate_paths[0])
        jls = dcmread_study(jls_paths[0])
        assert dcmread(jls_paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless
        yield Studies(
            fe,
            node_url(fe),
            token(fe, "qido wado api:send"),
            phantom,
            prior,
            rate,
            jls,
            fusion,
            no_weight,
            received,
        )
    finally:
        fe.stop()
        storescp.terminate()
        storescp.wait(10)
        patch.undo()


def dcmread_study(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        yield launch(p)


def launch(p: Playwright) -> Browser:
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors


def open_viewer(page: Page, s: Studies, study: str, extra: str = "") -> dict[str, Any]:
    page.goto(f"{s.base}/viewer/?study={study}{extra}#token={s.token}")
    page.wait_for_function("document.body.dataset.ready || document.body.dataset.error", timeout=60_000)
    assert page.evaluate("document.body.dataset.error") is None, page.inner_text("#status")
    timings: dict[str, Any] = page.evaluate("window.__ybyx.timings")
    return timings


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"))


def pixels(page: Page, cell: int = 0) -> np.ndarray:
    """The painted viewport (RGB, overlay text hidden) as an array."""
    page.add_style_tag(content=HIDE_OVERLAY)
    box = page.locator(".cell .vp").nth(cell).bounding_box()
    assert box is not None
    png = page.screenshot(clip=box)  # (an element screenshot would wait for a 3D view to settle)
    page.add_style_tag(content=".corner, .orient { visibility: visible !important; }")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def gray(page: Page, cell: int = 0) -> np.ndarray:
    out: np.ndarray = pixels(page, cell).mean(axis=2)
    return out


def blobs(img: np.ndarray, threshold: float = 245, close: int = 0) -> list[tuple[float, float, int]]:
    """(row, column, size) of bright connected regions, largest first (``close``: pixels of gap
    bridged first, for a shape the renderer's sampling notched)."""
    mask = img >= threshold
    if close:
        mask = ndimage.binary_closing(mask, iterations=close)
    labels, n = ndimage.label(mask)
    out = []
    for i in range(1, n + 1):
        rr, cc = np.nonzero(labels == i)
        out.append((float(rr.mean()), float(cc.mean()), len(rr)))
    return sorted(out, key=lambda b: -b[2])


@dataclass
class Mapping:
    """Image pixel (row, column) → position in the viewport element, from the two markers."""

    origin: tuple[float, float]
    scale: float
    box: tuple[float, float]  # the viewport element's page position

    def at(self, row: float, col: float) -> tuple[float, float]:
        """Page (x, y) of the centre of image pixel (row, col)."""
        return (
            self.box[0] + self.origin[1] + self.scale * (col + 0.5),
            self.box[1] + self.origin[0] + self.scale * (row + 0.5),
        )


def mapping(page: Page) -> Mapping:
    img = gray(page)
    found = [b for b in blobs(img) if b[2] < 400]  # the 3 x 3 markers, not the square
    assert len(found) >= 2, found
    (r1, c1, _), (r2, c2, _) = sorted(found[:2], key=lambda b: b[1])
    (mr1, mc1), (mr2, mc2) = MARKERS
    scale = math.hypot(r2 - r1, c2 - c1) / math.hypot(mr2 - mr1, mc2 - mc1)
    box = page.locator(".cell .vp").first.bounding_box()
    assert box is not None
    return Mapping((r1 - scale * (mr1 + 0.5), c1 - scale * (mc1 + 0.5)), scale, (box["x"], box["y"]))


def drag(page: Page, a: tuple[float, float], b: tuple[float, float], steps: int = 8) -> None:
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=steps)
    page.mouse.up()
    page.wait_for_timeout(450)  # outside Cornerstone's double-click window before the next press


def measurement(page: Page, prefix: str, numeric: bool = True) -> str:
    """The last line of the measurement panel starting with ``prefix``, once it holds a number
    (or any text, when not ``numeric``)."""
    try:
        page.wait_for_function(
            """([p, numeric]) => [...document.querySelectorAll('#measure-list li')]
                   .some(li => li.textContent.startsWith(p)
                               && (numeric ? /\\d/ : /\\S/).test(li.textContent.slice(p.length)))""",
            arg=[prefix, numeric],
            timeout=10_000,
        )
    except Exception:
        shot(page, "failed-" + re.sub(r"\W+", "-", prefix))
        raise
    texts = page.locator("#measure-list li").all_inner_texts()
    return next(t for t in reversed(texts) if t.startswith(prefix))


def number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1))


def quadrant(page: Page) -> str:
    """Where the phantom's asymmetric square is painted: 'top-left', 'top-right', …"""
    img = gray(page)
    big = blobs(img)[0]
    assert big[2] > 400, big  # the square, not a marker
    h, w = img.shape
    return f"{'top' if big[0] < h / 2 else 'bottom'}-{'left' if big[1] < w / 2 else 'right'}"


# ---- opening -------------------------------------------------------------------------------------


def test_first_image_overlay_thumbnails_and_load_rate(page: Page, studies: Studies) -> None:
    """R-PF-1: first image painted within 3 s of navigation; the stack streams after it."""
    timings = open_viewer(page, studies, studies.phantom)
    assert 0 < timings["firstImage"] < 3000, timings
    # the token left the address bar at once (it must not be bookmarked or copied)
    assert "token" not in page.evaluate("location.href")
    corners = " ".join(page.locator(".cell .corner").all_inner_texts())
    for expected in ("VIEWER^PHANTOM", "ID: PH001", "O 040Y", "TEST_HOSPITAL", "2026-01-01", "09:30:00"):
        assert expected in corners, (expected, corners)
    for expected in ("Se: 1", "Im: 1/6", "Loc: 0.0 mm", "Thick: 2.0 mm", "W: 400 L: 40", "Zoom:"):
        assert expected in corners, (expected, corners)
    markers = {side: page.inner_text(f".cell .orient.{side}") for side in ("top", "bottom", "left", "right")}
    assert markers == {"top": "A", "bottom": "P", "left": "R", "right": "L"}, markers
    nav = page.locator("#series .series-item")
    assert nav.count() == 2
    assert "6 images" in nav.nth(0).inner_text() and "48 images" in nav.nth(1).inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('#series img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    # the phantom is painted: water grey with the bright square and markers
    img = gray(page)
    assert len(blobs(img)) == 3, blobs(img)
    shot(page, "first-image")
    # the load rate on a 100-slice 512 x 512 CT (uncompressed) in a fresh page
    page.goto("about:blank")
    rate_timings = open_viewer(page, studies, studies.rate)
    ARTIFACTS.mkdir(exist_ok=True)
    record = {
        "phantom_first_image_ms": timings["firstImage"],
        "ct512_first_image_ms": rate_timings["firstImage"],
        "ct512_stack_images_per_s": round(rate_timings["stackRate"], 1),
        "ct512_stack_loaded_ms": rate_timings["stackLoaded"],
    }
    page.goto("about:blank")
    jls_timings = open_viewer(page, studies, studies.jls)
    record["ct512_jpegls_first_image_ms"] = jls_timings["firstImage"]
    record["ct512_jpegls_stack_images_per_s"] = round(jls_timings["stackRate"], 1)
    (ARTIFACTS / "viewer-timings.json").write_text(json.dumps(record, indent=2))
    print("viewer timings", record)
    assert rate_timings["firstImage"] < 3000, record
    # the sample patient's name in both forms (Alphabetic=Ideographic)
    assert "Zhang^San 张^三" in page.inner_text(".cell .corner.tl")
    assert rate_timings["stackRate"] >= 10, record  # R-PF-1: >= 10 CT images/s
    assert jls_timings["firstImage"] < 3000 and jls_timings["stackRate"] >= 10, record
    shot(page, "ct512")


def test_the_study_is_asked_for_at_html_parse_and_each_step_is_timed(page: Page, studies: Studies) -> None:
    """Issue 7 §5, R-PF-1: index.html's inline script asks for the series list and the shown
    series' metadata before the main chunk is evaluated, and the viewer uses those answers (one
    request each, not two); every step towards the first image is marked, in its order."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(urllib.parse.urlparse(r.url).path))
    timings = open_viewer(page, studies, studies.phantom)
    shown = page.evaluate("window.__ybyx.state.cells[0].series.uid")
    study = f"/dicom-web/studies/{studies.phantom}"
    assert seen.count(f"{study}/series") == 1, seen
    assert seen.count(f"{study}/series/{shown}/metadata") == 1, seen
    assert seen.count("/viewer/config.json") == 1, seen
    assert timings["earlyFetch"] < timings["bundleEvaluated"], timings
    order = [
        "htmlResponse",
        "bundleFetched",
        "bundleEvaluated",
        "coreInit",
        "loaderReady",
        "engineReady",
        "metadataLoaded",
        "firstFrameRequested",
        "firstFrameFetched",
        "firstDecoded",
        "stackSet",
        "firstRendered",
        "firstImage",
    ]
    missing = [step for step in [*order, "configFetched", "seriesListed"] if step not in timings]
    assert not missing, (missing, timings)
    assert [timings[s] for s in order] == sorted(timings[s] for s in order), {s: timings[s] for s in order}
    marks = page.evaluate("performance.getEntriesByType('mark').map(m => m.name)")
    wanted = {f"ybyx:{s}" for s in ("bundleEvaluated", "coreInit", "stackSet", "firstImage")}
    assert wanted <= set(marks), marks


# ---- display tools -------------------------------------------------------------------------------


def test_invert_wl_presets_and_pseudocolour(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    m = mapping(page)
    r0, c0 = int(m.origin[0] + m.scale * 40), int(m.origin[1] + m.scale * 40)
    r1, c1 = int(m.origin[0] + m.scale * 216), int(m.origin[1] + m.scale * 216)
    region = (slice(r0, r1), slice(c0, c1))  # inside the image
    before = gray(page)[region].mean()
    page.click("#btn-invert")
    after = gray(page)[region].mean()
    assert abs(before + after - 255) < 12 and abs(after - before) > 30, (before, after)
    shot(page, "invert")
    page.keyboard.press("i")  # and back, by key
    assert abs(gray(page)[region].mean() - before) < 3
    # W/L presets: water (0 HU) is bright in the lung window, dark in the bone window
    water = (slice(int(m.origin[0] + m.scale * 100), int(m.origin[0] + m.scale * 110)), region[1])
    page.select_option("#preset", "lung")
    lung = gray(page)
    assert "W: 1500 L: -600" in page.inner_text(".cell .corner.br")
    shot(page, "wl-lung")
    page.keyboard.press("3")  # bone, by key
    bone = gray(page)
    assert "W: 2000 L: 500" in page.inner_text(".cell .corner.br")
    assert lung[water].mean() > 200 and bone[water].mean() < 90, (lung[water].mean(), bone[water].mean())
    # the histogram moved as a whole: most of the image is bright in lung, dark in bone
    assert (lung[region] > 180).mean() > 0.5 and (bone[region] < 100).mean() > 0.5
    shot(page, "wl-bone")
    page.keyboard.press("0")  # auto: from the image's own values
    assert "W:" in page.inner_text(".cell .corner.br")
    # pseudo-colour: grey pixels turn coloured
    rgb = pixels(page)[region]
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() < 2
    page.select_option("#colormap", "hsv")
    rgb = pixels(page)[region]
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 20
    shot(page, "pseudocolour")
    # every map offered exists (a wrong name throws in the page: the fixture fails on page errors)
    for name in page.eval_on_selector_all("#colormap option", "os => os.map(o => o.value)"):
        page.select_option("#colormap", name)
        rgb = pixels(page)[region]
        coloured = np.abs(rgb[..., 0] - rgb[..., 2]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
        assert (coloured > 10) == (name != "none"), (name, coloured)


def test_rotate_and_mirror_move_the_marker(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    assert quadrant(page) == "top-left"
    for how, expected, name in (
        ("#btn-rotate-cw", "top-right", "rotate-cw"),
        ("#btn-rotate-ccw", "bottom-left", "rotate-ccw"),
        ("#btn-flip-h", "top-right", "flip-h"),
        ("#btn-flip-v", "bottom-left", "flip-v"),
        ("key:r", "top-right", "rotate-key"),
    ):
        if how.startswith("key:"):
            page.keyboard.press(how[4:])
        else:
            page.click(how)
        assert quadrant(page) == expected, name
        shot(page, name)
        page.click("#btn-reset")
        assert quadrant(page) == "top-left", f"reset after {name}"
    # orientation markers follow the camera: mirrored left-right, R and L swap
    page.click("#btn-flip-h")
    assert page.inner_text(".cell .orient.left") == "L" and page.inner_text(".cell .orient.right") == "R"


def test_mouse_zoom_pan_and_window(page: Page, studies: Studies) -> None:
    """R-VW-1 mouse: left drag zooms, middle drag pans, right drag changes W/L, wheel scrolls."""
    open_viewer(page, studies, studies.phantom)
    box = page.locator(".cell .vp").first.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    br = page.locator(".cell .corner.br")
    drag(page, (cx, cy), (cx, cy - 120))
    zoom = number(br.inner_text(), r"Zoom: (\d+)%")
    assert zoom != 100, br.inner_text()
    before = blobs(gray(page))[0]
    page.mouse.move(cx, cy)
    page.mouse.down(button="middle")
    page.mouse.move(cx + 80, cy, steps=5)
    page.mouse.up(button="middle")
    after = blobs(gray(page))[0]
    assert after[1] - before[1] > 40, (before, after)  # the square moved right
    drag_button(page, (cx, cy), (cx + 60, cy + 40), "right")
    assert "W: 400 L: 40" not in br.inner_text()
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, 120)
    page.wait_for_function("document.querySelector('.cell .corner.bl').textContent.includes('Im: 2/6')")
    shot(page, "mouse")


def drag_button(page: Page, a: tuple[float, float], b: tuple[float, float], button: Any) -> None:
    page.mouse.move(*a)
    page.mouse.down(button=button)
    page.mouse.move(*b, steps=6)
    page.mouse.up(button=button)


# ---- measurements --------------------------------------------------------------------------------


def test_length_between_markers_reads_100_mm(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    m = mapping(page)
    page.click("[data-tool='Length']")
    (ra, ca), (rb, cb) = MARKERS
    drag(page, m.at(ra, ca), m.at(rb, cb))
    text = measurement(page, "Length:")
    assert abs(number(text, r"Length: ([\d.]+) mm") - 100.0) <= 0.5, text
    assert SPACING == 0.5
    shot(page, "length")


def test_roi_probe_and_area_in_the_40_hu_insert(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    m = mapping(page)
    row, col, _ = INSERT
    page.keyboard.press("e")  # ellipse, by key
    drag(page, m.at(row, col), m.at(row + 12, col + 12))
    text = measurement(page, "Ellipse:")
    assert abs(number(text, r"mean (-?[\d.]+) HU") - 40) <= 2, text
    assert number(text, r"SD ([\d.]+)") < 2, text
    area = number(text, r"area ([\d.]+) mm")
    assert abs(area - math.pi * 6.0 * 6.0) / (math.pi * 36) < 0.15, text  # 12 px = 6 mm half-axes
    page.click("[data-tool='HUProbe']")
    page.mouse.click(*m.at(row, col))
    probe = measurement(page, "Probe:")
    assert abs(number(probe, r"Probe: (-?[\d.]+) HU") - 40) <= 0.5, probe
    page.mouse.click(*m.at(100, 128))  # water
    page.wait_for_function(
        "[...document.querySelectorAll('#measure-list li')]"
        ".filter(li => /^Probe: -?\\d/.test(li.textContent)).length == 2"
    )
    probes = [t for t in page.locator("#measure-list li").all_inner_texts() if t.startswith("Probe:")]
    assert len(probes) == 2 and abs(number(probes[-1], r"Probe: (-?[\d.]+) HU")) <= 0.5, probes
    page.click("[data-tool='RectangleROI']")
    drag(page, m.at(90, 100), m.at(110, 150))  # water: 0 HU
    rect = measurement(page, "Rectangle:")
    assert abs(number(rect, r"mean (-?[\d.]+) HU")) <= 2, rect
    assert abs(number(rect, r"area ([\d.]+) mm") - 10 * 25) < 25, rect  # 20 x 50 px = 10 x 25 mm
    shot(page, "roi-probe")


def test_angles_cobb_and_cardiothoracic_ratio(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    m = mapping(page)
    # Cobb angle: a horizontal line, then one at 30 degrees to it (long lines: the mouse moves
    # in whole CSS pixels)
    page.click("[data-tool='CobbAngle']")
    drag(page, m.at(60, 90), m.at(60, 170))
    a30 = math.radians(30)
    drag(page, m.at(240 - 100 * math.sin(a30), 140 + 100 * math.cos(a30)), m.at(240, 140))
    cobb = measurement(page, "Cobb:")
    assert abs(number(cobb, r"Cobb: ([\d.]+)°") - 30.0) <= 0.5, cobb
    shot(page, "cobb")
    # angle: three clicks, 90 degrees. Clicks closer than Cornerstone's double-click window
    # (400 ms) would be one double click; the drawings are kept apart (a press near a handle
    # grabs it).
    page.click("[data-tool='Angle']")
    for r, c in ((25, 190), (75, 190), (75, 240)):
        page.mouse.move(*m.at(r, c), steps=5)
        page.mouse.click(*m.at(r, c))
        page.wait_for_timeout(450)
    angle = measurement(page, "Angle:")
    assert abs(number(angle, r"Angle: ([\d.]+)°") - 90.0) <= 0.5, angle
    # cardiothoracic ratio: heart 60 mm (120 px), thorax 120 mm (240 px) → 0.5
    page.click("[data-tool='CardiothoracicRatio']")
    drag(page, m.at(140, 68), m.at(140, 188))
    drag(page, m.at(150, 8), m.at(150, 248))
    ctr = measurement(page, "CTR thorax")
    assert abs(number(ctr, r"ratio ([\d.]+)") - 0.5) <= 0.01, ctr
    shot(page, "ctr")
    # freehand ROI around the insert: an area near the insert's
    page.click("[data-tool='PlanarFreehandROI']")
    row, col, _ = INSERT
    pts = [m.at(row + 15 * math.sin(t), col + 15 * math.cos(t)) for t in np.linspace(0, 2 * math.pi, 40)]
    page.mouse.move(*pts[0])
    page.mouse.down()
    for p in pts[1:]:
        page.mouse.move(*p)
    page.mouse.up()
    free = measurement(page, "Freehand:")
    assert abs(number(free, r"mean (-?[\d.]+) HU") - 40) <= 2, free
    # text annotation: the text comes from a prompt
    page.once("dialog", lambda d: d.accept("结节 nodule"))
    page.click("[data-tool='ArrowAnnotate']")
    drag(page, m.at(15, 100), m.at(30, 130))
    assert "结节 nodule" in measurement(page, "Text:", numeric=False)
    shot(page, "annotations")
    page.keyboard.press("Delete")
    assert page.locator("#measure-list li").count() == 0


def test_no_pixel_spacing_is_said(page: Page, studies: Studies, tmp_path: Path) -> None:
    """Measurements say when the image has no PixelSpacing (values in pixels, not mm)."""
    study, paths = write_ct_phantom(tmp_path / "nospacing", slices=1)
    ds = dcmread(paths[0])
    del ds.PixelSpacing
    ds.save_as(paths[0])
    studies.fe.ingest.accept_file(paths[0], source="TEST")
    open_viewer(page, studies, study)
    m = mapping(page)
    page.click("[data-tool='Length']")
    drag(page, m.at(*MARKERS[0]), m.at(*MARKERS[1]))
    text = measurement(page, "Length:")
    shot(page, "no-pixel-spacing")
    assert "no PixelSpacing" in text and abs(number(text, r"Length: ([\d.]+) px") - 200) <= 1, text


def test_magnifier_cine_tags_layouts_and_toolbar(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    m = mapping(page)
    # magnifier: while the button is held, a magnified copy is shown
    page.keyboard.press("m")
    x, y = m.at(SQUARE[0] + 10, SQUARE[1] + SQUARE[2] + 4)
    page.mouse.move(x, y)
    page.mouse.down()
    page.wait_for_selector(".magnifyTool", state="visible")
    shot(page, "magnifier")
    page.mouse.up()
    # cine at 20 fps moves through the slices
    page.fill("#fps", "20")
    page.click("#btn-cine")
    page.wait_for_function("!document.querySelector('.cell .corner.bl').textContent.includes('Im: 1/6')")
    page.keyboard.press(" ")  # stop
    assert page.evaluate("document.body.dataset.cine") == ""
    # DICOM tag view of the current image
    page.keyboard.press("t")
    tags = page.inner_text("#tag-table")
    assert "(0010,0010)" in tags and "VIEWER^PHANTOM" in tags and "(0028,0030)" in tags
    shot(page, "tags")
    # layouts: 1x2 shows both series; image layout 2x2 tiles four images of one series
    page.select_option("#layout", "1x2")
    page.wait_for_function("document.body.dataset.layout === '1x2'")
    bl = page.locator(".cell .corner.bl").all_inner_texts()
    assert "Im: 1/6" in bl[0] and "Im: 1/48" in bl[1], bl
    page.keyboard.press("g")  # reference lines on
    shot(page, "layout-1x2")
    page.select_option("#layout", "img 2x2")
    page.wait_for_function("document.body.dataset.layout === '2x2'")
    bl = page.locator(".cell .corner.bl").all_inner_texts()
    assert [re.search(r"Im: (\d+)/", t).group(1) for t in bl] == ["1", "2", "3", "4"], bl  # type: ignore[union-attr]
    shot(page, "layout-images-2x2")
    # the toolbar moves to the bottom and back
    page.click("#btn-bar")
    tb = page.locator("#toolbar").bounding_box()
    grid = page.locator("#grid").bounding_box()
    assert tb is not None and grid is not None and tb["y"] > grid["y"]


# ---- volume views --------------------------------------------------------------------------------


def test_mpr_shows_the_sphere_sagittally_and_mip_brings_it_axially(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom)
    page.locator("#series .series-item").nth(1).click()
    page.wait_for_function("document.querySelector('.cell .corner.bl').textContent.includes('/48')")
    page.click("#btn-mpr")
    page.wait_for_function("document.body.dataset.volumeLoaded === '1'", timeout=60_000)
    page.wait_for_timeout(500)
    cells = page.locator(".cell")
    assert [cells.nth(i).get_attribute("data-orientation") for i in range(3)] == [
        "axial",
        "sagittal",
        "coronal",
    ]
    axial, sagittal, coronal = (gray(page, i) for i in range(3))
    shot(page, "mpr")
    found = blobs(sagittal, 200, close=3)
    assert len(found) == 1, found
    h, w = sagittal.shape
    r, c, _ = found[0]
    # anterior is left in a sagittal view; the sphere sits at y = 16 of 64 (anterior) and
    # z = 12 of 48 (inferior: low)
    assert c < w / 2 and r > h / 2, (found, sagittal.shape)
    assert not blobs(axial, 200) and not blobs(coronal, 200)
    # MIP with a 60 mm slab: the sphere appears in the axial view, anterior (top)
    page.select_option("#blend", "mip")
    page.fill("#slab", "60")
    page.press("#slab", "Enter")
    page.wait_for_function("document.body.dataset.blend === 'mip'")
    page.wait_for_timeout(500)
    axial = gray(page, 0)
    found = blobs(axial, 200, close=3)
    assert len(found) == 1 and found[0][0] < axial.shape[0] / 2, found
    shot(page, "mip")
    page.click("#btn-stack")
    page.wait_for_function("document.querySelectorAll('.cell').length === 1")


def test_3d_volume_rendering_shows_the_sphere(page: Page, studies: Studies) -> None:
    """3D with the CT-Bone preset: water transparent, the 1000 HU sphere opaque. A small window:
    software WebGL pays per pixel (a full-size first frame takes over a minute here)."""
    open_viewer(page, studies, studies.phantom)
    page.locator("#series .series-item").nth(1).click()
    page.wait_for_function("document.querySelector('.cell .corner.bl').textContent.includes('/48')")
    page.set_viewport_size({"width": 700, "height": 450})
    page.click("#btn-3d")
    page.wait_for_function("document.body.dataset.volumeMode === '3d'")
    page.wait_for_function("document.body.dataset.volumeLoaded === '1'", timeout=60_000)
    found: list[tuple[float, float, int]] = []
    for _ in range(40):
        found = blobs(gray(page, 0), 80, close=3)
        if found:
            break
        page.wait_for_timeout(500)
    shot(page, "3d")
    assert len(found) == 1 and found[0][2] > 50, found
    assert page.eval_on_selector("#vr-preset", "s => s.value") == "CT-Bone"
    assert page.locator("#vr-preset option").count() > 10


def test_pet_ct_fusion_shows_the_hot_spot_in_colour(page: Page, studies: Studies) -> None:
    """PET over CT: the PET hot sphere (central axial plane, patient's left) in colour over the
    grey CT; PET opacity 0 takes the colour away."""
    open_viewer(page, studies, studies.fusion)
    page.click("#btn-fusion")
    page.wait_for_function("document.body.dataset.fusionReady === '1'", timeout=60_000)
    page.wait_for_timeout(500)
    rgb = pixels(page, 0)
    shot(page, "fusion")
    colour = np.abs(rgb[..., 0] - rgb[..., 2]) > 60
    hot = blobs(colour.astype(float) * 255, 250, close=2)
    assert hot and hot[0][2] > 100, hot
    assert hot[0][1] > rgb.shape[1] / 2, hot  # image right = patient's left
    grey = ~colour & (rgb.mean(axis=2) > 50)
    assert grey.sum() > 10 * colour.sum()  # the CT around it stays grey
    page.evaluate("document.getElementById('pet-opacity').value = '0'")
    page.dispatch_event("#pet-opacity", "input")
    page.wait_for_function("document.body.dataset.fusion.endsWith(':0')")
    page.wait_for_timeout(300)
    rgb = pixels(page, 0)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).sum() < 10
    page.click("#btn-stack")


def open_fusion(page: Page, studies: Studies, study: str) -> tuple[float, float, float]:
    """The fusion of ``study``; the page position of the PET hot sphere's centre in the axial view
    and the painted size of one PET voxel (px)."""
    open_viewer(page, studies, study)
    page.click("#btn-fusion")
    page.wait_for_function("document.body.dataset.fusionReady === '1'", timeout=60_000)
    page.wait_for_timeout(500)
    rgb = pixels(page, 0)
    hot = blobs((np.abs(rgb[..., 0] - rgb[..., 2]) > 60).astype(float) * 255, 250, close=2)
    assert hot and hot[0][2] > 100, hot
    box = page.locator(".cell .vp").first.bounding_box()
    assert box is not None
    voxel = math.sqrt(hot[0][2] / (math.pi * 6**2))  # the sphere's central disc: radius 6 voxels
    return box["x"] + hot[0][1], box["y"] + hot[0][0], voxel


def test_suv_in_the_fusion_probe_and_roi(page: Page, studies: Studies) -> None:
    """R-VW-1 SUV: the probe and an ellipse on the PET layer read SUVbw within 1% of the value
    computed by hand from the phantom's header (activity, dose, half-life, times, weight)."""
    x, y, voxel = open_fusion(page, studies, studies.fusion)
    assert page.evaluate("document.body.dataset.suv") == "available"
    expected = suv_bw(PET_HOT_BQML)
    page.click("#btn-hu")
    page.mouse.click(x, y)
    text = measurement(page, "Probe PET:")
    assert abs(number(text, r"([\d.]+) SUVbw") - expected) <= 0.01 * expected, (text, expected)
    page.click("#btn-ellipse")
    # (inside the hot sphere, radius 6 voxels, whether the drag spans the ellipse's box or its
    # centre to a corner)
    drag(page, (x - voxel, y - voxel), (x + 1.5 * voxel, y + 1.5 * voxel))
    text = measurement(page, "Ellipse PET:")
    shot(page, "fusion-suv")
    assert number(text, r"(\d+) voxels") >= 4, text
    assert abs(number(text, r"SUVbw mean ([\d.]+)") - expected) <= 0.01 * expected, (text, expected)
    assert abs(number(text, r"max ([\d.]+)") - expected) <= 0.01 * expected, (text, expected)
    page.click("#btn-stack")


def test_a_pet_without_weight_says_suv_is_not_available(page: Page, studies: Studies) -> None:
    x, y, _ = open_fusion(page, studies, studies.fusion_no_weight)
    page.click("#btn-hu")
    page.mouse.click(x, y)
    text = measurement(page, "Probe PET:")
    assert "SUV not available: PatientWeight" in text and "SUVbw" not in text, text
    assert number(text, r"PET: ([\d.]+)") == PET_HOT_BQML  # the activity itself is still shown
    page.click("#btn-stack")


# ---- history comparison and embedding ------------------------------------------------------------


def test_history_comparison_side_by_side_with_synchronised_scrolling(page: Page, studies: Studies) -> None:
    open_viewer(page, studies, studies.phantom, f"&compare={studies.prior}")
    page.wait_for_function(f"document.body.dataset.compare === '{studies.prior}'")
    tr = page.locator(".cell .corner.tr").all_inner_texts()
    assert "TEST_HOSPITAL" in tr[0] and "OTHER_HOSPITAL" in tr[1] and "2025-01-01" in tr[1], tr
    box = page.locator(".cell .vp").first.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    page.mouse.wheel(0, 120)
    try:
        page.wait_for_function(
            "[...document.querySelectorAll('.cell .corner.bl')].every(e => e.textContent.includes('Im: 3/'))",
            timeout=10_000,
        )
    finally:
        shot(page, "compare")
    # past the end of the shorter prior: it stays on its nearest slice, the main one is not
    # pulled back
    page.mouse.wheel(0, 120)
    page.mouse.wheel(0, 120)
    page.wait_for_function("document.querySelectorAll('.cell .corner.bl')[0].textContent.includes('Im: 5/6')")
    page.wait_for_timeout(500)
    bl = page.locator(".cell .corner.bl").all_inner_texts()
    assert "Im: 5/6" in bl[0] and "Im: 4/4" in bl[1], bl


def test_embedding_by_postmessage(page: Page, studies: Studies) -> None:
    """R-FE-1: a HIS page frames the viewer and opens a study by postMessage (docs/viewer.md)."""
    host = f"{studies.base}/his-page.html"  # same origin: allowed without [embed] origins
    html = f"""<!doctype html><body><iframe id=v src="{studies.base}/viewer/" width=900 height=600></iframe>
    <script>
      window.events = [];
      window.addEventListener('message', (e) => {{
        window.events.push(e.data.type);
        if (e.data.type === 'ybyx.ready')
          document.getElementById('v').contentWindow.postMessage(
            {{type: 'ybyx.open', study: '{studies.phantom}', token: '{studies.token}'}}, '{studies.base}');
      }});
    </script></body>"""
    page.route(host, lambda route: route.fulfill(status=200, content_type="text/html", body=html))
    page.goto(host)
    page.wait_for_function("window.events.includes('ybyx.opened')", timeout=60_000)
    frame = page.frame_locator("#v")
    assert "VIEWER^PHANTOM" in frame.locator(".cell .corner.tl").inner_text()
    shot(page, "embedded")
    # a refused token: the viewer asks the page for a new one
    page.evaluate(
        f"""document.getElementById('v').contentWindow.postMessage(
             {{type: 'ybyx.open', study: '{studies.prior}', token: 'expired'}}, '{studies.base}')"""
    )
    page.wait_for_function("window.events.includes('ybyx.unauthorized')")
    # the page sends a good token and opens another study in the same viewer
    page.evaluate(
        f"""document.getElementById('v').contentWindow.postMessage(
             {{type: 'ybyx.open', study: '{studies.prior}', token: '{studies.token}'}}, '{studies.base}')"""
    )
    page.wait_for_function("window.events.filter(e => e === 'ybyx.opened').length === 2")
    assert "OTHER_HOSPITAL" in frame.locator(".cell .corner.tr").inner_text()


def test_a_logged_in_user_needs_no_token(page: Page, studies: Studies) -> None:
    """Issue 6 §2 sessions: after /auth/login the session cookie carries the viewer's requests."""
    assert studies.fe.security.logins is not None
    studies.fe.security.logins.users.create(
        "dr.viewer", Role.DOCTOR, "Kx8#vmQ2-tRw9p", institution="TEST_HOSPITAL"
    )
    r = page.request.post(
        f"{studies.base}/auth/login", data={"username": "dr.viewer", "password": "Kx8#vmQ2-tRw9p"}
    )
    assert r.status == 200, r.text()
    page.goto(f"{studies.base}/viewer/?study={studies.phantom}")
    page.wait_for_function("document.body.dataset.ready || document.body.dataset.error", timeout=60_000)
    assert page.evaluate("document.body.dataset.error") is None, page.inner_text("#status")
    assert "VIEWER^PHANTOM" in page.inner_text(".cell .corner.tl")


def test_the_viewer_without_a_token_shows_why(page: Page, studies: Studies) -> None:
    page.goto(f"{studies.base}/viewer/?study={studies.phantom}#token=not-a-token")
    page.wait_for_function("document.body.dataset.error")
    assert "401" in page.inner_text("#status")


# ---- one-click send ------------------------------------------------------------------------------


def test_one_click_send_delivers_the_series_to_the_workstation(page: Page, studies: Studies) -> None:
    """R-VW-1 u: the Send button C-STOREs the series from the node to a dcmtk storescp."""
    open_viewer(page, studies, studies.phantom)
    assert "reading room" in page.inner_text("#send-target")
    page.select_option("#send-what", "series")
    page.click("#btn-send")
    page.wait_for_function(
        "document.body.dataset.send && document.body.dataset.send !== 'running'", timeout=30_000
    )
    assert page.evaluate("document.body.dataset.send") == "done", page.inner_text("#status")
    assert page.evaluate("document.getElementById('send-progress').value") == 6
    shot(page, "send")
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in studies.received.iterdir()}
    mine = {i.sop_uid for i in studies.fe.archive.catalog.locate({"StudyInstanceUID": studies.phantom})}
    series = {
        i.sop_uid
        for i in studies.fe.archive.catalog.locate({"StudyInstanceUID": studies.phantom})
        if i.series_uid == page.evaluate("window.__ybyx.state.cells[0].series.uid")
    }
    assert len(series) == 6 and got == series and got < mine


# ---- Weasis launch link --------------------------------------------------------------------------


def test_weasis_link_opens_this_study_over_dicomweb_and_is_absent_when_off(
    page: Page, studies: Studies
) -> None:
    """R-VW-1 u: with [weasis] enabled the toolbar link is weasis://? + the URL-encoded
    $dicom:rs command for the open study on this node, with the viewer's bearer token."""
    open_viewer(page, studies, studies.phantom)
    page.wait_for_function(f"document.getElementById('btn-weasis')?.dataset.study === '{studies.phantom}'")
    href = page.get_attribute("#btn-weasis", "href")
    assert href is not None and href.startswith("weasis://?"), href
    expected = (
        f'$dicom:rs --url "{studies.base}/dicom-web" -r "studyUID={studies.phantom}"'
        f' -H "Authorization: Bearer {studies.token}"'
    )
    assert urllib.parse.unquote(href.removeprefix("weasis://?")) == expected

    # the same site with the option off: no link
    def without_weasis(route: Any) -> None:
        cfg = route.fetch().json()
        cfg["weasis"] = {"enabled": False}
        route.fulfill(json=cfg)

    page.route("**/viewer/config.json", without_weasis)
    open_viewer(page, studies, studies.prior)
    assert page.locator("#btn-weasis").count() == 0
    assert page.locator("#btn-fusion").count() == 1  # (the toolbar itself is there)

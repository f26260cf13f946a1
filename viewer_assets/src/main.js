// ybyx viewer entry (issue 7; R-RT-5, R-CE-8, R-PF-1, R-FE-1). Only what the first image needs is
// loaded here — Cornerstone core, the DICOM image loader (its codecs load in the decode worker on
// demand) and the overlay; tools, MPR/MIP/3D and the rest are imported after the first image is
// painted (R-PF-1: first image fast).
import {
  init as coreInit, RenderingEngine, Enums, eventTarget, imageLoader, cache, getRenderingCapabilities,
} from '@cornerstonejs/core';
import { init as loaderInit } from '@cornerstonejs/dicom-image-loader';
import { startSession, authHeaders, notifyParent, unauthorized } from './session.js';
import { loadSettings } from './settings.js';
import { loadSeriesList, imageIdsOf } from './study.js';
import { thumbnailUrl, studyInfo, value } from './dicomweb.js';
import { updateOverlay } from './overlay.js';
import { mark, timings, collectResourceTimings } from './timing.js';

mark('bundleEvaluated'); // (ES modules: runs after every static import above is evaluated)

const $ = (s) => document.querySelector(s);

export const state = {
  engine: null,
  study: null,
  compare: [],
  series: [], // of the main study
  compareSeries: [],
  cells: [], // {el, viewportId, series, index}
  selected: 0,
  layout: [1, 1],
  tools: null, // the lazily loaded tools module
};
window.__ybyx.state = state;

export function status(text, isError = false) {
  $('#status').innerHTML = '';
  const span = document.createElement('span');
  span.textContent = text;
  if (isError) span.className = 'error';
  $('#status').appendChild(span);
}

export function selectedCell() {
  return state.cells[state.selected];
}

export function viewportOf(cell) {
  return cell ? state.engine.getViewport(cell.viewportId) : null;
}

export function buildGrid(rows, cols) {
  state.layout = [rows, cols];
  const grid = $('#grid');
  const old = state.cells;
  for (const c of old) {
    try { state.engine.disableElement(c.viewportId); } catch { /* already gone */ }
  }
  grid.innerHTML = '';
  grid.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  grid.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
  state.cells = [];
  const inputs = [];
  for (let i = 0; i < rows * cols; i++) {
    const cell = document.createElement('div');
    cell.className = 'cell';
    cell.dataset.index = String(i);
    const vp = document.createElement('div');
    vp.className = 'vp';
    vp.oncontextmenu = (e) => e.preventDefault();
    cell.appendChild(vp);
    grid.appendChild(cell);
    const viewportId = `vp${i}-${Date.now()}`;
    state.cells.push({ el: cell, vpEl: vp, viewportId, series: null });
    inputs.push({ viewportId, type: Enums.ViewportType.STACK, element: vp, defaultOptions: { background: [0, 0, 0] } });
    cell.addEventListener('mousedown', () => selectCell(i), true);
  }
  state.engine.setViewports(inputs);
  for (const cell of state.cells) {
    for (const ev of [Enums.Events.IMAGE_RENDERED, Enums.Events.CAMERA_MODIFIED, Enums.Events.VOI_MODIFIED]) {
      cell.vpEl.addEventListener(ev, () => updateOverlay(cell.el, viewportOf(cell)));
    }
  }
  state.selected = 0;
  selectCell(0);
  state.tools?.attachViewports();
}

export function selectCell(i) {
  state.selected = i;
  state.cells.forEach((c, j) => c.el.classList.toggle('selected', j === i));
  state.tools?.onSelect?.();
}

/** Resolves when `element`'s viewport has painted `imageId` (IMAGE_RENDERED), at the latest after
 * 3 s (a render that never reports must not stop the viewer). Waiting for the paint before the
 * rest of the stack and the tools load keeps them off the first image's way (R-PF-1). */
function paintedOnce(element, imageId) {
  return new Promise((resolve) => {
    const done = () => {
      element.removeEventListener(Enums.Events.IMAGE_RENDERED, onRendered);
      clearTimeout(timer);
      resolve();
    };
    const onRendered = (e) => {
      const vp = e.detail?.viewport ?? state.engine?.getViewport(e.detail?.viewportId);
      if (!vp?.getCurrentImageId || vp.getCurrentImageId() === imageId) done();
    };
    const timer = setTimeout(done, 3000);
    element.addEventListener(Enums.Events.IMAGE_RENDERED, onRendered);
  });
}

/** Show `series` in `cell` (at image `index`), resolves when its first image is painted. */
export async function showSeries(cell, series, index = 0) {
  const viewport = viewportOf(cell);
  const ids = await imageIdsOf(series);
  if (!ids.length) throw new Error(`series ${series.number} has no images`);
  cell.series = series;
  const at = Math.min(index, ids.length - 1);
  const painted = paintedOnce(cell.vpEl, ids[at]);
  await viewport.setStack(ids, at);
  mark('stackSet');
  viewport.render();
  await painted;
  updateOverlay(cell.el, viewport);
  document.querySelectorAll('.series-item').forEach((el) => el.classList.toggle('active', el.dataset.uid === series.uid));
  return ids;
}

function seriesNav(list, label) {
  const nav = $('#series');
  if (label) {
    const h = document.createElement('div');
    h.className = 'desc';
    h.textContent = label;
    nav.appendChild(h);
  }
  for (const s of list) {
    const item = document.createElement('div');
    item.className = 'series-item';
    item.dataset.uid = s.uid;
    item.title = `${s.modality} series ${s.number}`;
    const img = document.createElement('img');
    img.alt = `series ${s.number}`;
    const desc = document.createElement('div');
    desc.className = 'desc';
    desc.textContent = `${s.modality} #${s.number} ${s.description}\n${s.count} images`;
    desc.style.whiteSpace = 'pre-line';
    item.append(img, desc);
    item.addEventListener('click', () => showSeries(selectedCell(), s).then(() => state.tools?.afterShow?.()));
    nav.appendChild(item);
    s.thumbEl = img;
  }
}

async function loadThumbnails(list) {
  for (const s of list) {
    try {
      s.thumbEl.src = await thumbnailUrl(s.study, s.uid);
    } catch (e) {
      s.thumbEl.alt = `no thumbnail: ${e.message}`;
    }
  }
}

/** Fetch every image of the stack into the cache; records the load rate (R-PF-1). */
async function prefetch(ids) {
  const start = performance.now();
  let done = 0;
  const total = ids.length;
  const promises = ids.map((id) =>
    imageLoader
      .loadAndCacheImage(id, { priority: 5, requestType: Enums.RequestType.Prefetch })
      .then(() => {
        done += 1;
        if (done % 10 === 0 || done === total) status(`loaded ${done}/${total}`);
      })
      .catch((e) => console.warn('prefetch', id, e)),
  );
  await Promise.all(promises);
  const seconds = (performance.now() - start) / 1000;
  const rate = total / Math.max(seconds, 0.001);
  timings.stackRate = rate;
  document.body.dataset.stackRate = rate.toFixed(1);
  mark('stackLoaded', true);
  status(`loaded ${total} images in ${seconds.toFixed(2)} s (${rate.toFixed(1)} images/s)`);
}

async function open({ study, compare }) {
  state.study = study;
  state.compare = compare;
  state.compareSeries = [];
  if (state.tools && state.cells.length !== 1) buildGrid(1, 1);
  $('#series').innerHTML = '';
  status(`opening study ${study}`);
  const [list] = await Promise.all([loadSeriesList(study).then((l) => (mark('seriesListed'), l)), coreReady]);
  state.series = list;
  if (!list.length) throw new Error(`study ${study} has no series here`);
  seriesNav(list);
  const first = list.find((s) => s.count > 0) ?? list[0];
  const ids = await showSeries(state.cells[0], first);
  mark('firstImage', true);
  collectResourceTimings();
  notifyParent({ type: 'ybyx.opened', study });
  // after the first image: thumbnails, the rest of the stack, the tools
  loadThumbnails(list);
  // once per page: a second study (ybyx.open from the HIS) reuses the tools
  const tools = state.tools
    ? Promise.resolve()
    : import('./tools.js').then(async (m) => {
        state.tools = m;
        await m.setupTools(state);
        mark('toolsReady');
      });
  await prefetch(ids);
  await tools;
  state.tools.studyOpened?.(study);
  for (const uid of compare) {
    const other = await loadSeriesList(uid);
    other.forEach((s) => (s.compare = true));
    state.compareSeries.push(...other);
    const info = await studyInfo(uid).catch(() => null);
    seriesNav(other, `对比 compare: ${value(info, '00080020') ?? uid} ${value(info, '00080080') ?? ''}`);
    loadThumbnails(other);
  }
  if (compare.length) await state.tools.openComparison();
  document.body.dataset.ready = '1';
}

let coreReady;

async function boot() {
  // Cornerstone's start (WebGL, the decode workers) needs nothing from the settings: in parallel
  coreReady = (async () => {
    // one WebGL context for all viewports (Cornerstone's default is a pool of 7, each created
    // up front: seconds of context creation and shader set-up in software WebGL, R-PF-1)
    await coreInit({ rendering: { webGlContextCount: 1 } });
    // vtk.js would probe this once more at the first texture (see vite.config.js reuseNorm16Probe)
    globalThis.__ybyxNorm16Linear = Boolean(getRenderingCapabilities().norm16Linear);
    mark('coreInit');
    loaderInit({
      maxWebWorkers: Math.max(1, Math.min(4, navigator.hardwareConcurrency || 2)),
      beforeSend: () => authHeaders(),
    });
    mark('loaderReady');
    cache.setMaxCacheSize(1024 * 1024 * 1024);
    state.engine = new RenderingEngine('ybyx');
    buildGrid(1, 1);
    mark('engineReady');
    // the canvases follow their cells (window resized, toolbar wrapped or moved): a stale canvas
    // size would stretch the image and break its aspect ratio
    new ResizeObserver(() => state.engine.resize(true, true)).observe($('#grid'));
  })();
  const settings = await loadSettings();
  mark('configFetched');
  if (settings.toolbar?.position === 'bottom') $('#app').className = 'toolbar-bottom';
  const params = new URLSearchParams(window.location.search);
  const run = (req) =>
    open(req).catch((e) => {
      console.error(e);
      const hint = /^401/.test(e.message) ? ' — log in, or open with #token=…' : '';
      status(`error: ${e.message}${hint}`, true);
      document.body.dataset.error = e.message;
      notifyParent({ type: 'ybyx.error', message: e.message });
    });
  startSession((req) => run(req)); // a message's token, if any, is set before this runs
  const study = params.get('study');
  if (study) {
    // with #token=… the bearer token; without, the user's session cookie (401 says to log in)
    const compare = (params.get('compare') ?? '').split(',').filter(Boolean);
    await run({ study, compare });
  } else {
    status('no study: open /viewer/?study=UID#token=… or send a ybyx.open message');
  }
}

eventTarget.addEventListener(Enums.Events.IMAGE_LOADED, () => mark('firstDecoded'));
document.addEventListener(Enums.Events.IMAGE_RENDERED, () => mark('firstRendered'), true);

eventTarget.addEventListener(Enums.Events.IMAGE_LOAD_ERROR, (e) => {
  const error = e.detail?.error;
  const code = error?.status ?? error?.request?.status;
  if (code === 401) unauthorized('401 for an image');
  status(`image load error: ${code ?? ''} ${error?.message ?? ''}`, true);
});

boot();

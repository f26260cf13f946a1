// Everything after the first image (issue 7 §3, R-VW-1): tools on the mouse and the toolbar,
// keyboard shortcuts, measurements panel, W/L presets, layouts, cine, tags, pseudo-colour,
// comparison; MPR/MIP/3D are one more lazy import (volume.js).
import {
  init as toolsInit, addTool, ToolGroupManager, Enums as TEnums, annotation, utilities as tUtils,
  ZoomTool, PanTool, WindowLevelTool, StackScrollTool, LengthTool, RectangleROITool, EllipticalROITool,
  AngleTool, CobbAngleTool, PlanarFreehandROITool, MagnifyTool, ArrowAnnotateTool, ReferenceLinesTool,
} from '@cornerstonejs/tools';
import { Enums, eventTarget, utilities as csUtils, cache } from '@cornerstonejs/core';
import { state, selectedCell, viewportOf, buildGrid, showSeries, selectCell, status } from './main.js';
import { presetsFor, getSettings } from './settings.js';
import { instanceOf } from './study.js';
import { value } from './dicomweb.js';
import { updateOverlay } from './overlay.js';
import { HUProbeTool, CardiothoracicRatioTool, updateCardiothoracicRatios } from './customTools.js';
import { sendToWorkstation, sendTargets } from './send.js';
import { weasisLink, updateWeasisLink } from './weasis.js';
import { fusionPet, petStatsIn, describeProbe, describeStats, petTextLines } from './pet.js';

const { MouseBindings } = TEnums;
const GROUP = 'stack';
let group;
let primary = ZoomTool.toolName;
let sync = null;
const $ = (s) => document.querySelector(s);

const MEASURE_TOOLS = {
  length: LengthTool.toolName,
  rectangle: RectangleROITool.toolName,
  ellipse: EllipticalROITool.toolName,
  angle: AngleTool.toolName,
  cobb: CobbAngleTool.toolName,
  freehand: PlanarFreehandROITool.toolName,
  probe: HUProbeTool.toolName,
  ctr: CardiothoracicRatioTool.toolName,
  text: ArrowAnnotateTool.toolName,
  magnify: MagnifyTool.toolName,
  zoom: ZoomTool.toolName,
  pan: PanTool.toolName,
  wl: WindowLevelTool.toolName,
};

const vp = () => viewportOf(selectedCell());
// what the measurement panel lists (not crosshairs, reference lines and the like)
const MEASURED = new Set([LengthTool, RectangleROITool, EllipticalROITool, AngleTool, CobbAngleTool, PlanarFreehandROITool,
  HUProbeTool, CardiothoracicRatioTool, ArrowAnnotateTool].map((T) => T.toolName));

function render(viewport = vp()) {
  viewport?.render();
}

// ---- actions (toolbar and keyboard call the same) ------------------------------------------------

export function setPrimary(toolName) {
  if (primary && primary !== toolName) {
    // annotation tools stay passive (their drawings remain editable); manipulators go back to
    // their own buttons (zoom: none once replaced, pan: middle, W/L: right)
    const keep = {
      [PanTool.toolName]: [{ mouseButton: MouseBindings.Auxiliary }],
      [WindowLevelTool.toolName]: [{ mouseButton: MouseBindings.Secondary }],
    }[primary];
    if (keep) group.setToolActive(primary, { bindings: keep });
    else group.setToolPassive(primary);
  }
  const bindings = [{ mouseButton: MouseBindings.Primary }];
  if (toolName === PanTool.toolName) bindings.push({ mouseButton: MouseBindings.Auxiliary });
  if (toolName === WindowLevelTool.toolName) bindings.push({ mouseButton: MouseBindings.Secondary });
  group.setToolActive(toolName, { bindings });
  primary = toolName;
  document.querySelectorAll('#toolbar [data-tool]').forEach((b) => b.classList.toggle('active', b.dataset.tool === toolName));
  document.body.dataset.tool = toolName;
}

export function applyPreset(name) {
  const viewport = vp();
  if (!viewport) return;
  if (name === 'auto') {
    const image = viewport.getCornerstoneImage();
    if (!image) return;
    // from the image's own values: ignore the extremes (0.5 % each side), like an MR auto W/L
    const px = image.getPixelData();
    const scale = image.preScale?.scaled ? 1 : (image.slope ?? 1);
    const shift = image.preScale?.scaled ? 0 : (image.intercept ?? 0);
    const step = Math.max(1, Math.floor(px.length / 20000));
    const sample = [];
    for (let i = 0; i < px.length; i += step) sample.push(px[i] * scale + shift);
    sample.sort((a, b) => a - b);
    const lower = sample[Math.floor(sample.length * 0.005)];
    const upper = sample[Math.ceil(sample.length * 0.995) - 1];
    viewport.setProperties({ voiRange: { lower, upper: Math.max(upper, lower + 1) } });
  } else {
    const modality = viewport.modality || 'CT';
    const p = presetsFor(modality)[name] ?? presetsFor('CT')[name];
    if (!p) return;
    viewport.setProperties({ voiRange: csUtils.windowLevel.toLowHighRange(p.window, p.level) });
  }
  render(viewport);
  document.body.dataset.preset = name;
}

export function invert() {
  const viewport = vp();
  viewport.setProperties({ invert: !viewport.getProperties().invert });
  render(viewport);
}

export function rotate(degrees) {
  const viewport = vp();
  const current = viewport.getViewPresentation().rotation ?? 0;
  viewport.setViewPresentation({ rotation: (((current + degrees) % 360) + 360) % 360 });
  render(viewport);
}

export function flip(horizontal) {
  const viewport = vp();
  const cam = viewport.getCamera();
  viewport.setCamera(horizontal ? { flipHorizontal: !cam.flipHorizontal } : { flipVertical: !cam.flipVertical });
  render(viewport);
}

export function reset() {
  const viewport = vp();
  viewport.resetCamera();
  viewport.resetProperties();
  viewport.setViewPresentation?.({ rotation: 0 });
  render(viewport);
}

export function setColormap(name) {
  const viewport = vp();
  // (unsetColormap is not implemented for GPU rendering in 5.14.0: back to grey is a grey map)
  viewport.setProperties({ colormap: { name: !name || name === 'none' ? 'Grayscale' : name } });
  render(viewport);
}

export async function setLayout(rows, cols, mode = 'series') {
  const current = selectedCell();
  const series = current?.series;
  const index = vp()?.getCurrentImageIdIndex?.() ?? 0;
  buildGrid(rows, cols);
  const all = [...state.series, ...state.compareSeries];
  const jobs = state.cells.map((cell, i) => {
    if (mode === 'images' && series) return showSeries(cell, series, index + i);
    const s = i === 0 && series ? series : all.filter((x) => x !== series)[i - (series ? 1 : 0)];
    return s ? showSeries(cell, s) : null;
  });
  await Promise.all(jobs.filter(Boolean));
  document.body.dataset.layout = `${rows}x${cols}`;
}

let cineOn = false;
export function toggleCine(fps) {
  const viewport = vp();
  const el = selectedCell().vpEl;
  if (cineOn) {
    tUtils.cine.stopClip(el);
    cineOn = false;
  } else {
    tUtils.cine.playClip(el, { framesPerSecond: fps, loop: true, viewportId: viewport.id });
    cineOn = true;
  }
  document.body.dataset.cine = cineOn ? String(fps) : '';
  $('#btn-cine').classList.toggle('active', cineOn);
}

let refLines = false;
export function toggleReferenceLines() {
  refLines = !refLines;
  if (refLines) {
    group.setToolConfiguration(ReferenceLinesTool.toolName, { sourceViewportId: selectedCell().viewportId });
    group.setToolEnabled(ReferenceLinesTool.toolName);
  } else {
    group.setToolDisabled(ReferenceLinesTool.toolName);
  }
  $('#btn-ref').classList.toggle('active', refLines);
  state.cells.forEach((c) => render(viewportOf(c)));
}

export function toggleTags() {
  const panel = $('#tags');
  panel.hidden = !panel.hidden;
  if (!panel.hidden) showTags();
}

function showTags() {
  const panel = $('#tags');
  if (panel.hidden) return;
  const viewport = vp();
  const ds = viewport ? instanceOf(viewport.getCurrentImageId()) : null;
  const table = $('#tag-table');
  table.innerHTML = '';
  for (const [tag, el] of Object.entries(ds ?? {}).sort()) {
    const tr = document.createElement('tr');
    let v = '';
    if (el.Value) v = el.Value.map((x) => (x && typeof x === 'object' ? (x.Alphabetic ?? '[item]') : String(x))).join('\\');
    else if (el.BulkDataURI || el.InlineBinary) v = '(binary)';
    const cells = [`(${tag.slice(0, 4)},${tag.slice(4)})`, el.vr ?? '', v.slice(0, 120)];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
}

export function toggleToolbarPosition() {
  const app = $('#app');
  app.className = app.className === 'toolbar-bottom' ? 'toolbar-top' : 'toolbar-bottom';
  state.engine.resize(true, true);
}

export function clearMeasurements() {
  annotation.state.removeAllAnnotations();
  state.cells.forEach((c) => render(viewportOf(c)));
  updateMeasurements();
}

// ---- measurements panel -------------------------------------------------------------------------

const r1 = (x) => (typeof x === 'number' ? x.toFixed(1) : '?');

function describe(a) {
  const stats = Object.values(a.data.cachedStats ?? {})[0] ?? {};
  const name = a.metadata.toolName;
  // drawn on the PET-CT fusion (marked when added, below)
  if (fusionPet() && a.data.onPet) {
    const points = a.data.handles?.points;
    if (name === HUProbeTool.toolName) return `Probe ${describeProbe(stats.petValue ?? null)}`;
    if (name === EllipticalROITool.toolName) return `Ellipse ${describeStats(petStatsIn(points, true))}`;
    if (name === RectangleROITool.toolName) return `Rectangle ${describeStats(petStatsIn(points, false))}`;
  }
  const unitNote = (u) => (u === 'px' || u === 'px²' || u === 'px\xb2' ? ' (no PixelSpacing: pixels)' : '');
  switch (name) {
    case LengthTool.toolName:
      return `Length: ${r1(stats.length)} ${stats.unit ?? ''}${unitNote(stats.unit)}`;
    case CardiothoracicRatioTool.toolName:
      return `CTR ${a.data.ctrRole ?? ''}: ${r1(stats.length)} ${stats.unit ?? ''}${a.data.ctrRatio !== undefined ? ` ratio ${a.data.ctrRatio.toFixed(3)}` : ''}${unitNote(stats.unit)}`;
    case AngleTool.toolName:
      return `Angle: ${r1(stats.angle)}°`;
    case CobbAngleTool.toolName:
      return `Cobb: ${r1(stats.angle)}°`;
    case EllipticalROITool.toolName:
    case RectangleROITool.toolName:
    case PlanarFreehandROITool.toolName: {
      const label = { [EllipticalROITool.toolName]: 'Ellipse', [RectangleROITool.toolName]: 'Rectangle' }[name] ?? 'Freehand';
      const mu = stats.modalityUnit ?? '';
      return `${label}: mean ${r1(stats.mean)} ${mu} SD ${r1(stats.stdDev)} ${mu} area ${r1(stats.area)} ${stats.areaUnit ?? ''}${unitNote(stats.areaUnit)}`;
    }
    case HUProbeTool.toolName:
      return `Probe: ${r1(stats.value)} ${stats.modalityUnit ?? ''}`;
    case ArrowAnnotateTool.toolName:
      return `Text: ${a.data.label ?? a.data.text ?? ''}`;
    default:
      return name;
  }
}

export function updateMeasurements() {
  updateCardiothoracicRatios();
  const list = $('#measure-list');
  list.innerHTML = '';
  for (const a of annotation.state.getAllAnnotations()) {
    if (!MEASURED.has(a.metadata?.toolName)) continue;
    const li = document.createElement('li');
    li.dataset.tool = a.metadata.toolName;
    li.textContent = describe(a);
    list.appendChild(li);
  }
}

// ---- toolbar and keyboard -----------------------------------------------------------------------

function button(label, title, onClick, attrs = {}) {
  const b = document.createElement('button');
  b.textContent = label;
  b.title = title;
  Object.assign(b.dataset, attrs.data ?? {});
  if (attrs.id) b.id = attrs.id;
  b.addEventListener('click', onClick);
  return b;
}

const sep = () => Object.assign(document.createElement('span'), { className: 'sep' });

function buildToolbar() {
  const tb = $('#toolbar');
  tb.innerHTML = '';
  const tool = (label, key, name, title) =>
    button(label, `${title} [${key}]`, () => setPrimary(name), { data: { tool: name }, id: `btn-${label.toLowerCase().replace(/\W+/g, '-')}` });
  tb.append(
    tool('Zoom', 'Z', ZoomTool.toolName, '缩放 zoom (left drag)'),
    tool('Pan', 'P', PanTool.toolName, '平移 pan (middle drag)'),
    tool('W/L', 'W', WindowLevelTool.toolName, '窗宽窗位 window/level (right drag)'),
  );
  const presets = document.createElement('select');
  presets.id = 'preset';
  presets.title = 'W/L presets [1-6, 0 = auto]';
  presets.append(new Option('W/L preset', ''));
  for (const [name, p] of Object.entries(presetsFor('CT'))) presets.append(new Option(`${name} (${p.key ?? ''})`, name));
  presets.append(new Option('auto (0)', 'auto'));
  presets.addEventListener('change', () => presets.value && applyPreset(presets.value));
  tb.append(presets, sep());
  tb.append(
    button('Invert', '反色 invert [I]', invert, { id: 'btn-invert' }),
    button('Rot ↻', '顺时针旋转 rotate CW [R]', () => rotate(90), { id: 'btn-rotate-cw' }),
    button('Rot ↺', '逆时针旋转 rotate CCW [Shift+R]', () => rotate(-90), { id: 'btn-rotate-ccw' }),
    button('Flip H', '水平镜像 mirror horizontally [H]', () => flip(true), { id: 'btn-flip-h' }),
    button('Flip V', '垂直镜像 mirror vertically [V]', () => flip(false), { id: 'btn-flip-v' }),
    button('Reset', '复位 reset [Home]', reset, { id: 'btn-reset' }),
    sep(),
    tool('Magnify', 'M', MagnifyTool.toolName, '放大镜 magnifier'),
    tool('Length', 'L', LengthTool.toolName, '长度 length'),
    tool('Rect', 'B', RectangleROITool.toolName, '矩形 rectangle ROI'),
    tool('Ellipse', 'E', EllipticalROITool.toolName, '椭圆 ellipse ROI'),
    tool('Angle', 'A', AngleTool.toolName, '角度 angle'),
    tool('Cobb', 'K', CobbAngleTool.toolName, 'Cobb角 Cobb angle'),
    tool('Freehand', 'F', PlanarFreehandROITool.toolName, '自由ROI freehand'),
    tool('HU', 'U', HUProbeTool.toolName, 'CT值 probe'),
    tool('CTR', 'Q', CardiothoracicRatioTool.toolName, '心胸比: heart line, then thorax line'),
    tool('Text', 'N', ArrowAnnotateTool.toolName, '文字标注 text annotation'),
    button('Clear', '清除测量 clear measurements [Delete]', clearMeasurements, { id: 'btn-clear' }),
    sep(),
  );
  const layout = document.createElement('select');
  layout.id = 'layout';
  layout.title = '布局 layout (series; "img" = images of one series) [Shift+1..4]';
  for (const l of ['1x1', '1x2', '2x1', '2x2', '3x3', '4x4', 'img 2x2', 'img 3x3', 'custom…']) layout.append(new Option(l, l));
  layout.addEventListener('change', () => {
    let v = layout.value;
    if (v === 'custom…') v = window.prompt('rows x columns, e.g. 2x3', '2x3') ?? '1x1';
    const images = v.startsWith('img ');
    const m = /(\d)x(\d)/.exec(v);
    if (m) setLayout(Math.min(+m[1], 4), Math.min(+m[2], 4), images ? 'images' : 'series');
  });
  const cmap = document.createElement('select');
  cmap.id = 'colormap';
  cmap.title = '伪彩 pseudo-colour';
  for (const c of ['none', 'hsv', 'Black-Body Radiation', 'jet', 'Rainbow Blended Grey', 'Cool to Warm']) cmap.append(new Option(c === 'none' ? 'colour: grey' : c, c));
  cmap.addEventListener('change', () => setColormap(cmap.value));
  const fps = Object.assign(document.createElement('input'), { type: 'number', id: 'fps', min: 1, max: 60, value: getSettings().cine?.fps ?? 10 });
  fps.style.width = '48px';
  fps.title = 'cine frames per second';
  tb.append(
    layout,
    button('RefLines', '定位线 reference lines [G]', toggleReferenceLines, { id: 'btn-ref' }),
    button('Cine', '电影 cine [Space]', () => toggleCine(+fps.value || 10), { id: 'btn-cine' }),
    fps,
    cmap,
    button('Tags', 'DICOM 标签 tag view [T]', toggleTags, { id: 'btn-tags' }),
    sep(),
    button('MPR', '多平面重建 MPR with crosshairs [Shift+M]', () => volumeMode('mpr'), { id: 'btn-mpr' }),
    button('MIP', '最大密度投影 MIP (MinIP/AvgIP in the MPR bar)', () => volumeMode('mip'), { id: 'btn-mip' }),
    button('3D', '容积再现 volume rendering', () => volumeMode('3d'), { id: 'btn-3d' }),
    button('Fusion', 'PET-CT 融合 fusion', () => volumeMode('fusion'), { id: 'btn-fusion' }),
    button('Stack', 'back to the stack view [S]', () => volumeMode(null), { id: 'btn-stack' }),
    sep(),
    button('⇅ bar', 'toolbar top/bottom', toggleToolbarPosition, { id: 'btn-bar' }),
  );
  const mode = document.createElement('span');
  mode.id = 'volume-bar';
  tb.append(mode);
  if (getSettings().weasis?.enabled) tb.append(sep(), weasisLink());
  if (getSettings().send?.configured) addSendControls(tb);
}

// One-click send: only the targets the node offers this user (their institution's, R-VW-1 u).
async function addSendControls(tb) {
  let targets = [];
  try {
    targets = await sendTargets();
  } catch (e) {
    console.warn('send targets not loaded', e);
  }
  if (targets.length) {
    const target = document.createElement('select');
    target.id = 'send-target';
    target.title = '一键发送 send to workstation';
    for (const t of targets) target.append(new Option(t.description ? `${t.name}: ${t.description}` : t.name, t.name));
    const what = document.createElement('select');
    what.id = 'send-what';
    what.append(new Option('series', 'series'), new Option('study', 'study'));
    const bar = Object.assign(document.createElement('progress'), { id: 'send-progress', max: 1, value: 0 });
    tb.append(sep(), target, what, button('Send', '一键发送 send to the workstation [Shift+S]', () => sendCurrent(), { id: 'btn-send' }), bar);
  }
  document.body.dataset.sendTargets = String(targets.length);
}

export async function sendCurrent() {
  const cell = selectedCell();
  const series = cell?.series;
  if (!series) return;
  const bar = $('#send-progress');
  const req = { study: series.study, series: $('#send-what').value === 'series' ? series.uid : null, target: $('#send-target').value };
  document.body.dataset.send = 'running';
  try {
    const job = await sendToWorkstation(req, (j) => {
      bar.max = j.total || 1;
      bar.value = j.sent;
      status(`sending to ${j.target}: ${j.sent}/${j.total}`);
    });
    document.body.dataset.send = job.state;
    status(job.state === 'done' ? `sent ${job.sent} images to ${job.target}` : `send failed: ${job.error}`, job.state !== 'done');
  } catch (e) {
    document.body.dataset.send = 'failed';
    status(`send failed: ${e.message}`, true);
  }
}

const KEYS = {
  z: () => setPrimary(ZoomTool.toolName),
  p: () => setPrimary(PanTool.toolName),
  w: () => setPrimary(WindowLevelTool.toolName),
  i: invert,
  r: () => rotate(90),
  R: () => rotate(-90),
  h: () => flip(true),
  v: () => flip(false),
  Home: reset,
  m: () => setPrimary(MagnifyTool.toolName),
  l: () => setPrimary(LengthTool.toolName),
  b: () => setPrimary(RectangleROITool.toolName),
  e: () => setPrimary(EllipticalROITool.toolName),
  a: () => setPrimary(AngleTool.toolName),
  k: () => setPrimary(CobbAngleTool.toolName),
  f: () => setPrimary(PlanarFreehandROITool.toolName),
  u: () => setPrimary(HUProbeTool.toolName),
  q: () => setPrimary(CardiothoracicRatioTool.toolName),
  n: () => setPrimary(ArrowAnnotateTool.toolName),
  g: toggleReferenceLines,
  t: toggleTags,
  ' ': () => toggleCine(+$('#fps').value || 10),
  Delete: clearMeasurements,
  M: () => volumeMode('mpr'),
  S: () => sendCurrent(),
  s: () => volumeMode(null),
  0: () => applyPreset('auto'),
  '!': () => setLayout(1, 1),
  '@': () => setLayout(1, 2),
  '#': () => setLayout(2, 2),
  $: () => setLayout(3, 3),
  ArrowDown: () => vp()?.scroll(1),
  ArrowUp: () => vp()?.scroll(-1),
};

function onKey(e) {
  if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement || e.ctrlKey || e.metaKey || e.altKey) return;
  const presetKey = Object.entries(presetsFor('CT')).find(([, p]) => p.key === e.key);
  const action = presetKey ? () => applyPreset(presetKey[0]) : KEYS[e.key];
  if (action) {
    e.preventDefault();
    action();
  }
}

// ---- volume modes (lazy) ------------------------------------------------------------------------

let volume = null;
export async function volumeMode(mode) {
  if (!volume && mode) volume = await import('./volume.js');
  if (volume) await volume.setMode(mode, { state, group, status, selectedSeries: selectedCell()?.series });
}

// ---- comparison ---------------------------------------------------------------------------------

export async function openComparison() {
  const main = selectedCell().series;
  const other = state.compareSeries.find((s) => s.modality === main.modality) ?? state.compareSeries[0];
  if (!other) return;
  buildGrid(1, 2);
  await Promise.all([showSeries(state.cells[0], main), showSeries(state.cells[1], other)]);
  // synchronised scrolling. Studies from other dates and hospitals have their own frames of
  // reference (Cornerstone's slice synchroniser needs a registration between them), so the
  // slices are matched here by SliceLocation when both have it, else by the step from the start.
  sync?.();
  const [a, b] = state.cells;
  sync = linkScrolling(a, b);
  document.body.dataset.compare = other.study;
}

function sliceLocation(imageId) {
  const v = value(instanceOf(imageId), '00201041');
  return v === undefined ? undefined : Number(v);
}

function linkScrolling(a, b) {
  // a move we made in the partner is not followed back (it would bounce between unequal stacks)
  const expected = new Map();
  const follow = (from, to) => () => {
    const src = viewportOf(from);
    const dst = viewportOf(to);
    if (!src || !dst) return;
    if (expected.get(from) === src.getCurrentImageIdIndex()) {
      expected.delete(from);
      return;
    }
    const loc = sliceLocation(src.getCurrentImageId());
    const ids = dst.getImageIds();
    let target = src.getCurrentImageIdIndex();
    if (loc !== undefined && ids.every((id) => sliceLocation(id) !== undefined)) {
      target = ids.reduce((best, id, i) => (Math.abs(sliceLocation(id) - loc) < Math.abs(sliceLocation(ids[best]) - loc) ? i : best), 0);
    }
    target = Math.max(0, Math.min(ids.length - 1, target));
    if (target === dst.getCurrentImageIdIndex()) return;
    expected.set(to, target);
    dst.setImageIdIndex(target);
  };
  const fa = follow(a, b);
  const fb = follow(b, a);
  a.vpEl.addEventListener(Enums.Events.STACK_NEW_IMAGE, fa);
  b.vpEl.addEventListener(Enums.Events.STACK_NEW_IMAGE, fb);
  return () => {
    a.vpEl.removeEventListener(Enums.Events.STACK_NEW_IMAGE, fa);
    b.vpEl.removeEventListener(Enums.Events.STACK_NEW_IMAGE, fb);
  };
}

// ---- setup --------------------------------------------------------------------------------------

// stats are (re)computed while annotations render: refresh the panel once per frame at most
let pending = false;
function refresh() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    updateMeasurements();
  });
}

export function attachViewports() {
  if (!group) return;
  for (const cell of state.cells) {
    if (!group.getViewportIds().includes(cell.viewportId)) group.addViewport(cell.viewportId, state.engine.id);
    cell.vpEl.addEventListener(TEnums.Events.ANNOTATION_RENDERED, refresh);
  }
}

export function onSelect() {
  showTags();
  updateWeasisLink(selectedCell()?.series?.study);
}

export function studyOpened(study) {
  updateWeasisLink(study);
}

export function afterShow() {
  updateMeasurements();
  showTags();
  updateWeasisLink(selectedCell()?.series?.study);
}

export async function setupTools() {
  toolsInit();
  for (const T of [ZoomTool, PanTool, WindowLevelTool, StackScrollTool, LengthTool, RectangleROITool, EllipticalROITool,
    AngleTool, CobbAngleTool, PlanarFreehandROITool, MagnifyTool, ArrowAnnotateTool, ReferenceLinesTool,
    HUProbeTool, CardiothoracicRatioTool]) addTool(T);
  group = ToolGroupManager.createToolGroup(GROUP);
  for (const T of [ZoomTool, PanTool, WindowLevelTool, StackScrollTool, LengthTool, RectangleROITool, EllipticalROITool,
    AngleTool, CobbAngleTool, PlanarFreehandROITool, MagnifyTool, ReferenceLinesTool, HUProbeTool, CardiothoracicRatioTool]) {
    group.addTool(T.toolName);
  }
  // in the PET-CT fusion an ellipse/rectangle labels itself with the PET layer's SUV (pet.js), not
  // with Cornerstone's statistics of the CT volume
  for (const [T, ellipse] of [[EllipticalROITool, true], [RectangleROITool, false]]) {
    const ownLines = group.getToolInstance(T.toolName).configuration.getTextLines;
    group.setToolConfiguration(T.toolName, {
      getTextLines: (data, targetId) => (data.onPet && fusionPet()
        ? petTextLines(petStatsIn(data.handles?.points, ellipse))
        : ownLines(data, targetId)),
    });
  }
  group.addTool(ArrowAnnotateTool.toolName, {
    getTextCallback: (done) => done(window.prompt('标注文字 annotation text') ?? ''),
    changeTextCallback: (data, evt, done) => done(window.prompt('标注文字 annotation text', data.label ?? '') ?? data.label),
  });
  // R-VW-1 mouse: left drag zoom, middle drag pan, right drag window/level, wheel scrolls
  group.setToolActive(ZoomTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
  group.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
  group.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Secondary }] });
  group.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
  for (const T of [LengthTool, RectangleROITool, EllipticalROITool, AngleTool, CobbAngleTool, PlanarFreehandROITool,
    HUProbeTool, CardiothoracicRatioTool, ArrowAnnotateTool]) group.setToolPassive(T.toolName);
  // cornerstone tools hook into elements as they are enabled: the first image's viewport was
  // enabled before this module loaded, so the grid is rebuilt (its images are cached: instant)
  const keep = state.cells.map((c) => ({ series: c.series, index: viewportOf(c)?.getCurrentImageIdIndex?.() ?? 0 }));
  buildGrid(...state.layout);
  await Promise.all(state.cells.map((c, i) => keep[i]?.series && showSeries(c, keep[i].series, keep[i].index)));
  attachViewports();
  buildToolbar();
  setPrimary(ZoomTool.toolName);
  document.addEventListener('keydown', onKey);
  for (const ev of [TEnums.Events.ANNOTATION_COMPLETED, TEnums.Events.ANNOTATION_MODIFIED, TEnums.Events.ANNOTATION_REMOVED]) {
    eventTarget.addEventListener(ev, refresh);
  }
  eventTarget.addEventListener(Enums.Events.STACK_NEW_IMAGE, () => showTags());
  // a measurement added while the PET-CT fusion is shown is on its views: its PET reading (pet.js)
  eventTarget.addEventListener(TEnums.Events.ANNOTATION_ADDED, (e) => {
    const a = e.detail?.annotation;
    if (a && fusionPet() && document.body.dataset.volumeMode === 'fusion') a.data.onPet = true;
  });
  state.cells.forEach((c) => updateOverlay(c.el, viewportOf(c)));
  document.body.dataset.toolsReady = '1';
  return { cache, value, selectCell };
}

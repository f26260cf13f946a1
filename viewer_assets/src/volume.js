// MPR (axial / sagittal / coronal with crosshairs), MIP / MinIP / average-IP with slab thickness,
// and 3D volume rendering with presets (issue 7 §3). Loaded only when asked for: vtk volume code
// and the volume's memory are not part of the first image (R-PF-1).
import {
  Enums, volumeLoader, setVolumesForViewports, eventTarget, CONSTANTS, cache,
} from '@cornerstonejs/core';
import {
  ToolGroupManager, CrosshairsTool, PanTool, ZoomTool, WindowLevelTool, StackScrollTool, TrackballRotateTool,
  addTool, Enums as TEnums,
} from '@cornerstonejs/tools';
import { buildGrid, showSeries, selectCell } from './main.js';
import { imageIdsOf, instanceOf } from './study.js';
import { setFusionPet } from './pet.js';

const { MouseBindings } = TEnums;
const BLENDS = {
  composite: Enums.BlendModes.COMPOSITE,
  mip: Enums.BlendModes.MAXIMUM_INTENSITY_BLEND,
  minip: Enums.BlendModes.MINIMUM_INTENSITY_BLEND,
  avgip: Enums.BlendModes.AVERAGE_INTENSITY_BLEND,
};
let mprGroup = null;
let vrGroup = null;
let current = null;
let volumeId = null;
let lastSeries = null;
const $ = (s) => document.querySelector(s);

function ensureGroups() {
  if (mprGroup) return;
  for (const T of [CrosshairsTool, TrackballRotateTool]) addTool(T);
  mprGroup = ToolGroupManager.createToolGroup('mpr');
  for (const T of [CrosshairsTool, PanTool, ZoomTool, WindowLevelTool, StackScrollTool]) mprGroup.addTool(T.toolName);
  mprGroup.setToolActive(CrosshairsTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
  mprGroup.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
  mprGroup.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Secondary }] });
  mprGroup.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
  vrGroup = ToolGroupManager.createToolGroup('vr');
  for (const T of [TrackballRotateTool, PanTool, ZoomTool]) vrGroup.addTool(T.toolName);
  vrGroup.setToolActive(TrackballRotateTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
  vrGroup.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
  vrGroup.setToolActive(ZoomTool.toolName, { bindings: [{ mouseButton: MouseBindings.Secondary }] });
}

function cells(state, specs) {
  // replace the stack grid by volume viewports (1 x n)
  for (const c of state.cells) {
    try { state.engine.disableElement(c.viewportId); } catch { /* gone */ }
  }
  const grid = $('#grid');
  grid.innerHTML = '';
  grid.style.gridTemplateRows = '1fr';
  grid.style.gridTemplateColumns = `repeat(${specs.length}, 1fr)`;
  state.cells = [];
  const inputs = specs.map((spec, i) => {
    const cell = document.createElement('div');
    cell.className = 'cell';
    cell.dataset.index = String(i);
    cell.dataset.orientation = spec.name;
    const el = document.createElement('div');
    el.className = 'vp';
    el.oncontextmenu = (e) => e.preventDefault();
    const label = document.createElement('div');
    label.className = 'corner tl';
    label.textContent = spec.name;
    cell.append(el, label);
    grid.appendChild(cell);
    const viewportId = `${spec.name}-${Date.now()}`;
    state.cells.push({ el: cell, vpEl: el, viewportId, series: lastSeries });
    cell.addEventListener('mousedown', () => selectCell(i), true);
    return { viewportId, element: el, type: spec.type, defaultOptions: { orientation: spec.orientation, background: [0, 0, 0] } };
  });
  state.engine.setViewports(inputs);
  return inputs.map((i) => i.viewportId);
}

const loaded = new Set();
const done = new Map(); // volume id → promise resolved when all its slices are in

/** The series as a streaming volume; body[data-volume-loaded] = '1' once all are loaded. */
async function ensureVolume(series, status) {
  const ids = await imageIdsOf(series);
  const id = `cornerstoneStreamingImageVolume:ybyx-${series.uid}`;
  if (!cache.getVolume(id)) {
    document.body.dataset.volumeLoaded = '';
    const onDone = (e) => {
      if (e.detail?.volumeId === id) {
        loaded.add(id);
        document.body.dataset.volumeLoaded = '1';
        status(`volume of ${ids.length} slices loaded`);
        eventTarget.removeEventListener(Enums.Events.IMAGE_VOLUME_LOADING_COMPLETED, onDone);
      }
    };
    eventTarget.addEventListener(Enums.Events.IMAGE_VOLUME_LOADING_COMPLETED, onDone);
    done.set(id, new Promise((resolve) => {
      const once = (e) => {
        if (e.detail?.volumeId !== id) return;
        eventTarget.removeEventListener(Enums.Events.IMAGE_VOLUME_LOADING_COMPLETED, once);
        resolve();
      };
      eventTarget.addEventListener(Enums.Events.IMAGE_VOLUME_LOADING_COMPLETED, once);
    }));
    const volume = await volumeLoader.createAndCacheVolume(id, { imageIds: ids });
    volume.load();
  } else if (loaded.has(id)) {
    document.body.dataset.volumeLoaded = '1';
  }
  volumeId = id;
  return id;
}

function volumeBar(mode, state) {
  const bar = $('#volume-bar');
  bar.innerHTML = '';
  if (mode === '3d') {
    const sel = document.createElement('select');
    sel.id = 'vr-preset';
    sel.title = '3D preset';
    for (const p of CONSTANTS.VIEWPORT_PRESETS) sel.append(new Option(p.name, p.name));
    sel.value = 'CT-Bone';
    sel.addEventListener('change', () => {
      const viewport = state.engine.getViewport(state.cells[0].viewportId);
      viewport.setProperties({ preset: sel.value });
      viewport.render();
    });
    bar.append(sel);
    return;
  }
  const blend = document.createElement('select');
  blend.id = 'blend';
  blend.title = 'projection';
  for (const [k, label] of [['composite', 'MPR'], ['mip', 'MIP'], ['minip', 'MinIP'], ['avgip', 'AvgIP']]) blend.append(new Option(label, k));
  const slab = Object.assign(document.createElement('input'), { type: 'number', id: 'slab', min: 0, max: 500, value: 20 });
  slab.style.width = '56px';
  slab.title = 'slab thickness (mm)';
  const apply = () => {
    for (const c of state.cells) {
      const viewport = state.engine.getViewport(c.viewportId);
      viewport.setBlendMode(BLENDS[blend.value]);
      viewport.setSlabThickness(blend.value === 'composite' ? 0.1 : Math.max(+slab.value || 1, 0.1));
      viewport.render();
    }
    document.body.dataset.blend = blend.value;
  };
  blend.addEventListener('change', apply);
  slab.addEventListener('change', apply);
  const lbl = Object.assign(document.createElement('label'), { textContent: 'slab mm' });
  lbl.append(slab);
  bar.append(blend, lbl);
  blend.value = mode === 'mip' ? 'mip' : 'composite';
  return apply;
}

export async function setMode(mode, { state, group, status, selectedSeries }) {
  ensureGroups();
  for (const g of [mprGroup, vrGroup, group]) for (const id of g.getViewportIds()) g.removeViewports(state.engine.id, id);
  document.body.dataset.volumeMode = mode ?? '';
  setFusionPet(null);
  $('#volume-bar').innerHTML = '';
  if (!mode) {
    buildGrid(1, 1);
    const series = lastSeries ?? selectedSeries ?? state.series[0];
    await showSeries(state.cells[0], series);
    current = null;
    return;
  }
  if (mode === 'fusion') {
    await fusion(state, status);
    current = mode;
    return;
  }
  const candidates = [selectedSeries, ...state.series].filter((s) => s && s.count >= 3);
  const series = candidates.sort((a, b) => (b === selectedSeries) - (a === selectedSeries) || b.count - a.count)[0];
  if (!series) {
    status('MPR needs a series of at least 3 images', true);
    return;
  }
  lastSeries = series;
  const id = await ensureVolume(series, status);
  const O = Enums.OrientationAxis;
  let ids;
  if (mode === '3d') {
    ids = cells(state, [{ name: '3D', type: Enums.ViewportType.VOLUME_3D, orientation: O.CORONAL }]);
    await setVolumesForViewports(state.engine, [{ volumeId: id }], ids);
    const viewport = state.engine.getViewport(ids[0]);
    viewport.setProperties({ preset: 'CT-Bone' });
    vrGroup.addViewport(ids[0], state.engine.id);
    volumeBar(mode, state);
    viewport.render();
  } else {
    ids = cells(state, [
      { name: 'axial', type: Enums.ViewportType.ORTHOGRAPHIC, orientation: O.AXIAL },
      { name: 'sagittal', type: Enums.ViewportType.ORTHOGRAPHIC, orientation: O.SAGITTAL },
      { name: 'coronal', type: Enums.ViewportType.ORTHOGRAPHIC, orientation: O.CORONAL },
    ]);
    await setVolumesForViewports(state.engine, [{ volumeId: id }], ids);
    for (const v of ids) mprGroup.addViewport(v, state.engine.id);
    const apply = volumeBar(mode, state);
    apply();
  }
  current = mode;
  selectCell(0);
  state.engine.render();
  status(`${mode.toUpperCase()} of series ${series.number} (${series.count} images)`);
}

export const currentMode = () => current;

// ---- PET-CT fusion: CT in grey, PET over it in colour with adjustable opacity ----------------------

async function fusion(state, status) {
  const ct = state.series.filter((s) => s.modality === 'CT' && s.count >= 3).sort((a, b) => b.count - a.count)[0];
  const pt = state.series.filter((s) => s.modality === 'PT' && s.count >= 3).sort((a, b) => b.count - a.count)[0];
  if (!ct || !pt) {
    status('fusion needs a CT and a PET series in this study', true);
    return;
  }
  lastSeries = ct;
  const ptId = await ensureVolume(pt, () => {});
  const ctId = await ensureVolume(ct, status);
  const O = Enums.OrientationAxis;
  const ids = cells(state, [
    { name: 'fusion axial', type: Enums.ViewportType.ORTHOGRAPHIC, orientation: O.AXIAL },
    { name: 'fusion coronal', type: Enums.ViewportType.ORTHOGRAPHIC, orientation: O.CORONAL },
  ]);
  const petActor = ({ volumeActor }) => {
    // opacity is per unit distance along the ray and an MPR slab is a fraction of a millimetre
    // thick: without this the PET layer would be almost transparent whatever its opacity
    volumeActor.getProperty().setScalarOpacityUnitDistance(0, 0.01);
  };
  await setVolumesForViewports(state.engine, [{ volumeId: ctId }, { volumeId: ptId, callback: petActor }], ids);
  // the stack's tool group (probe, ROIs, W/L, zoom…): measurements read the PET layer (pet.js)
  setFusionPet(ptId, instanceOf((await imageIdsOf(pt))[0]));
  state.tools.attachViewports();
  const bar = $('#volume-bar');
  bar.innerHTML = '';
  const cmap = document.createElement('select');
  cmap.id = 'pet-colormap';
  cmap.title = 'PET colour map';
  for (const c of ['Black-Body Radiation', 'hsv', 'jet', 'Rainbow Blended Grey']) cmap.append(new Option(c, c));
  const opacity = Object.assign(document.createElement('input'), { type: 'range', id: 'pet-opacity', min: 0, max: 1, step: 0.05, value: 0.7 });
  opacity.title = 'PET opacity';
  const apply = () => {
    for (const id of ids) {
      const viewport = state.engine.getViewport(id);
      // PET: the colour range from the volume's own values (SUV is read by the probe/ROIs, pet.js)
      const pet = cache.getVolume(ptId);
      const range = pet?.voxelManager?.getRange?.() ?? [0, 1];
      if (!(range[1] > range[0])) continue; // not loaded yet: applied again when it is
      // the hottest voxels in the middle of the map: coloured (red-orange), not near-white
      const upper = range[0] + (range[1] - range[0]) * 1.8;
      // low (background) uptake transparent, the rest at the chosen opacity
      const knee = range[0] + (range[1] - range[0]) * 0.05;
      const opacityMapping = [
        { value: range[0], opacity: 0 },
        { value: knee, opacity: 1 },
        { value: upper, opacity: 1 },
      ];
      viewport.setProperties({ colormap: { name: cmap.value, opacityMapping, opacity: Number(opacity.value) }, voiRange: { lower: range[0], upper } }, ptId);
      viewport.render();
    }
    document.body.dataset.fusion = `${cmap.value}:${opacity.value}`;
  };
  cmap.addEventListener('change', apply);
  opacity.addEventListener('input', apply);
  const lbl = Object.assign(document.createElement('label'), { textContent: 'PET opacity' });
  lbl.append(opacity);
  bar.append(cmap, lbl);
  apply();
  selectCell(0);
  state.engine.render();
  await Promise.all([done.get(ctId), done.get(ptId)]);
  apply(); // the PET range is known now
  document.body.dataset.fusionReady = '1';
  status(`PET-CT fusion: CT series ${ct.number} + PET series ${pt.number}`);
}

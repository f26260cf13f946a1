// Four-corner information and orientation markers of a viewport (issue 7 §2), per modality from
// viewer.toml [overlay.<MODALITY>].
import { metaData, utilities, getEnabledElement } from '@cornerstonejs/core';
import { overlayFor } from './settings.js';
import { value } from './dicomweb.js';
import { instanceOf } from './study.js';

const fmtDate = (d) => (d && d.length === 8 ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d ?? '');
const fmtTime = (t) => (t && t.length >= 4 ? `${t.slice(0, 2)}:${t.slice(2, 4)}${t.length >= 6 ? `:${t.slice(4, 6)}` : ''}` : t ?? '');

function field(name, ds, viewport, index, count) {
  switch (name) {
    case 'PatientName': return value(ds, '00100010') ?? '';
    case 'PatientID': return value(ds, '00100020') ? `ID: ${value(ds, '00100020')}` : '';
    case 'PatientSexAge': {
      const sex = value(ds, '00100040') ?? '';
      const age = value(ds, '00101010') ?? '';
      return [sex, age].filter(Boolean).join(' ');
    }
    case 'InstitutionName': return value(ds, '00080080') ?? '';
    case 'StudyDate': return fmtDate(value(ds, '00080020'));
    case 'StudyTime': return fmtTime(value(ds, '00080030'));
    case 'StudyDescription': return value(ds, '00081030') ?? '';
    case 'SeriesDescription': return value(ds, '0008103E') ?? '';
    case 'Modality': return value(ds, '00080060') ?? '';
    case 'SeriesNumber': return `Se: ${value(ds, '00200011') ?? ''}`;
    case 'InstanceNumber': return `Im: ${index + 1}/${count}${value(ds, '00200013') !== undefined ? ` (#${value(ds, '00200013')})` : ''}`;
    case 'SliceLocation': {
      const v = value(ds, '00201041');
      return v !== undefined ? `Loc: ${Number(v).toFixed(1)} mm` : '';
    }
    case 'SliceThickness': {
      const v = value(ds, '00180050');
      return v !== undefined ? `Thick: ${Number(v).toFixed(1)} mm` : '';
    }
    case 'WindowLevel': {
      const { voiRange } = viewport.getProperties?.() ?? {};
      if (!voiRange) return '';
      const { windowWidth, windowCenter } = utilities.windowLevel.toWindowLevel(voiRange.lower, voiRange.upper);
      return `W: ${Math.round(windowWidth)} L: ${Math.round(windowCenter)}`;
    }
    case 'Zoom': {
      const z = viewport.getZoom?.();
      return z ? `Zoom: ${(z * 100).toFixed(0)}%` : '';
    }
    default: return value(ds, name) ?? '';
  }
}

// LPS patient axes → letters (DICOM PS3.3 C.7.6.1.1.1)
function letters(v) {
  const names = [['L', 'R'], ['P', 'A'], ['H', 'F']];
  const order = [0, 1, 2].sort((a, b) => Math.abs(v[b]) - Math.abs(v[a]));
  let out = '';
  for (const i of order) {
    if (Math.abs(v[i]) > 0.3) out += v[i] > 0 ? names[i][0] : names[i][1];
  }
  return out;
}

export function orientationMarkers(viewport) {
  const cam = viewport.getCamera();
  if (!cam?.viewUp || !cam?.viewPlaneNormal) return null;
  const up = cam.viewUp;
  const n = cam.viewPlaneNormal;
  // screen right = viewUp × viewPlaneNormal (the normal points towards the viewer)
  const right = [up[1] * n[2] - up[2] * n[1], up[2] * n[0] - up[0] * n[2], up[0] * n[1] - up[1] * n[0]];
  const neg = (a) => a.map((x) => -x);
  // (a mirrored view reverses the camera's normal, so `right` above already follows a flip)
  return { top: letters(up), bottom: letters(neg(up)), left: letters(neg(right)), right: letters(right) };
}

export function ensureOverlay(cell) {
  if (cell.querySelector('.corner')) return;
  for (const c of ['tl', 'tr', 'bl', 'br']) {
    const d = document.createElement('div');
    d.className = `corner ${c}`;
    cell.appendChild(d);
  }
  for (const c of ['top', 'bottom', 'left', 'right']) {
    const d = document.createElement('div');
    d.className = `orient ${c}`;
    cell.appendChild(d);
  }
}

export function updateOverlay(cell, viewport) {
  ensureOverlay(cell);
  if (!viewport || !viewport.getCurrentImageId) return;
  const imageId = viewport.getCurrentImageId();
  const ds = instanceOf(imageId);
  if (!ds) return;
  const modality = value(ds, '00080060') ?? 'default';
  const layout = overlayFor(modality);
  const index = viewport.getCurrentImageIdIndex?.() ?? 0;
  const count = viewport.getImageIds?.().length ?? 1;
  const corners = { tl: layout.top_left, tr: layout.top_right, bl: layout.bottom_left, br: layout.bottom_right };
  for (const [cls, fields] of Object.entries(corners)) {
    const text = (fields ?? []).map((f) => field(f, ds, viewport, index, count)).filter(Boolean).join('\n');
    cell.querySelector(`.corner.${cls}`).textContent = text;
  }
  const m = orientationMarkers(viewport);
  for (const side of ['top', 'bottom', 'left', 'right']) {
    cell.querySelector(`.orient.${side}`).textContent = m ? m[side] : '';
  }
}

export { getEnabledElement, metaData };

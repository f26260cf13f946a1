// The PET layer of the PET-CT fusion (R-VW-1): its values and SUVbw under the probe and in ROIs.
//
// Cornerstone's own ROI statistics on a two-volume viewport describe one volume only, so what the
// panel says about the PET is computed here from the PET volume itself: the probe reads the
// voxel at the point, an ellipse or rectangle the voxels of the PET slice it lies in (voxel
// centres inside the shape, in the volume's index space — the fusion views are axis-aligned).
import { cache } from '@cornerstonejs/core';
import { suvFactor, notAvailable } from './suv.js';

let pet = null; // { volumeId, suv: { factor } | { missing } }

/** Called by the fusion (volume.js) with the PET volume and one instance's header; null: off. */
export function setFusionPet(volumeId, ds) {
  pet = volumeId ? { volumeId, suv: suvFactor(ds) } : null;
  document.body.dataset.suv = pet ? (pet.suv.factor ? 'available' : notAvailable(pet.suv)) : '';
}

export const fusionPet = () => pet;

function volume() {
  return pet ? cache.getVolume(pet.volumeId) : null;
}

function index(vol, world) {
  return vol.imageData.worldToIndex(world);
}

function at(vol, i, j, k) {
  const [ni, nj, nk] = vol.dimensions;
  if (i < 0 || j < 0 || k < 0 || i >= ni || j >= nj || k >= nk) return null;
  return Number(vol.voxelManager.getAtIJK(i, j, k));
}

/** The PET value (Bq/ml with Units BQML) at a world point and its voxel, or null outside. */
export function petValueAt(world) {
  const vol = volume();
  if (!vol) return null;
  const ijk = index(vol, world).map((x) => Math.round(x));
  const x = at(vol, ...ijk);
  return x === null ? null : { value: x, index: ijk };
}

/** Mean, max and count of the PET voxels inside an ellipse (4 handles: its extreme points) or
 * rectangle (corners) drawn on a fusion view; null when it lies outside the PET. */
export function petStatsIn(points, ellipse) {
  const vol = volume();
  if (!vol || !points?.length) return null;
  const ijk = points.map((p) => index(vol, p));
  const lo = [0, 1, 2].map((a) => Math.min(...ijk.map((p) => p[a])));
  const hi = [0, 1, 2].map((a) => Math.max(...ijk.map((p) => p[a])));
  const extent = [0, 1, 2].map((a) => hi[a] - lo[a]);
  const normal = extent.indexOf(Math.min(...extent)); // the axis the view looks along
  const [a, b] = [0, 1, 2].filter((x) => x !== normal);
  const k = Math.round((lo[normal] + hi[normal]) / 2);
  const ca = (lo[a] + hi[a]) / 2;
  const cb = (lo[b] + hi[b]) / 2;
  const ra = extent[a] / 2;
  const rb = extent[b] / 2;
  let sum = 0;
  let max = -Infinity;
  let n = 0;
  for (let u = Math.ceil(lo[a]); u <= Math.floor(hi[a]); u++) {
    for (let v = Math.ceil(lo[b]); v <= Math.floor(hi[b]); v++) {
      if (ellipse && ((u - ca) / ra) ** 2 + ((v - cb) / rb) ** 2 > 1) continue;
      const p = [0, 0, 0];
      p[a] = u;
      p[b] = v;
      p[normal] = k;
      const x = at(vol, ...p);
      if (x === null) continue;
      sum += x;
      n += 1;
      if (x > max) max = x;
    }
  }
  return n ? { mean: sum / n, max, n } : null;
}

const f2 = (x) => x.toFixed(2);
const f1 = (x) => x.toFixed(1);

/** The panel's PET text for a probe value. */
export function describeProbe(x) {
  if (x === null) return 'PET: outside the PET volume';
  return pet.suv.factor ? `PET: ${f2(x * pet.suv.factor)} SUVbw (${f1(x)} Bq/ml)` : `PET: ${f1(x)} — ${notAvailable(pet.suv)}`;
}

/** The PET lines an ROI shows on the image. */
export function petTextLines(s) {
  if (!s) return ['PET: outside'];
  if (pet.suv.factor) return [`SUVbw mean ${f2(s.mean * pet.suv.factor)}`, `SUVbw max ${f2(s.max * pet.suv.factor)}`];
  return [`PET mean ${f1(s.mean)} Bq/ml`, notAvailable(pet.suv)];
}

/** The panel's PET text for ROI statistics. */
export function describeStats(s) {
  if (!s) return 'PET: outside the PET volume';
  if (pet.suv.factor) {
    const f = pet.suv.factor;
    return `PET: SUVbw mean ${f2(s.mean * f)} max ${f2(s.max * f)} (mean ${f1(s.mean)} Bq/ml, ${s.n} voxels)`;
  }
  return `PET: mean ${f1(s.mean)} max ${f1(s.max)} — ${notAvailable(pet.suv)}`;
}

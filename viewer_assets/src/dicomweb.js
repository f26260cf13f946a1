// The node's own DICOMweb routes (same origin), always with the session's credentials.
import { authHeaders, unauthorized } from './session.js';

export const ROOT = `${window.location.origin}/dicom-web`;

/** A response index.html's inline script already asked for (same path, same headers), once. */
export function takeEarly(key) {
  const early = window.__ybyx?.early;
  const r = early?.[key];
  if (r) delete early[key];
  return r?.catch(() => null) ?? Promise.resolve(null);
}

async function get(path, accept = 'application/dicom+json') {
  const early = accept === 'application/dicom+json' ? await takeEarly(path) : null;
  const r = early ?? (await fetch(`${ROOT}${path}`, { headers: { Accept: accept, ...authHeaders() } }));
  if (!r.ok) {
    const text = await r.text().catch(() => '');
    if (r.status === 401) unauthorized(`401 for ${path}`);
    throw new Error(`${r.status} ${r.statusText} for ${path}${text ? `: ${text.slice(0, 200)}` : ''}`);
  }
  return r;
}

export async function json(path) {
  const r = await get(path);
  if (r.status === 204) return [];
  return r.json();
}

export const searchSeries = (study) => json(`/studies/${study}/series`);
export const seriesMetadata = (study, series) => json(`/studies/${study}/series/${series}/metadata`);
export const studyInfo = async (study) => (await json(`/studies?StudyInstanceUID=${study}&includefield=all`))[0];

/** A thumbnail as an object URL (an <img src> cannot carry the Authorization header). */
export async function thumbnailUrl(study, series) {
  const r = await get(`/studies/${study}/series/${series}/thumbnail?viewport=128,128`, 'image/jpeg, image/png');
  return URL.createObjectURL(await r.blob());
}

/** The first value of a DICOM JSON attribute (tag as 8 hex digits), or undefined. */
export function value(ds, tag) {
  const v = ds?.[tag]?.Value;
  if (!v || !v.length) return undefined;
  const first = v[0];
  if (first && typeof first === 'object' && ('Alphabetic' in first || 'Ideographic' in first || 'Phonetic' in first)) {
    // person names: both forms where both exist (张三 = Zhang^San), whichever one otherwise
    return [first.Alphabetic, first.Ideographic].filter(Boolean).join(' ') || first.Phonetic || '';
  }
  return first;
}

export function values(ds, tag) {
  return ds?.[tag]?.Value ?? [];
}

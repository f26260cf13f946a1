// What the viewer knows about the open studies: series (from QIDO-RS), their instances'
// metadata (WADO-RS series metadata) and the image ids Cornerstone loads (WADO-RS frames).
import { wadors } from '@cornerstonejs/dicom-image-loader';
import { ROOT, searchSeries, seriesMetadata, value, values } from './dicomweb.js';
import { mark } from './timing.js';

const byImageId = new Map();

export const instanceOf = (imageId) => byImageId.get(imageId);

export async function loadSeriesList(study) {
  const series = await searchSeries(study);
  return series
    .map((s) => ({
      study,
      uid: value(s, '0020000E'),
      number: Number(value(s, '00200011') ?? 0),
      description: value(s, '0008103E') ?? '',
      modality: value(s, '00080060') ?? '',
      count: Number(value(s, '00201209') ?? 0),
      imageIds: null,
    }))
    .sort((a, b) => a.number - b.number);
}

function sortKey(ds) {
  // along the slice normal when the geometry is known, else by instance number
  const ipp = values(ds, '00200032');
  const iop = values(ds, '00200037');
  if (ipp.length === 3 && iop.length === 6) {
    const n = [
      iop[1] * iop[5] - iop[2] * iop[4],
      iop[2] * iop[3] - iop[0] * iop[5],
      iop[0] * iop[4] - iop[1] * iop[3],
    ];
    return n[0] * ipp[0] + n[1] * ipp[1] + n[2] * ipp[2];
  }
  return Number(value(ds, '00200013') ?? 0);
}

/** The series' image ids (one per frame), with their metadata registered for the loader. */
export async function imageIdsOf(series) {
  if (series.imageIds) return series.imageIds;
  const instances = await seriesMetadata(series.study, series.uid);
  mark('metadataLoaded');
  const withPixels = instances.filter((ds) => ds['7FE00010'] !== undefined || value(ds, '00280010'));
  // instance number first (the order the modality meant), position along the normal on ties
  withPixels.sort((a, b) => Number(value(a, '00200013') ?? 0) - Number(value(b, '00200013') ?? 0) || sortKey(a) - sortKey(b));
  const ids = [];
  for (const ds of withPixels) {
    const sop = value(ds, '00080018');
    const frames = Number(value(ds, '00280008') ?? 1) || 1;
    const base = `wadors:${ROOT}/studies/${series.study}/series/${series.uid}/instances/${sop}/frames/`;
    wadors.metaDataManager.add(`${base}1`, ds);
    for (let f = 1; f <= frames; f++) {
      const id = `${base}${f}`;
      byImageId.set(id, ds);
      ids.push(id);
    }
  }
  series.imageIds = ids;
  series.count = ids.length;
  return ids;
}

// SUVbw from a PET header (R-VW-1: SUV in the PET-CT fusion). Written here rather than taken from
// @cornerstonejs/calculate-suv: the body-weight formula is short, and this keeps the one "why not"
// message per missing attribute that the viewer shows.
//
//   SUVbw = C × W / D(t)        C: activity concentration (Bq/ml, the rescaled pixel value, Units BQML)
//                               W: PatientWeight in grams (kg × 1000)
//   D(t)  = D₀ × 2^(−Δt / T½)   D₀: RadionuclideTotalDose (Bq) at RadiopharmaceuticalStart(Date)Time,
//                               T½: RadionuclideHalfLife (s),
//                               Δt: from the injection to the series start — SeriesDate/SeriesTime,
//                                   else AcquisitionDate/AcquisitionTime (DecayCorrection START:
//                                   the pixels are decay-corrected to that moment)
// So SUVbw = C × factor with factor = W / D(t) (g/ml: unitless for tissue of density 1).
import { value } from './dicomweb.js';

const T = {
  Units: '00541001',
  DecayCorrection: '00541102',
  RadiopharmaceuticalInformationSequence: '00540016',
  RadionuclideTotalDose: '00181074',
  RadionuclideHalfLife: '00181075',
  RadiopharmaceuticalStartTime: '00181072',
  RadiopharmaceuticalStartDateTime: '00181078',
  PatientWeight: '00101030',
  SeriesDate: '00080021',
  SeriesTime: '00080031',
  AcquisitionDate: '00080022',
  AcquisitionTime: '00080032',
  StudyDate: '00080020',
};

/** Seconds since the epoch (UTC, offsets ignored: both ends of Δt are the scanner's local time)
 * of a DICOM date (YYYYMMDD, or undefined: day 0) and time (HHMMSS.FFFFFF, shorter forms too). */
function seconds(da, tm) {
  const t = String(tm).replace(/:/g, '').trim();
  const h = Number(t.slice(0, 2) || 0);
  const m = Number(t.slice(2, 4) || 0);
  const s = Number(t.slice(4) || 0);
  let day = 0;
  if (da) {
    const d = String(da);
    day = Date.UTC(Number(d.slice(0, 4)), Number(d.slice(4, 6)) - 1, Number(d.slice(6, 8))) / 1000;
  }
  return day + h * 3600 + m * 60 + s;
}

/** `{ factor }` (SUVbw = value × factor) or `{ missing }`: why SUV cannot be computed. */
export function suvFactor(ds) {
  const units = value(ds, T.Units);
  if (units === undefined) return { missing: 'Units' };
  if (String(units).toUpperCase() !== 'BQML') return { missing: `Units BQML (the PET is in ${units})` };
  const decay = value(ds, T.DecayCorrection);
  if (decay === undefined) return { missing: 'DecayCorrection' };
  if (decay !== 'START') return { missing: `DecayCorrection START (it is ${decay})` };
  const item = ds?.[T.RadiopharmaceuticalInformationSequence]?.Value?.[0];
  if (!item) return { missing: 'RadiopharmaceuticalInformationSequence' };
  const dose = Number(value(item, T.RadionuclideTotalDose));
  if (!(dose > 0)) return { missing: 'RadionuclideTotalDose' };
  const halfLife = Number(value(item, T.RadionuclideHalfLife));
  if (!(halfLife > 0)) return { missing: 'RadionuclideHalfLife' };
  const weight = Number(value(ds, T.PatientWeight));
  if (!(weight > 0)) return { missing: 'PatientWeight' };
  const seriesTime = value(ds, T.SeriesTime);
  const scanTime = seriesTime ?? value(ds, T.AcquisitionTime);
  if (scanTime === undefined) return { missing: 'SeriesTime (or AcquisitionTime)' };
  const scanDate = seriesTime !== undefined ? value(ds, T.SeriesDate) : value(ds, T.AcquisitionDate);
  const startDT = value(item, T.RadiopharmaceuticalStartDateTime);
  const startTime = value(item, T.RadiopharmaceuticalStartTime);
  let dt;
  const startDTLocal = startDT ? String(startDT).replace(/[+-]\d{4}$/, '') : ''; // offset dropped
  if (startDTLocal.length >= 10 && scanDate) {
    dt = seconds(scanDate, scanTime) - seconds(startDTLocal.slice(0, 8), startDTLocal.slice(8));
  } else if (startTime !== undefined || startDTLocal.length >= 10) {
    const start = startTime !== undefined ? startTime : startDTLocal.slice(8);
    dt = seconds(undefined, scanTime) - seconds(undefined, start);
    if (dt < 0) dt += 86400; // times of day only: the injection was the day before
  } else {
    return { missing: 'RadiopharmaceuticalStartTime (or RadiopharmaceuticalStartDateTime)' };
  }
  if (dt < 0) return { missing: 'a RadiopharmaceuticalStartDateTime before the series time' };
  const decayedDose = dose * 2 ** (-dt / halfLife);
  return { factor: (weight * 1000) / decayedDose, dt, decayedDose };
}

export const notAvailable = (suv) => `SUV not available: ${suv.missing}`;

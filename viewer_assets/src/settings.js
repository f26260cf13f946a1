// Site settings from config/viewer.toml, served by the node as /viewer/config.json (no patient data).
const DEFAULTS = {
  toolbar: { position: 'top' },
  embed: { origins: [] },
  overlay: {
    default: {
      top_left: ['PatientName', 'PatientID', 'PatientSexAge'],
      top_right: ['InstitutionName', 'StudyDate', 'StudyTime', 'StudyDescription'],
      bottom_left: ['SeriesNumber', 'InstanceNumber', 'SliceLocation', 'SliceThickness'],
      bottom_right: ['WindowLevel', 'Zoom'],
    },
  },
  presets: {
    CT: {
      lung: { window: 1500, level: -600, key: '1' },
      mediastinum: { window: 350, level: 40, key: '2' },
      bone: { window: 2000, level: 500, key: '3' },
      brain: { window: 80, level: 40, key: '4' },
      abdomen: { window: 400, level: 50, key: '5' },
      liver: { window: 150, level: 60, key: '6' },
    },
  },
  cine: { fps: 10 },
  send: { enabled: false },
};

let settings = DEFAULTS;

export async function loadSettings() {
  try {
    // (index.html's inline script has usually asked already)
    const early = await window.__ybyx?.early?.['config.json']?.catch(() => null);
    const r = early ?? (await fetch(new URL('config.json', window.location.href.split('?')[0].replace(/[^/]*$/, ''))));
    if (r.ok) settings = { ...DEFAULTS, ...(await r.json()) };
  } catch (e) {
    console.warn('viewer settings not loaded, defaults used', e);
  }
  window.__ybyxEmbedOrigins = settings.embed?.origins ?? [];
  return settings;
}

export const getSettings = () => settings;

export function overlayFor(modality) {
  return settings.overlay?.[modality] ?? settings.overlay?.default ?? DEFAULTS.overlay.default;
}

export function presetsFor(modality) {
  return settings.presets?.[modality] ?? {};
}

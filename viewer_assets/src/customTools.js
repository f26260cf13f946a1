// Tools written here because Cornerstone3D 5.14.0 has none that fits (issue 7 §3):
// - HUProbeTool: the CT value at a point (in the PET-CT fusion: the PET value and SUVbw, pet.js). The built-in ProbeTool returns no value on a stack
//   viewport in 5.14.0, so the value is read here from the displayed image's own pixels
//   (modality LUT applied: HU for CT).
// - CardiothoracicRatioTool: two transverse diameters — the first line drawn on an image is the
//   heart's, the second the thorax's — and their ratio (R-VW-1 "心胸比").
import { ProbeTool, LengthTool, annotation as csAnnotation } from '@cornerstonejs/tools';
import { utilities as csUtils } from '@cornerstonejs/core';
import { fusionPet, petValueAt } from './pet.js';

/** The modality value (HU for CT) of the displayed image at a world point, or null outside. */
export function valueAt(viewport, worldPos) {
  const image = viewport.getCornerstoneImage?.();
  if (!image) return null;
  const imageId = viewport.getCurrentImageId();
  const ij = csUtils.worldToImageCoords(imageId, worldPos);
  if (!ij) return null;
  const col = Math.floor(ij[0]);
  const row = Math.floor(ij[1]);
  if (col < 0 || row < 0 || col >= image.columns || row >= image.rows) return null;
  const raw = image.getPixelData()[row * image.columns + col];
  // the loader may already have applied the modality LUT (pre-scaled pixel data)
  const scaled = image.preScale?.scaled;
  const slope = scaled ? 1 : (image.slope ?? 1);
  const intercept = scaled ? 0 : (image.intercept ?? 0);
  return { value: raw * slope + intercept, index: [col, row, viewport.getCurrentImageIdIndex()] };
}

export class HUProbeTool extends ProbeTool {
  static toolName = 'HUProbe';

  _calculateCachedStats(annotation, renderingEngine, enabledElement) {
    const { viewport } = enabledElement;
    const data = annotation.data;
    const pet = fusionPet();
    if (pet && !viewport.getCornerstoneImage) {
      // the PET-CT fusion (a volume viewport): the PET layer's value, as SUVbw where the header
      // allows (pet.js, suv.js); the measurement panel says why not otherwise
      const found = petValueAt(data.handles.points[0]);
      const targetId = this.getTargetId(viewport, data);
      const x = found?.value ?? null;
      const suv = x !== null && pet.suv.factor ? x * pet.suv.factor : undefined;
      data.onPet = true;
      data.cachedStats = {
        [targetId]: {
          value: suv ?? x ?? undefined,
          petValue: x,
          index: found?.index ?? null,
          modalityUnit: suv !== undefined ? 'SUVbw' : 'Bq/ml',
        },
      };
      annotation.invalidated = false;
      return data.cachedStats;
    }
    const imageId = viewport.getCurrentImageId?.();
    if (!imageId) return data.cachedStats;
    const targetId = `imageId:${imageId}`;
    const found = valueAt(viewport, data.handles.points[0]);
    const modality = viewport.modality ?? '';
    data.cachedStats = {
      [targetId]: found
        ? { value: found.value, index: found.index, modalityUnit: modality === 'CT' ? 'HU' : '' }
        : { value: undefined, index: null, modalityUnit: '' },
    };
    annotation.invalidated = false;
    return data.cachedStats;
  }
}

export class CardiothoracicRatioTool extends LengthTool {
  static toolName = 'CardiothoracicRatio';

  constructor(props = {}, defaults = {}) {
    super(props, defaults);
    this.configuration.getTextLines = (data) => {
      const stats = Object.values(data.cachedStats ?? {})[0];
      if (!stats || stats.length === undefined) return undefined;
      const role = data.ctrRole === 'thorax' ? 'thorax' : 'heart';
      const lines = [`${role}: ${stats.length.toFixed(1)} ${stats.unit}`];
      if (data.ctrRatio !== undefined) lines.push(`CTR: ${data.ctrRatio.toFixed(3)}`);
      return lines;
    };
  }
}

/** Pair the CTR lines on each image (first = heart, second = thorax) and compute the ratio. */
export function updateCardiothoracicRatios() {
  const list = csAnnotation.state
    .getAllAnnotations()
    .filter((a) => a.metadata?.toolName === CardiothoracicRatioTool.toolName);
  const byImage = new Map();
  for (const a of list) {
    const key = a.metadata?.referencedImageId ?? '';
    if (!byImage.has(key)) byImage.set(key, []);
    byImage.get(key).push(a);
  }
  const results = [];
  for (const group of byImage.values()) {
    group.forEach((a, i) => {
      a.data.ctrRole = i % 2 === 0 ? 'heart' : 'thorax';
      delete a.data.ctrRatio;
    });
    for (let i = 0; i + 1 < group.length; i += 2) {
      const heart = Object.values(group[i].data.cachedStats ?? {})[0]?.length;
      const thorax = Object.values(group[i + 1].data.cachedStats ?? {})[0]?.length;
      if (heart && thorax) {
        const ratio = heart / thorax;
        group[i + 1].data.ctrRatio = ratio;
        results.push({ heart, thorax, ratio, uid: group[i + 1].annotationUID });
      }
    }
  }
  return results;
}

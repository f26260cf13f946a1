// Where the first image's time goes (issue 7 §5, R-PF-1: first image <= 1 s from opening the URL).
//
// Every mark is ms since navigation start (performance.timeOrigin, as a user waits), kept in
// window.__ybyx.timings (the tests and bench/viewer.py read it) and as a performance.mark named
// `ybyx:<name>` (visible in the browser's performance panel). The steps, in the order the first
// image needs them (see docs/viewer.md "Speed"):
//
//   htmlResponse      the viewer page's HTML has arrived (Navigation Timing responseEnd)
//   earlyFetch        the inline script of index.html has started the study's requests
//   bundleFetched     the main JavaScript chunk has arrived (Resource Timing responseEnd)
//   bundleEvaluated   the main chunk and its static imports are parsed and evaluated
//   configFetched     /viewer/config.json read
//   seriesListed      QIDO-RS series search answered
//   metadataLoaded    WADO-RS series metadata answered (image ids known)
//   coreInit          Cornerstone core initialised
//   loaderReady       DICOM image loader registered, its decode workers started
//   engineReady       rendering engine and the stack viewport created (WebGL context)
//   firstFrameFetched the first frame's bytes have arrived (Resource Timing responseEnd)
//   firstDecoded      the first frame is decoded (IMAGE_LOADED: worker, codec, decode)
//   stackSet          the stack viewport's setStack resolved (image in the viewport, not painted)
//   firstRendered     the viewport has painted it (the first IMAGE_RENDERED of the page)
//   firstImage        the first image is painted and shown with its overlay: the number the goal
//                     is measured by (before December 2026 it was taken at stackSet, 100-200 ms
//                     before the paint)
//
export const STEPS = [
  'htmlResponse', 'earlyFetch', 'bundleFetched', 'bundleEvaluated', 'configFetched', 'seriesListed',
  'metadataLoaded', 'coreInit', 'loaderReady', 'engineReady', 'firstFrameRequested',
  'firstFrameFetched', 'firstDecoded', 'stackSet', 'firstRendered', 'firstImage',
];

// The inline script may already have created window.__ybyx (with its own marks): keep them.
window.__ybyx = window.__ybyx || {};
window.__ybyx.timings = window.__ybyx.timings || {};
export const timings = window.__ybyx.timings;

/** Record `name` now (first time only, unless `again`), returns ms since navigation start. */
export function mark(name, again = false) {
  if (!again && timings[name] !== undefined) return timings[name];
  const ms = Math.round(performance.now());
  timings[name] = ms;
  try {
    performance.mark(`ybyx:${name}`);
  } catch {
    /* a name the browser refuses: the number above still counts */
  }
  if (document.body) document.body.dataset[name] = String(ms);
  return ms;
}

/** Record `name` at a time measured elsewhere (a Resource/Navigation Timing entry). */
function at(name, ms) {
  if (ms === undefined || ms === null || !(ms > 0) || timings[name] !== undefined) return;
  timings[name] = Math.round(ms);
}

/** Fill in the marks only the browser's timing entries know; called once the first image is up. */
export function collectResourceTimings() {
  const nav = performance.getEntriesByType('navigation')[0];
  if (nav) at('htmlResponse', nav.responseEnd);
  const resources = performance.getEntriesByType('resource');
  const main = resources.find((e) => /\/assets\/index-[^/]*\.js$/.test(e.name));
  if (main) at('bundleFetched', main.responseEnd);
  const frame = resources.find((e) => e.name.includes('/frames/'));
  if (frame) {
    at('firstFrameRequested', frame.startTime);
    at('firstFrameFetched', frame.responseEnd);
  }
  // measures between consecutive steps, for the performance panel
  const steps = STEPS.filter((n) => typeof timings[n] === 'number')
    .map((n) => [n, timings[n]])
    .sort((a, b) => a[1] - b[1]);
  for (let i = 1; i < steps.length; i++) {
    try {
      performance.measure(`ybyx:${steps[i - 1][0]}→${steps[i][0]}`, {
        start: steps[i - 1][1],
        end: steps[i][1],
      });
    } catch {
      /* measures are a convenience */
    }
  }
  return timings;
}

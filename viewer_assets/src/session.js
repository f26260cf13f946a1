// Where the viewer's credentials and the study to open come from (issue 7 §1, §6; R-FE-1).
//
// The one place that knows: every DICOMweb call asks authHeaders() here. Today the bearer token
// comes from
//   1. the URL fragment  /viewer/?study=UID#token=JWT  — a fragment is never sent to the server,
//      so the token reaches no access log; it is removed from the address bar at once; or
//   2. a postMessage from the embedding HIS page (iframe), see docs/viewer.md:
//        { type: "ybyx.open", token: "JWT", study: "UID", compare: ["UID", ...] }  → open a study
//        { type: "ybyx.token", token: "JWT" }                                       → renew token
//      the viewer answers { type: "ybyx.ready" } on load, { type: "ybyx.opened", study },
//      { type: "ybyx.error", message } and { type: "ybyx.unauthorized", message } (send a new
//      token) to window.parent.
//   3. a logged-in user's session (issue 6 §2): no token at all — the HttpOnly session cookie goes
//      with every same-origin request, writes add the CSRF token from the __Host-ybyx_csrf cookie.

let token = null;
const waiters = [];
let opener = null;

function readFragment() {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ''));
  const t = params.get('token');
  if (t) {
    token = t;
    params.delete('token');
    const rest = params.toString();
    // drop the token from the address bar and history (it must not be copied or bookmarked)
    history.replaceState(null, '', window.location.pathname + window.location.search + (rest ? `#${rest}` : ''));
  }
}

function allowedOrigin(origin) {
  // The embedding page: our own origin, or one the site lists in viewer.toml [embed] origins.
  const allowed = window.__ybyxEmbedOrigins || [];
  return origin === window.location.origin || allowed.includes('*') || allowed.includes(origin);
}

function onMessage(event) {
  const msg = event.data;
  if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string' || !msg.type.startsWith('ybyx.')) return;
  if (!allowedOrigin(event.origin)) {
    console.warn(`ybyx viewer: message from ${event.origin} ignored (not in [embed] origins)`);
    return;
  }
  if (typeof msg.token === 'string' && msg.token) setToken(msg.token);
  if (msg.type === 'ybyx.open' && typeof msg.study === 'string' && opener) {
    const compare = Array.isArray(msg.compare) ? msg.compare.filter((c) => typeof c === 'string') : [];
    opener({ study: msg.study, compare });
  }
}

export function setToken(t) {
  token = t;
  while (waiters.length) waiters.shift()(t);
}

/** Resolves once a token is known (at once with #token=…, else when the HIS page sends one). */
export function tokenReady() {
  return token ? Promise.resolve(token) : new Promise((resolve) => waiters.push(resolve));
}

/** Headers for a read (GET): the bearer token if we have one; else nothing — a logged-in user's
 * session cookie (HttpOnly, same origin) goes with the request by itself. */
export function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Headers for a write (POST): with a cookie session the CSRF token from its readable cookie. */
export function writeHeaders() {
  if (token) return authHeaders();
  const m = document.cookie.match(/(?:^|;\s*)__Host-ybyx_csrf=([^;]+)/);
  return m ? { 'X-CSRF-Token': decodeURIComponent(m[1]) } : {};
}

export const hasToken = () => Boolean(token);

/** The bearer token itself, or null (a cookie session): only for the Weasis launch link. */
export const currentToken = () => token;

/** The node refused our token (expired, revoked, lacking a scope): ask the embedding page for a
 * new one ({ type: "ybyx.token" }); standalone, the status line says so. */
export function unauthorized(what) {
  notifyParent({ type: 'ybyx.unauthorized', message: what });
}

/** Tell the embedding page something (no-op when standalone). */
export function notifyParent(message) {
  if (window.parent && window.parent !== window) window.parent.postMessage(message, '*');
}

/** Start listening; `open({study, compare})` is called for each ybyx.open message. */
export function startSession(open) {
  opener = open;
  readFragment();
  window.addEventListener('message', onMessage);
  notifyParent({ type: 'ybyx.ready' });
}

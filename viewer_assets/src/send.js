// One-click send (R-VW-1 u): the current series or study to a workstation configured in
// viewer.toml [send.targets], by C-STORE from the node (POST /api/v1/send), with progress.
import { authHeaders, writeHeaders } from './session.js';

const API = `${window.location.origin}/api/v1/send`;

/** The targets the node offers this caller (a user: their institution's only). */
export async function sendTargets() {
  const r = await fetch(`${API}/targets`, { headers: authHeaders() });
  if (!r.ok) return []; // e.g. 403: this token or user may not send
  return (await r.json()).targets ?? [];
}

export async function sendToWorkstation({ study, series, target }, onProgress) {
  const r = await fetch(API, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...writeHeaders() },
    body: JSON.stringify(series ? { study, series, target } : { study, target }),
  });
  let job = await r.json().catch(() => ({}));
  if (r.status !== 202) throw new Error(job.error_description ?? job.error ?? `send refused: ${r.status}`);
  onProgress(job);
  while (job.state === 'running') {
    await new Promise((resolve) => setTimeout(resolve, 300));
    const s = await fetch(`${API}/${job.job}`, { headers: authHeaders() });
    if (!s.ok) throw new Error(`send status: ${s.status}`);
    job = await s.json();
    onProgress(job);
  }
  return job;
}

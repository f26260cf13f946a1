// The Weasis launch link (R-VW-1 u, "where configured": viewer.toml [weasis] enabled = true).
//
// weasis://?<URL-encoded command> makes a locally installed Weasis open the study itself over this
// node's DICOMweb (its `$dicom:rs` command, see docs/viewer.md):
//   $dicom:rs --url "<this node's DICOMweb base>" -r "studyUID=<uid>" [-H "Authorization: Bearer <token>"]
// The header is added only when the viewer holds a bearer token (a short-lived one: Weasis must
// open the study before it expires). A cookie session adds nothing: the HttpOnly cookie is never
// readable here and must never be put in a link.
import { currentToken } from './session.js';
import { ROOT } from './dicomweb.js';

let study = null;

/** The command Weasis runs for `studyUid` (exported for the docs' example and tests). */
export function weasisCommand(studyUid, token = currentToken()) {
  let cmd = `$dicom:rs --url "${ROOT}" -r "studyUID=${studyUid}"`;
  if (token) cmd += ` -H "Authorization: Bearer ${token}"`;
  return cmd;
}

export const weasisHref = (studyUid, token) => `weasis://?${encodeURIComponent(weasisCommand(studyUid, token))}`;

export function weasisLink() {
  const a = document.createElement('a');
  a.id = 'btn-weasis';
  a.className = 'button';
  a.textContent = 'Weasis';
  a.title = '在 Weasis 中打开 open this study in Weasis (installed locally)';
  a.href = '#';
  // the token may have been renewed since the study opened: the href is rebuilt at the click
  a.addEventListener('click', () => updateWeasisLink(study));
  return a;
}

export function updateWeasisLink(studyUid) {
  if (studyUid) study = studyUid;
  const a = document.getElementById('btn-weasis');
  if (a && study) {
    a.href = weasisHref(study);
    a.dataset.study = study;
  }
}

// cellsam labeling page: plain canvas code, no build step.
// The server holds the model and the image embedding; the page holds the label
// image (Uint32Array), does every hand edit, undo/redo, pan/zoom locally, and
// autosaves the labels to the server (PUT, debounced).
'use strict';

const $ = (id) => document.getElementById(id);

const S = {
  image: null,          // {id, path, width, height, channels, ...} from /api/open
  planes: [],           // Uint16Array per channel (display data)
  stats: [],            // [{min, max, lo, hi}] per channel, lo/hi in 0..65535
  labels: null,         // Uint32Array W*H
  info: new Map(),      // label -> [score, iou] for cells the model made
  nextLabel: 1,
  selected: 0,
  tool: 'box',
  view: { scale: 1, tx: 0, ty: 0 },
  prompt: null,         // {label, box, points, ref, candidates, chosen}
  promptBusy: false,
  queuedPrompt: null,
  undo: [], redo: [],
  saveTimer: 0, saving: null, dirty: false, saveGen: 0,
  pollTimer: 0,
  drag: null,           // current mouse gesture
  cursor: null,         // last pointer position in image coordinates
  spaceDown: false,
};
window.cellsamApp = S;  // for tests and the console

const imgCanvas = document.createElement('canvas');
const labCanvas = document.createElement('canvas');
let labData = null;     // ImageData of the overlay
const view = $('view');
const vctx = view.getContext('2d');

// ------------------------------------------------------------ helpers

function message(text, ms = 2500) {
  const m = $('message');
  m.textContent = text;
  m.hidden = !text;
  clearTimeout(message.t);
  if (text && ms) message.t = setTimeout(() => { m.hidden = true; }, ms);
}

async function api(path, opts = {}) {
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + ' ' + r.statusText;
    try { const j = await r.json(); if (j.error) msg = j.error; r.body_json = j; } catch (e) { /* not JSON */ }
    const err = new Error(msg);
    err.status = r.status;
    err.response = r;
    throw err;
  }
  return r;
}

function setStatus(el, state, text) { el.dataset.state = state; el.textContent = text; }

// ------------------------------------------------------------ colours

const colourCache = new Map();
function labelColour(l) {
  let c = colourCache.get(l);
  if (c) return c;
  const h = (l * 137.508) % 360, s = 0.8, v = 1.0;     // golden-angle hues
  const f = (n) => { const k = (n + h / 60) % 6; return v - v * s * Math.max(0, Math.min(k, 4 - k, 1)); };
  c = [Math.round(f(5) * 255), Math.round(f(3) * 255), Math.round(f(1) * 255)];
  if (colourCache.size > 100000) colourCache.clear();
  colourCache.set(l, c);
  return c;
}

// ------------------------------------------------------------ image display

function displayMode() { return $('display-select').value; }

function buildLut(st) {
  const contrast = Math.pow(2, +$('contrast').value), bright = +$('brightness').value;
  const lut = new Uint8ClampedArray(65536);
  const span = Math.max(1, st.hi - st.lo);
  for (let v = 0; v < 65536; v++) {
    const t = ((v - st.lo) / span - 0.5) * contrast + 0.5 + bright;
    lut[v] = t * 255;
  }
  return lut;
}

function renderImage() {
  if (!S.image) return;
  const W = S.image.width, H = S.image.height, n = W * H, C = S.planes.length;
  const ctx = imgCanvas.getContext('2d');
  const out = ctx.createImageData(W, H), d = out.data;
  const mode = displayMode();
  if (mode !== 'auto' || C === 1) {
    const ch = mode === 'auto' ? 0 : +mode, p = S.planes[ch], lut = buildLut(S.stats[ch]);
    for (let i = 0, j = 0; i < n; i++, j += 4) { const g = lut[p[i]]; d[j] = d[j + 1] = d[j + 2] = g; d[j + 3] = 255; }
  } else if (C === 2) {   // green (first) / magenta (second), as cs_write_overlay_png
    const a = S.planes[0], b = S.planes[1], la = buildLut(S.stats[0]), lb = buildLut(S.stats[1]);
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      const g = la[a[i]], m = lb[b[i]];
      d[j] = m; d[j + 1] = g; d[j + 2] = m; d[j + 3] = 255;
    }
  } else {
    const luts = [0, 1, 2].map((k) => buildLut(S.stats[k]));
    const [r, g, b] = S.planes;
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      d[j] = luts[0][r[i]]; d[j + 1] = luts[1][g[i]]; d[j + 2] = luts[2][b[i]]; d[j + 3] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
  requestDraw();
}

// ------------------------------------------------------------ label overlay

function updateOverlay(x0 = 0, y0 = 0, x1 = S.image.width, y1 = S.image.height) {
  if (!S.labels) return;
  const W = S.image.width, H = S.image.height, L = S.labels, d = labData.data;
  x0 = Math.max(0, x0 - 1); y0 = Math.max(0, y0 - 1); x1 = Math.min(W, x1 + 1); y1 = Math.min(H, y1 + 1);
  if (x1 <= x0 || y1 <= y0) return;
  const fillA = Math.round(+$('opacity').value * 255), outlines = $('outlines').checked, sel = S.selected;
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const i = y * W + x, l = L[i], j = i * 4;
      if (!l) { d[j + 3] = 0; continue; }
      const edge = outlines && ((x > 0 && L[i - 1] !== l) || (x < W - 1 && L[i + 1] !== l) ||
                                (y > 0 && L[i - W] !== l) || (y < H - 1 && L[i + W] !== l));
      if (l === sel) {
        if (edge) { d[j] = d[j + 1] = d[j + 2] = 255; d[j + 3] = 255; continue; }
        const c = labelColour(l);
        d[j] = c[0]; d[j + 1] = c[1]; d[j + 2] = c[2]; d[j + 3] = Math.min(255, fillA + 90);
        continue;
      }
      const c = labelColour(l);
      d[j] = c[0]; d[j + 1] = c[1]; d[j + 2] = c[2]; d[j + 3] = edge ? 255 : fillA;
    }
  }
  labCanvas.getContext('2d').putImageData(labData, 0, 0, x0, y0, x1 - x0, y1 - y0);
  requestDraw();
}

function labelBox(l) {
  const W = S.image.width, H = S.image.height, L = S.labels;
  let x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) {
    const row = y * W;
    for (let x = 0; x < W; x++) if (L[row + x] === l) {
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; y1 = y;
    }
  }
  return x1 < 0 ? null : [x0, y0, x1 + 1, y1 + 1];
}

function countLabels() {
  const seen = new Set();
  const L = S.labels;
  for (let i = 0; i < L.length; i++) if (L[i]) seen.add(L[i]);
  return seen.size;
}

function refreshCounts() {
  $('label-count').textContent = S.labels ? countLabels() : 0;
  $('selected-label').textContent = S.selected ? String(S.selected) : 'none';
}

function select(l) {
  const old = S.selected;
  S.selected = l;
  for (const x of [old, l]) if (x) { const b = labelBox(x); if (b) updateOverlay(...b); }
  refreshCounts();
}

// ------------------------------------------------------------ edits, undo, redo

// An edit snapshots the labels, runs fn, then stores only the changed rectangle.
function edit(fn) {
  const before = S.labels.slice();
  fn();
  const W = S.image.width, H = S.image.height, L = S.labels;
  let x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) {
    const row = y * W;
    for (let x = 0; x < W; x++) if (L[row + x] !== before[row + x]) {
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; y1 = y;
    }
  }
  if (x1 < 0) return false;
  x1++; y1++;
  const w = x1 - x0, h = y1 - y0, oldR = new Uint32Array(w * h), newR = new Uint32Array(w * h);
  for (let y = 0; y < h; y++) {
    oldR.set(before.subarray((y0 + y) * W + x0, (y0 + y) * W + x1), y * w);
    newR.set(L.subarray((y0 + y) * W + x0, (y0 + y) * W + x1), y * w);
  }
  S.undo.push({ x0, y0, w, h, oldR, newR });
  let bytes = 0;
  for (const u of S.undo) bytes += u.oldR.length * 8;
  while (S.undo.length > 1 && (S.undo.length > 200 || bytes > 400e6)) { bytes -= S.undo[0].oldR.length * 8; S.undo.shift(); }
  S.redo = [];
  updateOverlay(x0, y0, x1, y1);
  changed();
  return true;
}

function applyRect(u, data) {
  const W = S.image.width;
  for (let y = 0; y < u.h; y++) S.labels.set(data.subarray(y * u.w, (y + 1) * u.w), (u.y0 + y) * W + u.x0);
  updateOverlay(u.x0, u.y0, u.x0 + u.w, u.y0 + u.h);
}

function undo() {
  const u = S.undo.pop();
  if (!u) return message('nothing to undo');
  applyRect(u, u.oldR);
  S.redo.push(u);
  S.prompt = null;
  renderCandidates();
  changed();
}

function redo() {
  const u = S.redo.pop();
  if (!u) return message('nothing to redo');
  applyRect(u, u.newR);
  S.undo.push(u);
  changed();
}

function changed() {
  S.dirty = true;
  refreshCounts();
  scheduleSave();
}

function newLabel() {
  let m = S.nextLabel;
  if (m > 65535) {   // autosave is a 16-bit PNG: reuse the lowest free value
    const used = new Uint8Array(65536);
    for (const l of S.labels) if (l < 65536) used[l] = 1;
    m = used.indexOf(0, 1);
    if (m < 0) throw new Error('more than 65535 labels');
    S.info.delete(m);
    return m;
  }
  S.nextLabel = m + 1;
  S.info.delete(m);
  return m;
}

// ------------------------------------------------------------ autosave

function encodeLabels(L, W, H, info) {
  let runs = 0;
  for (let i = 0; i < L.length; i++) if (i === 0 || L[i] !== L[i - 1]) runs++;
  const cells = {};
  const present = new Set();
  for (let i = 0; i < L.length; i++) if (L[i]) present.add(L[i]);
  for (const [k, v] of info) if (present.has(k)) cells[k] = v;
  const tail = new TextEncoder().encode(JSON.stringify({ cells }));
  const buf = new ArrayBuffer(16 + runs * 8 + tail.length), dv = new DataView(buf);
  dv.setUint8(0, 67); dv.setUint8(1, 83); dv.setUint8(2, 76); dv.setUint8(3, 49);   // "CSL1"
  dv.setUint32(4, W, true); dv.setUint32(8, H, true); dv.setUint32(12, runs, true);
  let p = 16, i = 0;
  while (i < L.length) {
    let j = i + 1;
    while (j < L.length && L[j] === L[i]) j++;
    dv.setUint32(p, j - i, true); dv.setUint32(p + 4, L[i], true);
    p += 8; i = j;
  }
  new Uint8Array(buf, p).set(tail);
  return buf;
}

function decodeLabels(buf, W, H) {
  const dv = new DataView(buf);
  if (buf.byteLength < 16 || dv.getUint32(4, true) !== W || dv.getUint32(8, true) !== H) throw new Error('bad label data');
  const runs = dv.getUint32(12, true), L = new Uint32Array(W * H);
  let p = 16, pos = 0;
  for (let r = 0; r < runs; r++, p += 8) {
    const n = dv.getUint32(p, true), v = dv.getUint32(p + 4, true);
    if (v) L.fill(v, pos, pos + n);
    pos += n;
  }
  let info = {};
  if (p < buf.byteLength) { try { info = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, p))); } catch (e) { info = {}; } }
  return { labels: L, info };
}

function scheduleSave() {
  setStatus($('save-status'), 'saving', 'unsaved');
  clearTimeout(S.saveTimer);
  S.saveTimer = setTimeout(save, 700);
}

async function save() {
  clearTimeout(S.saveTimer);
  if (!S.image || !S.dirty) return S.saving;
  if (S.saving) { await S.saving; return save(); }
  S.dirty = false;
  const img = S.image;
  const body = encodeLabels(S.labels, img.width, img.height, S.info);
  setStatus($('save-status'), 'saving', 'saving…');
  S.saving = (async () => {
    try {
      await api(`/api/images/${img.id}/labels`, { method: 'PUT', body, headers: { 'Content-Type': 'application/octet-stream' } });
      if (S.image === img) S.everSaved = true;
      if (S.image === img && !S.dirty) setStatus($('save-status'), 'saved', 'saved ' + new Date().toLocaleTimeString());
    } catch (e) {
      S.dirty = true;
      setStatus($('save-status'), 'error', 'save failed: ' + e.message);
    } finally { S.saving = null; }
  })();
  return S.saving;
}

window.addEventListener('beforeunload', (e) => {
  if (S.dirty) { save(); e.preventDefault(); e.returnValue = ''; }
});

// ------------------------------------------------------------ files, open, upload

async function loadInfo() {
  try {
    const j = await (await api('/api/info')).json();
    $('seg-tiled').checked = !!j.tiled;
    // the model's recommendation: sizing cells per image, or none
    $('seg-diameter').value = j.model && j.model.auto_diameter ? 'auto' : '0';
  } catch (e) { /* the file list reports connection problems */ }
}

async function loadFiles(selectPath) {
  const r = await api('/api/files');
  const j = await r.json();
  const sel = $('file-select');
  sel.innerHTML = '';
  for (const f of j.files) {
    const o = document.createElement('option');
    o.value = f.path; o.textContent = f.path;
    sel.appendChild(o);
  }
  if (j.truncated) message('file list truncated (too many files under the root)');
  if (selectPath) sel.value = selectPath;
  else if (S.image) sel.value = S.image.path;
}

function fillChannelSelects(C, img) {
  for (const id of ['nuclear-select', 'cell-select']) {
    const sel = $(id), keep = img ? String(id === 'nuclear-select' ? img.nuclear : img.cell) : sel.value;
    sel.innerHTML = '<option value="0">-</option>';
    for (let c = 1; c <= C; c++) { const o = document.createElement('option'); o.value = c; o.textContent = c; sel.appendChild(o); }
    sel.value = keep;
  }
  if (img) $('grey-check').checked = !!img.grey;
  const ds = $('display-select'), keep = ds.value;
  ds.innerHTML = '<option value="auto">composite</option>';
  for (let c = 0; c < C; c++) { const o = document.createElement('option'); o.value = c; o.textContent = 'channel ' + (c + 1); ds.appendChild(o); }
  ds.value = [...ds.options].some((o) => o.value === keep) ? keep : 'auto';
}

async function openImage(path) {
  if (!path) return message('choose an image');
  await save();
  const samePath = S.image && S.image.path === path;
  const body = { path, nuclear: +$('nuclear-select').value, cell: +$('cell-select').value, grey: $('grey-check').checked };
  if (!samePath) { body.nuclear = 0; body.cell = 0; body.grey = false; }
  setStatus($('emb-status'), 'queued', 'opening…');
  let img;
  try {
    img = await (await api('/api/open', { method: 'POST', body: JSON.stringify(body) })).json();
  } catch (e) {
    if (e.status === 400 && !samePath) { /* channel choice does not fit this image: retry with defaults */ }
    setStatus($('emb-status'), 'error', e.message);
    return;
  }
  const keepLabels = samePath && S.labels && S.labels.length === img.width * img.height;
  const r = await api(`/api/images/${img.id}/pixels`);
  const buf = await r.arrayBuffer();
  const C = img.channels, n = img.width * img.height;
  S.planes = [];
  for (let c = 0; c < C; c++) S.planes.push(new Uint16Array(buf, c * n * 2, n));
  S.stats = r.headers.get('X-Cellsam-Stats').split(';').map((t) => {
    const [min, max, lo, hi] = t.split(',').map(Number);
    return { min, max, lo, hi };
  });
  S.image = img;
  fillChannelSelects(C, img);
  imgCanvas.width = labCanvas.width = img.width;
  imgCanvas.height = labCanvas.height = img.height;
  labData = labCanvas.getContext('2d').createImageData(img.width, img.height);
  if (!keepLabels) {
    S.labels = new Uint32Array(n);
    S.info = new Map();
    S.undo = []; S.redo = [];
    S.selected = 0; S.prompt = null; S.nextLabel = 1; S.everSaved = false;
    try {
      const lr = await api(`/api/images/${img.id}/labels`);
      const { labels, info } = decodeLabels(await lr.arrayBuffer(), img.width, img.height);
      S.labels = labels;
      S.everSaved = true;
      for (const [k, v] of Object.entries(info.cells || {})) S.info.set(+k, v);
      message('restored the saved labels');
    } catch (e) { if (e.status !== 404) message('could not restore labels: ' + e.message); }
    let mx = 0;
    for (const l of S.labels) if (l > mx) mx = l;
    S.nextLabel = mx + 1;
    setStatus($('save-status'), 'saved', '');
    S.dirty = false;
    fitView();
  }
  renderImage();
  updateOverlay();
  refreshCounts();
  renderCandidates();
  for (const id of ['segment-btn', 'export-png', 'export-tif', 'export-csv']) $(id).disabled = false;
  document.title = 'cellsam: ' + img.path;
  history.replaceState(null, '', '#' + encodeURIComponent(img.path));
  pollStatus();
}

function showEmbedding(img) {
  const e = img.embedding, p = $('emb-progress');
  if (e.state === 'ready') {
    setStatus($('emb-status'), 'ready', `embedding ready (${e.seconds.toFixed(1)} s)`);
    p.hidden = true;
  } else if (e.state === 'error') {
    setStatus($('emb-status'), 'error', 'embedding failed: ' + e.error);
    p.hidden = true;
  } else {
    setStatus($('emb-status'), e.state, e.state === 'queued' ? 'embedding queued…' : 'computing embedding…');
    p.hidden = false; p.value = e.progress || 0;
  }
}

function showSegment(img) {
  const s = img.segment, p = $('seg-progress'), btn = $('segment-btn');
  const busy = s.state === 'queued' || s.state === 'running';
  p.hidden = !busy;
  p.value = s.progress || 0;
  btn.textContent = busy ? 'Stop segmenting' : 'Segment all';
  btn.title = busy ? 'stop the running segment-all' : 'run the full CellSAM pipeline (G)';
  if (s.state === 'error') message('segment all failed: ' + s.error, 6000);
}

async function pollStatus() {
  clearTimeout(S.pollTimer);
  const img = S.image;
  if (!img) return;
  let st;
  try { st = await (await api(`/api/images/${img.id}`)).json(); } catch (e) {
    if (e.status === 404) { setStatus($('emb-status'), 'error', 'server forgot this image: open it again'); return; }
    S.pollTimer = setTimeout(pollStatus, 1000);
    return;
  }
  if (S.image !== img) return;
  const wasSeg = img.segment && img.segment.state;
  Object.assign(img, { embedding: st.embedding, segment: st.segment });
  showEmbedding(img);
  showSegment(img);
  if (S.awaitSegment && st.segment.state === 'ready' && wasSeg !== 'ready') { S.awaitSegment = false; fetchSegmentResult(); }
  if (S.awaitSegment && st.segment.state === 'error') S.awaitSegment = false;
  if (S.awaitSegment && st.segment.state === 'stopped') { S.awaitSegment = false; message('segment all stopped'); }
  const busy = ['queued', 'running'].includes(st.embedding.state) || ['queued', 'running'].includes(st.segment.state);
  if (busy || st.embedding.state === 'none') S.pollTimer = setTimeout(pollStatus, busy ? 250 : 1000);
}

async function uploadFile(file) {
  message('uploading ' + file.name + '…', 0);
  try {
    const r = await api('/api/upload?name=' + encodeURIComponent(file.name), { method: 'POST', body: file });
    const j = await r.json();
    await loadFiles(j.path);
    message('uploaded to ' + j.path);
    await openImage(j.path);
  } catch (e) { message('upload failed: ' + e.message, 6000); }
}

// ------------------------------------------------------------ fine-tuning on the saved corrections

function showFinetune(st) {
  const busy = st.state === 'running';
  $('ft-start').disabled = busy || !st.available;
  $('ft-stop').hidden = !busy;
  $('ft-progress').hidden = !busy;
  $('ft-progress').value = st.progress || 0;
  $('ft-use').hidden = !(st.state === 'done' || st.state === 'stopped') || st.in_use;
  let text = '';
  if (!st.available) text = 'not available: the server has no model file';
  else if (busy) text = `step ${st.step}/${st.total_steps || '?'} on ${st.images} image(s), loss ${(st.loss || 0).toFixed(3)}`;
  else if (st.state === 'done' || st.state === 'stopped')
    text = `${st.state === 'stopped' ? 'stopped' : 'done'}: ${st.step} step${st.step === 1 ? '' : 's'} in ${Math.round(st.seconds)} s → ${st.model}` +
      (st.in_use ? ' (in use)' : '');
  else if (st.state === 'error') text = 'failed: ' + st.error;
  if (st.val_f1 !== undefined) text += `; validation F1 ${st.val_f1.toFixed(3)} on ${st.held_out} held out`;
  $('ft-status').textContent = text;
}

async function pollFinetune() {
  clearTimeout(S.ftTimer);
  let st;
  try { st = await (await api('/api/finetune')).json(); } catch (e) { S.ftTimer = setTimeout(pollFinetune, 2000); return; }
  showFinetune(st);
  if (st.state === 'running') S.ftTimer = setTimeout(pollFinetune, 1000);
}

// Fine-tuning teaches every pixel without a label as background, so an image whose
// model cells are mostly unlabelled (a labelling left half done) would teach the model
// to miss cells. Ask first; deleted false detections count too, hence a question.
async function confirmTrainingData() {
  let d;
  try { d = await (await api('/api/finetune/data')).json(); } catch (e) { return true; } // starting reports real errors
  if (!d.partial) return true;
  const shown = d.images.filter((i) => i.partial).slice(0, 8)
    .map((i) => `  ${i.image}: ${i.unlabelled} of the model's ${i.model_cells} cells have no label`);
  if (d.partial > shown.length) shown.push(`  and ${d.partial - shown.length} more`);
  return confirm(`${d.partial} of ${d.n_images} labelled image${d.n_images === 1 ? '' : 's'} may be partly labelled:\n` +
    shown.join('\n') + '\n\nFine-tuning teaches unlabelled cells as background. If those were false detections ' +
    'you deleted, go on. Fine-tune now?');
}

async function startFinetune() {
  await save();   // train on what is on screen now
  const epochs = Number($('ft-epochs').value);
  if (!(Number.isInteger(epochs) && epochs >= 1 && epochs <= 1000)) { message('epochs: a whole number from 1 to 1000', 6000); return; }
  if (!(await confirmTrainingData())) return;
  try {
    const st = await (await api('/api/finetune', { method: 'POST', body: JSON.stringify({ epochs }) })).json();
    showFinetune(st);
    pollFinetune();
  } catch (e) { message('fine-tune: ' + e.message, 8000); }
}

async function finetuneAction(action, done) {
  try {
    showFinetune(await (await api('/api/finetune/' + action, { method: 'POST' })).json());
    if (done) message(done);
    pollFinetune();
  } catch (e) { message('fine-tune: ' + e.message, 8000); }
}

// ------------------------------------------------------------ segment all

async function segmentAll() {
  if (!S.image) return;
  const d = $('seg-diameter').value.trim().toLowerCase();
  const diameter = d === 'auto' ? 'auto' : d === '' || d === 'off' ? 0 : Number(d);
  if (diameter !== 'auto' && !(Number.isFinite(diameter) && diameter >= 0)) {
    message('cell diameter: give pixels, 0 (off) or auto', 6000);
    return;
  }
  try {
    S.awaitSegment = true;
    const body = JSON.stringify({ tiled: $('seg-tiled').checked, diameter });
    const st = await (await api(`/api/images/${S.image.id}/segment`, { method: 'POST', body })).json();
    S.image.segment = st.segment;
    showSegment(S.image);
    pollStatus();
  } catch (e) { S.awaitSegment = false; message('segment all: ' + e.message, 6000); }
}

// the button starts a segment-all, or stops the one that is queued or running
async function segmentButton() {
  const s = S.image && S.image.segment;
  if (!s || !['queued', 'running'].includes(s.state)) return segmentAll();
  try {
    const st = await (await api(`/api/images/${S.image.id}/segment/stop`, { method: 'POST' })).json();
    S.image.segment = st.segment;
    showSegment(S.image);
    pollStatus();
  } catch (e) { message('stop: ' + e.message, 6000); }
}

async function fetchSegmentResult() {
  const img = S.image;
  const r = await api(`/api/images/${img.id}/segment`);
  const { labels, info } = decodeLabels(await r.arrayBuffer(), img.width, img.height);
  if (S.image !== img) return;
  if (countLabels() > 0 && !confirm('Replace the current labels with the segment-all result? (undo restores them)')) return;
  const cells = info.cells || {};
  edit(() => {
    let mx = 0;
    for (let i = 0; i < labels.length; i++) { const v = labels[i]; S.labels[i] = v; if (v > mx) mx = v; }
    S.nextLabel = Math.max(S.nextLabel, mx + 1);
  });
  for (const [k, v] of Object.entries(cells)) S.info.set(+k, v);
  S.prompt = null;
  renderCandidates();
  message(`segment all: ${info.n_cells ?? countLabels()} cells`);
}

// ------------------------------------------------------------ prompts (decoder only)

function paintMask(m, label, L) {
  // RLE over the mask's bbox: alternating off/on runs, starting with off
  const W = S.image.width, [x0, y0, x1, y1] = m.bbox, w = x1 - x0;
  const over = $('overwrite').checked;
  let k = 0, on = false;
  for (const run of m.counts) {
    if (on) for (let t = k; t < k + run; t++) {
      const i = (y0 + Math.floor(t / w)) * W + x0 + (t % w);
      if (over || L[i] === 0 || L[i] === label) L[i] = label;
    }
    k += run; on = !on;
  }
}

async function sendPrompt() {
  const p = S.prompt;
  if (!p || !S.image) return;
  if (S.promptBusy) { S.queuedPrompt = true; return; }
  const e = S.image.embedding;
  if (!e || e.state !== 'ready') { message('the embedding is not ready yet'); pollStatus(); return; }
  S.promptBusy = true;
  const img = S.image;
  const body = { box: p.box, points: p.points.map((q) => [q[0], q[1], q[2]]), multimask: $('multimask').checked };
  if (p.ref && p.points.length) body.mask_input = { ref: p.ref, index: p.chosen || 0 };
  const t0 = performance.now();
  try {
    const j = await (await api(`/api/images/${img.id}/prompt`, { method: 'POST', body: JSON.stringify(body) })).json();
    if (S.image !== img || S.prompt !== p) return;
    p.ref = j.ref;
    p.candidates = j.masks;
    p.chosen = j.best;
    applyCandidate(p, j.best);
    // a window at cell size (small or large cells; the server says which): named, with its encoding
    const at = j.view ? `, at cell size in a ${j.view[2]} px window${j.view_encoded ? ' (encoded now)' : ''}` : '';
    $('prompt-info').textContent = `decoder ${j.decode_ms.toFixed(1)} ms, round trip ${(performance.now() - t0).toFixed(0)} ms${at}`;
  } catch (err) {
    if (err.status === 409) message('the embedding is not ready yet');
    else message('prompt failed: ' + err.message, 5000);
    if (err.status === 409) pollStatus();
  } finally {
    S.promptBusy = false;
    if (S.queuedPrompt) { S.queuedPrompt = false; sendPrompt(); }
  }
}

function applyCandidate(p, k) {
  const m = p.candidates[k];
  p.chosen = k;
  edit(() => {
    const L = S.labels;
    if (p.painted) for (let i = 0; i < L.length; i++) if (L[i] === p.label) L[i] = 0;
    paintMask(m, p.label, L);
  });
  p.painted = true;
  S.info.set(p.label, [1, m.iou]);   // a user prompt: score 1, as for user boxes in 'cellsam segment'
  if (S.selected !== p.label) select(p.label);
  if (m.area === 0) message('the mask is empty');
  renderCandidates();
}

function renderCandidates() {
  const div = $('candidates');
  div.innerHTML = '';
  const p = S.prompt;
  if (!p || !p.candidates || p.candidates.length < 2) return;
  p.candidates.forEach((m, k) => {
    const b = document.createElement('button');
    b.textContent = `${k + 1}: IoU ${m.iou.toFixed(2)}`;
    if (k === p.chosen) b.classList.add('active');
    b.onclick = () => applyCandidate(p, k);
    div.appendChild(b);
  });
}

function finishPrompt() {
  S.prompt = null;
  renderCandidates();
}

function startBoxPrompt(box) {
  const label = newLabel();
  S.prompt = { label, box, points: [], painted: false };
  sendPrompt();
}

function addPoint(x, y, positive) {
  let p = S.prompt;
  if (!p) {
    if (S.selected) {   // refine an existing cell: its box plus the new point
      p = S.prompt = { label: S.selected, box: labelBox(S.selected), points: [], painted: true };
    } else if (positive) {
      p = S.prompt = { label: newLabel(), box: null, points: [], painted: false };
    } else return message('a negative point needs a cell: draw a box or select a label first');
  }
  p.points.push([x, y, positive ? 1 : 0]);
  requestDraw();
  sendPrompt();
}

// ------------------------------------------------------------ hand tools

function labelAt(x, y) {
  if (!S.image) return 0;
  const xi = Math.floor(x), yi = Math.floor(y);
  if (xi < 0 || yi < 0 || xi >= S.image.width || yi >= S.image.height) return 0;
  return S.labels[yi * S.image.width + xi];
}

function stampBrush(x, y, value) {
  const W = S.image.width, H = S.image.height, r = +$('brush-size').value / 2, L = S.labels;
  const x0 = Math.max(0, Math.floor(x - r)), x1 = Math.min(W - 1, Math.ceil(x + r));
  const y0 = Math.max(0, Math.floor(y - r)), y1 = Math.min(H - 1, Math.ceil(y + r));
  for (let yy = y0; yy <= y1; yy++)
    for (let xx = x0; xx <= x1; xx++) {
      const dx = xx + 0.5 - x, dy = yy + 0.5 - y;
      if (dx * dx + dy * dy <= r * r) L[yy * W + xx] = value;
    }
  updateOverlay(x0, y0, x1 + 1, y1 + 1);
}

function strokeBrush(a, b, value) {
  const dist = Math.hypot(b[0] - a[0], b[1] - a[1]), step = Math.max(0.5, +$('brush-size').value / 4);
  const n = Math.max(1, Math.ceil(dist / step));
  for (let k = 1; k <= n; k++) stampBrush(a[0] + (b[0] - a[0]) * k / n, a[1] + (b[1] - a[1]) * k / n, value);
}

function deleteLabel(l) {
  if (!l) return;
  edit(() => { const L = S.labels; for (let i = 0; i < L.length; i++) if (L[i] === l) L[i] = 0; });
  if (S.selected === l) select(0);
  if (S.prompt && S.prompt.label === l) finishPrompt();
}

function mergeInto(target, src) {
  if (!target || !src || target === src) return;
  edit(() => { const L = S.labels; for (let i = 0; i < L.length; i++) if (L[i] === src) L[i] = target; });
  message(`merged ${src} into ${target}`);
}

// Split: cut the labels under a line (4-connected path), relabel their 4-connected
// components (the largest keeps its value), then give cut pixels back to a neighbour.
function splitAlong(a, b) {
  const W = S.image.width, H = S.image.height, L = S.labels;
  const path = [];
  let x = Math.floor(a[0]), y = Math.floor(a[1]);
  const x1 = Math.floor(b[0]), y1 = Math.floor(b[1]);
  const dx = Math.abs(x1 - x), dy = -Math.abs(y1 - y), sx = x < x1 ? 1 : -1, sy = y < y1 ? 1 : -1;
  let err = dx + dy;
  for (let guard = 0; guard < 4 * (W + H); guard++) {
    path.push([x, y]);
    if (x === x1 && y === y1) break;
    const e2 = 2 * err;
    if (e2 >= dy && (e2 > dx || dx >= -dy)) { err += dy; x += sx; } else { err += dx; y += sy; }
  }
  const hit = new Map();
  for (const [px, py] of path) if (px >= 0 && py >= 0 && px < W && py < H && L[py * W + px]) hit.set(py * W + px, L[py * W + px]);
  const cutLabels = new Set(hit.values());
  if (!cutLabels.size) return message('draw the line across a label');
  let pieces = 0;
  const families = new Map();
  edit(() => {
    for (const i of hit.keys()) L[i] = 0;
    for (const l of cutLabels) {
      const box = labelBox(l);
      if (!box) continue;
      const [bx0, by0, bx1, by1] = box, comp = [];
      const seen = new Uint8Array((bx1 - bx0) * (by1 - by0)), bw = bx1 - bx0;
      for (let yy = by0; yy < by1; yy++) for (let xx = bx0; xx < bx1; xx++) {
        const s = (yy - by0) * bw + (xx - bx0);
        if (seen[s] || L[yy * W + xx] !== l) continue;
        const pix = [], stack = [yy * W + xx];
        seen[s] = 1;
        while (stack.length) {
          const i = stack.pop(); pix.push(i);
          const cx = i % W, cy = (i - cx) / W;
          for (const [nx, ny] of [[cx - 1, cy], [cx + 1, cy], [cx, cy - 1], [cx, cy + 1]]) {
            if (nx < bx0 || ny < by0 || nx >= bx1 || ny >= by1) continue;
            const ns = (ny - by0) * bw + (nx - bx0), ni = ny * W + nx;
            if (!seen[ns] && L[ni] === l) { seen[ns] = 1; stack.push(ni); }
          }
        }
        comp.push(pix);
      }
      comp.sort((p, q) => q.length - p.length);
      const family = new Set([l]);
      for (let c = 1; c < comp.length; c++) { const nl = newLabel(); family.add(nl); for (const i of comp[c]) L[i] = nl; pieces++; }
      families.set(l, family);
    }
    for (const [i, l] of hit) {   // cut pixels rejoin a 4-neighbour that came from the same label
      const cx = i % W, family = families.get(l);
      for (const ni of [i - 1, i + 1, i - W, i + W]) {
        if (ni < 0 || ni >= L.length || Math.abs((ni % W) - cx) > 1) continue;
        if (family && family.has(L[ni])) { L[i] = L[ni]; break; }
      }
      if (!L[i]) L[i] = l;
    }
  });
  message(pieces ? `split into ${pieces + 1} parts` : 'the line did not cut the label in two');
}

// ------------------------------------------------------------ view: pan / zoom / draw

function fitView() {
  if (!S.image) return;
  const r = view.getBoundingClientRect();
  const s = Math.min(r.width / S.image.width, r.height / S.image.height) * 0.95;
  S.view = { scale: s, tx: (r.width - S.image.width * s) / 2, ty: (r.height - S.image.height * s) / 2 };
  requestDraw();
}

function zoomAt(factor, mx, my) {
  const v = S.view, ns = Math.min(64, Math.max(0.02, v.scale * factor));
  v.tx = mx - (mx - v.tx) * ns / v.scale;
  v.ty = my - (my - v.ty) * ns / v.scale;
  v.scale = ns;
  requestDraw();
}

function toImage(ev) {
  const r = view.getBoundingClientRect();
  const mx = ev.clientX - r.left, my = ev.clientY - r.top;
  return { mx, my, x: (mx - S.view.tx) / S.view.scale, y: (my - S.view.ty) / S.view.scale };
}

let drawPending = false;
function requestDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(draw);
}

function draw() {
  drawPending = false;
  const dpr = window.devicePixelRatio || 1, r = view.getBoundingClientRect();
  const w = Math.round(r.width * dpr), h = Math.round(r.height * dpr);
  if (view.width !== w || view.height !== h) { view.width = w; view.height = h; }
  vctx.setTransform(1, 0, 0, 1, 0, 0);
  vctx.clearRect(0, 0, w, h);
  if (!S.image) return;
  const v = S.view;
  vctx.setTransform(dpr * v.scale, 0, 0, dpr * v.scale, dpr * v.tx, dpr * v.ty);
  vctx.imageSmoothingEnabled = v.scale < 1;
  vctx.drawImage(imgCanvas, 0, 0);
  vctx.imageSmoothingEnabled = false;
  if ($('show-labels').checked) vctx.drawImage(labCanvas, 0, 0);
  const px = 1 / v.scale;
  const p = S.prompt;
  if (p && p.box) {
    vctx.strokeStyle = '#ffd27f'; vctx.lineWidth = 1.5 * px; vctx.setLineDash([4 * px, 3 * px]);
    vctx.strokeRect(p.box[0], p.box[1], p.box[2] - p.box[0], p.box[3] - p.box[1]);
    vctx.setLineDash([]);
  }
  if (p) for (const q of p.points) {
    vctx.beginPath(); vctx.arc(q[0], q[1], 5 * px, 0, 2 * Math.PI);
    vctx.fillStyle = q[2] ? '#3fdc6e' : '#ff5252'; vctx.fill();
    vctx.lineWidth = 1.5 * px; vctx.strokeStyle = '#000'; vctx.stroke();
  }
  const d = S.drag;
  if (d && d.kind === 'box') {
    vctx.strokeStyle = '#8fc1ff'; vctx.lineWidth = 1.5 * px;
    vctx.strokeRect(d.x0, d.y0, d.x - d.x0, d.y - d.y0);
  }
  if (d && d.kind === 'split') {
    vctx.strokeStyle = '#ff5252'; vctx.lineWidth = 1.5 * px;
    vctx.beginPath(); vctx.moveTo(d.x0, d.y0); vctx.lineTo(d.x, d.y); vctx.stroke();
  }
  if (S.cursor && (S.tool === 'paint' || S.tool === 'erase')) {
    vctx.strokeStyle = S.tool === 'paint' ? '#fff' : '#ff5252'; vctx.lineWidth = px;
    vctx.beginPath(); vctx.arc(S.cursor.x, S.cursor.y, +$('brush-size').value / 2, 0, 2 * Math.PI); vctx.stroke();
  }
}

new ResizeObserver(() => requestDraw()).observe(view);

// ------------------------------------------------------------ mouse

view.addEventListener('contextmenu', (e) => e.preventDefault());

view.addEventListener('wheel', (e) => {
  e.preventDefault();
  const { mx, my } = toImage(e);
  zoomAt(Math.pow(1.0015, -e.deltaY * (e.deltaMode === 1 ? 30 : 1)), mx, my);
}, { passive: false });

view.addEventListener('pointerdown', (e) => {
  if (!S.image) return;
  view.setPointerCapture(e.pointerId);
  const q = toImage(e);
  const panning = e.button === 1 || e.button === 2 || S.spaceDown;
  if (panning) { S.drag = { kind: 'pan', mx: q.mx, my: q.my, moved: false }; return; }
  if (e.button !== 0) return;
  const t = S.tool;
  if (t === 'select') S.drag = { kind: 'pan', mx: q.mx, my: q.my, moved: false, click: q };
  else if (t === 'box') S.drag = { kind: 'box', x0: q.x, y0: q.y, x: q.x, y: q.y };
  else if (t === 'split') S.drag = { kind: 'split', x0: q.x, y0: q.y, x: q.x, y: q.y };
  else if (t === 'paint' || t === 'erase') {
    let value = 0;
    if (t === 'paint') {
      if (!S.selected) select(newLabel());
      value = S.selected;
    }
    S.drag = { kind: 'brush', value, last: [q.x, q.y], before: S.labels.slice() };
    stampBrush(q.x, q.y, value);
  } else if (t === 'pos' || t === 'neg') addPoint(q.x, q.y, t === 'pos');
  else if (t === 'delete') deleteLabel(labelAt(q.x, q.y));
  else if (t === 'merge') {
    const l = labelAt(q.x, q.y);
    if (!S.selected) select(l);
    else if (l) mergeInto(S.selected, l);
  }
});

view.addEventListener('pointermove', (e) => {
  if (!S.image) return;
  const q = toImage(e);
  S.cursor = q;
  const l = labelAt(q.x, q.y);
  $('cursor-info').textContent = `x ${Math.floor(q.x)}, y ${Math.floor(q.y)}${l ? ', label ' + l : ''}`;
  const d = S.drag;
  if (d) {
    if (d.kind === 'pan') {
      S.view.tx += q.mx - d.mx; S.view.ty += q.my - d.my;
      if (Math.abs(q.mx - d.mx) + Math.abs(q.my - d.my) > 0) d.moved = true;
      d.mx = q.mx; d.my = q.my;
    } else if (d.kind === 'box' || d.kind === 'split') { d.x = q.x; d.y = q.y; }
    else if (d.kind === 'brush') { strokeBrush(d.last, [q.x, q.y], d.value); d.last = [q.x, q.y]; }
  }
  requestDraw();
});

function endDrag(e) {
  const d = S.drag;
  S.drag = null;
  if (!d || !S.image) return;
  if (d.kind === 'pan' && d.click && !d.moved) {
    finishPrompt();
    select(labelAt(d.click.x, d.click.y));
  } else if (d.kind === 'box') {
    const W = S.image.width, H = S.image.height;
    const b = [Math.min(d.x0, d.x), Math.min(d.y0, d.y), Math.max(d.x0, d.x), Math.max(d.y0, d.y)]
      .map((v, i) => Math.max(0, Math.min(i % 2 ? H : W, v)));
    if (b[2] - b[0] < 2 || b[3] - b[1] < 2) message('drag a box around a cell');
    else startBoxPrompt(b);
  } else if (d.kind === 'split') splitAlong([d.x0, d.y0], [d.x, d.y]);
  else if (d.kind === 'brush') {
    // record the whole stroke as one edit: restore, then redo it inside edit()
    const after = S.labels;
    S.labels = d.before;
    edit(() => { S.labels.set(after); });
  }
  requestDraw();
}
view.addEventListener('pointerup', endDrag);
view.addEventListener('pointercancel', endDrag);
view.addEventListener('pointerleave', () => { S.cursor = null; requestDraw(); });

// ------------------------------------------------------------ keyboard

function setTool(t) {
  S.tool = t;
  for (const b of document.querySelectorAll('#tools [data-tool]')) b.classList.toggle('active', b.dataset.tool === t);
  view.style.cursor = t === 'select' ? 'grab' : 'crosshair';
  requestDraw();
}

document.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'INPUT' && e.target.type !== 'checkbox' && e.target.type !== 'range') return;
  if (e.target.tagName === 'SELECT') return;
  const k = e.key, ctrl = e.ctrlKey || e.metaKey;
  if (ctrl && (k === 'z' || k === 'Z')) { e.preventDefault(); (e.shiftKey ? redo : undo)(); return; }
  if (ctrl && (k === 'y' || k === 'Y')) { e.preventDefault(); redo(); return; }
  if (ctrl) return;
  const tools = { v: 'select', b: 'box', p: 'pos', n: 'neg', d: 'paint', e: 'erase', m: 'merge', s: 'split', x: 'delete' };
  if (tools[k.toLowerCase()] && !e.altKey) { setTool(tools[k.toLowerCase()]); return; }
  if (k === ' ') { S.spaceDown = true; e.preventDefault(); return; }
  if (k === 'Escape') { finishPrompt(); select(0); $('help').hidden = true; requestDraw(); return; }
  if (k === 'Enter') { finishPrompt(); requestDraw(); return; }
  if (k === 'Delete' || k === 'Backspace') { deleteLabel(S.selected); return; }
  if (k === '1' || k === '2' || k === '3') {
    const p = S.prompt, i = +k - 1;
    if (p && p.candidates && i < p.candidates.length) applyCandidate(p, i);
    return;
  }
  if (k === '[' || k === ']') {
    const bs = $('brush-size');
    bs.value = Math.max(1, Math.min(60, +bs.value + (k === ']' ? 2 : -2)));
    $('brush-size-val').textContent = bs.value;
    requestDraw();
    return;
  }
  if (k === 'f' || k === 'F') { fitView(); return; }
  const r = view.getBoundingClientRect();
  if (k === '+' || k === '=') { zoomAt(1.25, r.width / 2, r.height / 2); return; }
  if (k === '-' || k === '_') { zoomAt(0.8, r.width / 2, r.height / 2); return; }
  if (k === 'g' || k === 'G') { segmentAll(); return; }
  if (k === 'o' || k === 'O') { $('show-labels').checked = !$('show-labels').checked; requestDraw(); return; }
  if (k === 'c' || k === 'C') {
    const ds = $('display-select');
    ds.selectedIndex = (ds.selectedIndex + 1) % ds.options.length;
    renderImage();
    return;
  }
  if (k === '?' || k === 'h' || k === 'H') { $('help').hidden = !$('help').hidden; }
});
document.addEventListener('keyup', (e) => { if (e.key === ' ') S.spaceDown = false; });

// ------------------------------------------------------------ controls

for (const b of document.querySelectorAll('#tools [data-tool]')) b.onclick = () => setTool(b.dataset.tool);
$('undo-btn').onclick = undo;
$('redo-btn').onclick = redo;
$('open-btn').onclick = () => openImage($('file-select').value);
$('file-select').ondblclick = () => openImage($('file-select').value);
$('refresh-btn').onclick = () => loadFiles();
$('upload-input').onchange = (e) => { if (e.target.files[0]) uploadFile(e.target.files[0]); e.target.value = ''; };
$('segment-btn').onclick = segmentButton;
$('ft-start').onclick = startFinetune;
$('ft-stop').onclick = () => finetuneAction('stop');
$('ft-use').onclick = () => finetuneAction('use', 'the fine-tuned model now segments and prompts');
for (const [id, fmt] of [['export-png', 'png'], ['export-tif', 'tif'], ['export-csv', 'csv']])
  $(id).onclick = async () => {
    if (!S.image) return;
    if (!S.everSaved) S.dirty = true;   // export reads the saved labels: save even an empty image
    await save();
    const a = document.createElement('a');
    a.href = `/api/images/${S.image.id}/export?format=${fmt}`;
    a.download = '';
    document.body.appendChild(a);
    a.click();
    a.remove();
  };
$('help-btn').onclick = () => { $('help').hidden = false; };
$('help-close').onclick = () => { $('help').hidden = true; };
for (const id of ['contrast', 'brightness', 'display-select']) $(id).addEventListener('input', renderImage);
for (const id of ['opacity', 'outlines']) $(id).addEventListener('input', () => updateOverlay());
$('show-labels').addEventListener('input', requestDraw);
$('brush-size').addEventListener('input', () => { $('brush-size-val').textContent = $('brush-size').value; requestDraw(); });
$('reset-display').onclick = () => { $('contrast').value = 0; $('brightness').value = 0; renderImage(); };
for (const id of ['nuclear-select', 'cell-select', 'grey-check'])
  $(id).addEventListener('change', () => {
    if (id !== 'grey-check' && $(id).value !== '0') $('grey-check').checked = false;
    if (id === 'grey-check' && $('grey-check').checked) { $('nuclear-select').value = '0'; $('cell-select').value = '0'; }
    if (S.image) openImage(S.image.path);   // new channel choice = new embedding; labels stay
  });

setTool('box');
loadInfo();
pollFinetune();
loadFiles(decodeURIComponent(location.hash.slice(1)) || undefined)
  .then(() => { if (location.hash.length > 1) openImage(decodeURIComponent(location.hash.slice(1))); })
  .catch((e) => message('cannot reach the server: ' + e.message, 0));

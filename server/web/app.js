// flawscope web page. It uses the server's own /v1 API (the same requests
// curl would send) and keeps everything in this tab: nothing is fetched from
// anywhere else, and the token lives in sessionStorage only.
'use strict';

const TOKEN_KEY = 'flawscope.token';
const ZERO_SHOT = '\u0000zero-shot';
// No model: the picked images scored against each other (POST /v1/batch/score).
const BATCH = '\u0000batch';
const PARALLEL = 2; // requests in flight at once; more would only queue on the server
const RETRIES_WHEN_BUSY = 3;

const $ = (id) => document.getElementById(id);
const MAX_FOLDER_FILES = 2000; // images read from one dropped or chosen folder at most
const IMAGE_NAME = /\.(png|jpe?g|bmp|tiff?|webp|gif)$/i;
// One colour per typed defect, told apart on the heatmap's blues and reds.
const DEFECT_COLOURS = ['#00e5ff', '#ffd400', '#ff4fd8', '#7cff4f', '#ff8c1a', '#b388ff'];

const state = {
  items: [],
  selected: null,
  models: new Map(),
  caps: null,
  undo: [],
  nextId: 1,
  running: 0,
  zoom: 'fit', // or a scale: 1 is the image's native resolution
  calibration: new Map(), // model name -> its /calibration answer (or a promise of it)
  thresholds: new Map(), // model name -> the threshold a person moved to on this page
  hiddenDefects: new Set(), // typed defect texts whose markers are toggled off
};

// ---------- talking to the server ----------

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

let tokenPrompt = null;

function askToken(why) {
  if (tokenPrompt) return tokenPrompt;
  tokenPrompt = new Promise((resolve) => {
    const dialog = $('token-dialog');
    $('token-why').textContent = why;
    $('token').value = '';
    const done = (event) => {
      event.preventDefault();
      const value = $('token').value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $('token-form').removeEventListener('submit', done);
      dialog.close();
      tokenPrompt = null;
      resolve();
    };
    $('token-form').addEventListener('submit', done);
    dialog.showModal();
    $('token').focus();
  });
  return tokenPrompt;
}

async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set('Authorization', 'Bearer ' + token);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (err) {
      throw new ApiError(0, 'network', 'The server did not answer (' + err.message + '). Is flawscope serve still running?');
    }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(token ? 'The server refused that token; type it again.' : 'This server needs an access token (the one in its token file).');
      continue;
    }
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const err = (body && body.error) || {};
      const retry = Number(response.headers.get('Retry-After')) || 1;
      throw new ApiError(response.status, err.code || 'http_' + response.status, err.message || response.statusText, retry);
    }
    return body;
  }
}

// What a person should read for a failed request.
function readable(err) {
  const s = err.status;
  const m = err.message;
  if (s === 413) return 'Too large: ' + m;
  if (s === 400 && /image|empty/.test(err.code)) return 'Not an image flawscope can read: ' + m;
  if (s === 503 && err.code === 'overloaded') return 'The server is busy (overloaded) and refused the image after ' + RETRIES_WHEN_BUSY + ' tries; press Retry shortly. ' + m;
  if (s === 503) return 'Not available: ' + m;
  if (s === 408) return 'The upload was too slow: ' + m;
  if (s === 504) return 'The server took too long: ' + m;
  if (s === 0) return m;
  return 'Error ' + s + ' (' + err.code + '): ' + m;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Retries only the "busy" answer, as its Retry-After says.
async function apiBusyRetry(path, makeInit) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await api(path, makeInit());
    } catch (err) {
      if (err.status === 503 && err.code === 'overloaded' && attempt < RETRIES_WHEN_BUSY) {
        await sleep(1000 * err.retryAfter);
        continue;
      }
      throw err;
    }
  }
}

// ---------- start-up ----------

async function start() {
  wireControls();
  try {
    const [models, caps] = await Promise.all([api('/v1/models'), api('/v1/capabilities')]);
    state.caps = caps;
    for (const m of models.models) state.models.set(m.name, m);
    fillSources();
    describeServer();
    for (const name of state.models.keys()) loadCalibration(name);
  } catch (err) {
    $('server-status').textContent = 'Cannot read the server\'s models: ' + readable(err);
  }
}

function fillSources() {
  const select = $('source');
  select.textContent = '';
  for (const [name, m] of state.models) {
    const option = new Option('Model ' + name + ' (' + m.detector + ')', name);
    select.add(option);
  }
  const zs = state.caps.zero_shot;
  const option = new Option(zs.available
    ? 'Zero-shot CLIP (typed object and defects)'
    : 'Zero-shot CLIP (not available on this server)', ZERO_SHOT);
  option.disabled = !zs.available;
  select.add(option);
  const b = state.caps.batch;
  select.add(new Option('No model: score this batch against itself (' + b.min_images + '–' + b.max_images + ' images, uncalibrated)', BATCH));
  updateClipNote();
}

function describeServer() {
  const caps = state.caps;
  const parts = [state.models.size + ' model(s): ' + [...state.models.keys()].join(', ')];
  parts.push(caps.zero_shot.available ? 'CLIP available' : 'no CLIP');
  parts.push(caps.results_store ? 'OK/NG decisions are saved in the results store' : 'OK/NG decisions are NOT saved (server started without --db)');
  $('server-status').textContent = parts.join(' · ');
}

function typedDefects() {
  return $('defects').value.split('\n').map((d) => d.trim()).filter((d) => d).slice(0, state.caps ? state.caps.zero_shot.max_prompts : 32);
}

function updateClipNote() {
  const caps = state.caps;
  const note = $('clip-note');
  if (!caps) return;
  const defects = typedDefects();
  if ($('source').value === BATCH) {
    const b = caps.batch;
    note.textContent = 'Pick or drop ' + b.min_images + ' to ' + b.max_images + ' images at once: each is scored against the others (no model, no normal images; typed defects are not checked). The verdict flags the images that stand out from the batch: uncalibrated, no false-alarm rate.';
    return;
  }
  const zeroShot = $('source').value === ZERO_SHOT;
  const model = zeroShot ? null : state.models.get($('source').value);
  if (model) {
    // A model checks typed defects with its own text layer: the object is
    // the one it was fitted for, and each threshold is calibrated.
    const layer = model.text_layer;
    if (!defects.length) {
      note.textContent = layer && layer.available
        ? 'Type defect descriptions to have ' + $('source').value + '\'s CLIP layer check each one (object "' + layer.object + '").'
        : '';
    } else if (!layer) {
      note.textContent = 'Model ' + $('source').value + ' has no CLIP text layer, so typed defects are not checked one by one; the verdict is the model\'s (fit it with --object and CLIP weights to add one).';
    } else if (!layer.available) {
      note.textContent = 'Typed defects cannot be checked here: ' + layer.reason + '. The verdict is the model\'s.';
    } else {
      note.textContent = 'Each typed defect is checked by the model\'s CLIP layer as "' + layer.object + '", with its own threshold calibrated on ' + layer.normal_images + ' normal images.';
    }
    return;
  }
  if (!caps.zero_shot.available) {
    note.textContent = defects.length
      ? 'Typed defect descriptions cannot be checked here: ' + caps.zero_shot.reason + '. The verdict, score and heatmap are the classical model\'s.'
      : 'CLIP is not available on this server, so typed defect descriptions cannot be checked; the classical model is used.';
  } else if ((defects.length || zeroShot) && !$('object').value.trim()) {
    note.textContent = 'Type the object (e.g. "solar cell") so CLIP can check the descriptions.';
  } else if (zeroShot && !defects.length) {
    note.textContent = 'Type at least one defect description for zero-shot scoring.';
  } else {
    note.textContent = '';
  }
}

// ---------- adding images ----------

function addFiles(files) {
  const source = $('source').value;
  if (!source) return;
  const object = $('object').value.trim();
  const batch = source === BATCH ? { id: state.nextId, size: 0 } : null;
  const defects = batch ? [] : typedDefects();
  const added = [];
  let first = null;
  for (const entry of files) {
    // A file from a folder comes with the path inside it, so two 000.png
    // from different folders are told apart.
    const file = entry.file || entry;
    const path = entry.path || file.webkitRelativePath || file.name;
    const item = {
      id: state.nextId++,
      file,
      name: path || 'pasted-image-' + state.nextId + '.png',
      model: source === ZERO_SHOT || batch ? null : source,
      // Scored together with the others added now, against each other.
      batch,
      // The operating point asked for (a false-alarm limit), if any: the
      // server moves the model's threshold for this request only.
      maxFar: source === ZERO_SHOT || batch ? '' : $('max-far').value,
      object,
      defects: defects.map((text) => ({ text, score: null, verdict: null, error: null })),
      status: 'queued',
      result: null,
      error: null,
      decision: 'none',
      decisionNote: '',
      overlay: null,
      picture: null,
      thumb: null,
    };
    state.items.push(item);
    added.push(item);
    if (first === null) first = item.id;
  }
  // What was just added is what a person wants to see.
  if (first !== null) state.selected = first;
  if (batch && added.length) {
    batch.size = added.length;
    for (const item of added) item.status = 'scoring';
    render();
    scoreBatch(added).finally(render);
    return;
  }
  render();
  pump();
  if (source !== ZERO_SHOT) loadCalibration(source);
}

/** Scores a batch's items in one request, each against the others. */
async function scoreBatch(items) {
  const b = state.caps.batch;
  const limit = state.caps.body_limit_bytes;
  const fail = (message) => {
    for (const item of items) { item.status = 'error'; item.error = message; }
  };
  const bytes = items.reduce((n, i) => n + i.file.size, 0);
  if (items.length < b.min_images || items.length > b.max_images) {
    fail('A batch scored against itself needs ' + b.min_images + ' to ' + b.max_images + ' images picked at once; these were ' + items.length + '. Pick them again together.');
    return;
  }
  if (bytes > limit) {
    fail('Too large: the batch is ' + bytes + ' bytes; this server takes at most ' + limit + ' bytes in one request. Pick fewer or smaller images.');
    return;
  }
  try {
    const answer = await apiBusyRetry('/v1/batch/score?heatmap=png', () => ({
      method: 'POST',
      body: form(items.map((i) => ['image', i.file, i.name])),
    }));
    items.forEach((item, n) => {
      const r = answer.results[n];
      if (r && r.error) {
        item.status = 'error';
        item.error = 'Not scored with the batch: ' + r.error.message;
      } else if (r) {
        item.result = r;
        item.status = 'done';
      }
    });
    for (const item of items) item.batch.scored = answer.scored;
    render();
    for (const item of items) if (item.status === 'done') await drawable(item);
    renderDetail();
  } catch (err) {
    fail(err instanceof ApiError ? readable(err) : 'The page failed: ' + err.message);
  }
}

/** Image files of a dropped folder entry, with their paths inside it. */
async function folderFiles(entry, out) {
  if (out.length >= MAX_FOLDER_FILES) return;
  if (entry.isFile) {
    if (!IMAGE_NAME.test(entry.name)) return;
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ file, path: entry.fullPath.replace(/^\//, '') });
    return;
  }
  if (!entry.isDirectory) return;
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return;
    batch.sort((a, b) => a.name.localeCompare(b.name));
    for (const child of batch) await folderFiles(child, out);
  }
}

async function dropped(transfer) {
  const entries = [...(transfer.items || [])]
    .map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null))
    .filter((e) => e);
  if (!entries.length || entries.every((e) => e.isFile)) {
    addFiles([...(transfer.files || [])]);
    return;
  }
  const out = [];
  for (const e of entries) await folderFiles(e, out);
  addFiles(out);
}

function pump() {
  while (state.running < PARALLEL) {
    const next = state.items.find((i) => i.status === 'queued');
    if (!next) return;
    next.status = 'scoring';
    state.running++;
    score(next).finally(() => { state.running--; render(); pump(); });
  }
}

function form(fields) {
  const data = new FormData();
  for (const [k, v, name] of fields) {
    if (name === undefined) data.append(k, v); else data.append(k, v, name);
  }
  return data;
}

/** The score route of the item's model, with its operating point. */
function scoreUrl(item) {
  const far = item.maxFar ? '&max_far=' + encodeURIComponent(item.maxFar) : '';
  return '/v1/models/' + encodeURIComponent(item.model) + '/score?heatmap=png' + far;
}

async function score(item) {
  const limit = state.caps ? state.caps.body_limit_bytes : Infinity;
  try {
    if (item.file.size > limit) {
      throw new ApiError(413, 'payload_too_large', 'the file is ' + item.file.size + ' bytes; this server takes at most ' + limit + ' bytes');
    }
    if (item.model && item.defects.length) {
      // Typed defects go with the image: the model's text layer checks each
      // one beside the model's own verdict, in the same request.
      item.result = await apiBusyRetry(scoreUrl(item), () => ({
        method: 'POST',
        body: form([['image', item.file], ...item.defects.map((d) => ['defect', d.text])]),
      }));
      fillLayeredDefects(item);
    } else if (item.model) {
      // Read into memory first: a File body is streamed from the browser's
      // blob store while the server waits, which cost it ~10 ms a request.
      const bytes = await item.file.arrayBuffer();
      item.result = await apiBusyRetry(scoreUrl(item), () => ({
        method: 'POST',
        headers: { 'Content-Type': item.file.type || 'application/octet-stream' },
        body: bytes,
      }));
    } else {
      if (!item.object || !item.defects.length) {
        throw new ApiError(400, 'missing_prompt', 'zero-shot scoring needs the object and at least one defect description');
      }
      item.result = await apiBusyRetry('/v1/zero-shot?heatmap=png', () => ({
        method: 'POST',
        body: form([['image', item.file], ['object', item.object], ...item.defects.map((d) => ['prompt', d.text])]),
      }));
    }
    item.status = 'done';
    render();
    await drawable(item);
    if (item.id === state.selected) renderDetail();
    await scoreDefects(item);
  } catch (err) {
    item.status = 'error';
    item.error = err instanceof ApiError ? readable(err) : 'The page failed: ' + err.message;
  }
}

// The text layer's checks in a model's answer, onto the typed defects.
function fillLayeredDefects(item) {
  const checks = item.result.defects || [];
  for (const d of item.defects) {
    const c = checks.find((x) => x.description === d.text);
    if (c) {
      d.score = c.score;
      d.verdict = c.is_anomalous;
      d.far = c.estimated_false_alarm_rate;
      d.farBound = c.false_alarm_upper_bound_95;
      d.normalImages = c.normal_images;
      d.location = c.location;
    }
  }
  item.unchecked = item.result.defects_unchecked || null;
}

// Zero-shot only: one request per description, that description's score
// alone (a model's text layer answered them with the image already).
async function scoreDefects(item) {
  if (item.model || !item.defects.length || !state.caps.zero_shot.available || !item.object) return;
  for (const d of item.defects) {
    try {
      const r = await apiBusyRetry('/v1/zero-shot', () => ({
        method: 'POST',
        body: form([['image', item.file], ['object', item.object], ['prompt', d.text]]),
      }));
      d.score = r.score;
      d.verdict = r.is_anomalous;
    } catch (err) {
      d.error = readable(err);
    }
    if (item.id === state.selected) renderDetail();
  }
}

async function drawable(item) {
  if (item.result && item.result.heatmap_png) {
    const overlay = new Image();
    overlay.src = 'data:image/png;base64,' + item.result.heatmap_png;
    try { await overlay.decode(); item.overlay = overlay; } catch (_) { item.overlay = null; }
  }
  try {
    item.picture = await createImageBitmap(item.file);
  } catch (_) {
    item.picture = null; // e.g. TIFF, which browsers do not draw
  }
}

// ---------- the list ----------

function ordered() {
  const rank = (i) => (i.status === 'done' ? 0 : i.status === 'error' ? 2 : 1);
  return [...state.items].sort((a, b) => rank(a) - rank(b)
    || (a.status === 'done' ? b.result.score - a.result.score : 0)
    || a.id - b.id);
}

function selectedItem() {
  return state.items.find((i) => i.id === state.selected) || null;
}

function verdictBadge(item) {
  const span = document.createElement('span');
  span.className = 'badge';
  if (item.status === 'done') {
    span.classList.add(anomalous(item) ? 'anomalous' : 'normal');
    span.textContent = anomalous(item) ? 'Anomalous' : 'Normal';
  } else if (item.status === 'error') {
    span.classList.add('error');
    span.textContent = 'Error';
  } else {
    span.classList.add('pending');
    span.textContent = item.status === 'queued' ? 'Waiting' : 'Scoring…';
  }
  return span;
}

function markText(decision) {
  return decision === 'ok' ? 'OK' : decision === 'ng' ? 'NG' : '—';
}

function render() {
  const list = $('list');
  list.textContent = '';
  for (const item of ordered()) {
    const li = document.createElement('li');
    li.id = 'item-' + item.id;
    li.setAttribute('role', 'option');
    li.setAttribute('aria-selected', String(item.id === state.selected));
    li.dataset.name = item.name;
    li.dataset.status = item.status;
    if (item.batch) li.dataset.batch = String(item.batch.id);
    if (item.status === 'done') {
      li.dataset.score = String(item.result.score);
      li.dataset.verdict = anomalous(item) ? 'anomalous' : 'normal';
    }
    li.dataset.decision = item.decision;
    li.dataset.saved = item.decisionNote.startsWith('saved') ? 'yes' : 'no';
    if (!item.thumb) item.thumb = URL.createObjectURL(item.file);
    const thumb = document.createElement('img');
    thumb.className = 'thumb';
    thumb.alt = '';
    thumb.src = item.thumb;
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = item.model ? item.name : item.name + (item.batch ? ' (batch)' : ' (zero-shot)');
    name.title = item.name;
    const model = document.createElement('span');
    model.className = 'model';
    model.textContent = item.model || (item.batch ? 'batch (musc)' : 'zero-shot');
    model.title = 'model';
    const scoreCell = document.createElement('span');
    scoreCell.className = 'score';
    scoreCell.textContent = item.status === 'done' ? item.result.score.toFixed(3) : '';
    const mark = document.createElement('span');
    mark.className = 'mark ' + item.decision;
    mark.textContent = markText(item.decision);
    mark.title = 'decision';
    li.append(thumb, name, model, verdictBadge(item), scoreCell, mark);
    li.addEventListener('click', () => { select(item.id); list.focus(); });
    list.append(li);
  }
  const sel = selectedItem();
  if (sel) list.setAttribute('aria-activedescendant', 'item-' + sel.id); else list.removeAttribute('aria-activedescendant');
  const done = state.items.filter((i) => i.status === 'done');
  const failed = state.items.filter((i) => i.status === 'error').length;
  const pending = state.items.length - done.length - failed;
  $('list-summary').textContent = state.items.length
    ? done.length + ' scored (' + done.filter(anomalous).length + ' anomalous)'
      + (pending ? ', ' + pending + ' waiting' : '') + (failed ? ', ' + failed + ' could not be scored' : '')
    : 'No images yet.';
  renderHistogram();
  renderDetail();
}

function select(id) {
  state.selected = id;
  render();
  const li = $('item-' + id);
  if (li) li.scrollIntoView({ block: 'nearest' });
}

function move(delta) {
  const rows = ordered();
  if (!rows.length) return;
  let at = rows.findIndex((i) => i.id === state.selected);
  if (delta === -Infinity) at = 0;
  else if (delta === Infinity) at = rows.length - 1;
  else at = Math.min(rows.length - 1, Math.max(0, at + delta));
  select(rows[at].id);
}

// ---------- the selected image ----------

/** What the threshold a result was judged at costs, in words. */
function costs(item, p) {
  if (item.batch && item.result) {
    return 'Rank ' + item.result.rank + ' of ' + item.batch.scored + ' in its batch. No false-alarm estimate: the batch was scored against itself with no normal images; an image is flagged when it stands out from the batch\'s own scores.';
  }
  if (!item.model || !p || !p.normal_images) {
    return 'No false-alarm estimate: zero-shot scores are not calibrated on normal images.';
  }
  const which = p.target && p.target.max_far !== undefined
    ? 'the threshold for at most ' + pct(p.target.max_far) + ' false alarms (' + p.threshold.toFixed(2) + ')'
    : item.model + '\'s own threshold';
  let text = 'At ' + which + ': about ' + pct(p.estimated_false_alarm_rate) + ' of normal images are flagged (95% bound '
    + pct(p.false_alarm_upper_bound_95) + ', from ' + p.normal_images + ' normal images scored out of sample)';
  if (p.synthetic_missed_alarm_rate !== undefined && p.synthetic_missed_alarm_rate !== null) {
    text += '; about ' + pct(p.synthetic_missed_alarm_rate) + ' of synthetic defects are missed';
  }
  if (p.labelled_missed_alarm_rate) {
    const l = p.labelled_missed_alarm_rate;
    text += '; ' + l.missed + ' of ' + l.images + ' images marked NG are missed (95% bound ' + pct(l.upper_95) + ')';
  }
  return text + '.';
}

function pct(x) {
  return (x * 100).toFixed(x < 0.01 ? 2 : 1) + '%';
}

function renderDetail() {
  const item = selectedItem();
  const err = $('detail-error');
  $('defects-out').textContent = '';
  $('regions').textContent = '';
  if (!item) {
    $('detail-title').textContent = 'Pick, drop or paste images to inspect them.';
    for (const id of ['detail-verdict', 'answer', 'false-alarm', 'decision-state']) $(id).textContent = '';
    err.hidden = true;
    clearCanvas();
    return;
  }
  $('detail-title').textContent = item.name + ' · ' + (item.model ? 'model ' + item.model : item.batch ? 'batch scored against itself' : 'zero-shot');
  err.hidden = item.status !== 'error';
  err.textContent = item.error || '';
  if (item.status === 'error' && !item.batch) {
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.textContent = 'Retry';
    retry.addEventListener('click', () => { item.status = 'queued'; item.error = null; render(); pump(); });
    err.append(' ', retry);
  }
  const r = item.result;
  const source = item.model ? 'model ' + item.model : item.batch ? 'the batch scored against itself (musc, uncalibrated)' : 'zero-shot CLIP (' + item.object + ')';
  $('detail-verdict').textContent = r
    ? (anomalous(item) ? 'Anomalous' : 'Normal') + ' · score ' + r.score.toFixed(3) + ' (threshold ' + thresholdShown(item).toFixed(2) + ', 0–1) · ' + source
    : item.status === 'error' ? '' : 'Scoring with ' + source + '…';
  $('answer').textContent = r ? r.answer : '';
  $('false-alarm').textContent = r ? costs(item, r.operating_point) : '';
  renderDefects(item);
  if (r) {
    r.regions.forEach((g, n) => {
      const li = document.createElement('li');
      li.textContent = 'Region ' + (n + 1) + ': x ' + g.x + ', y ' + g.y + ', ' + g.w + '×' + g.h + ' px, peak ' + g.peak.toFixed(2) + ', ' + pct(g.area / (r.width * r.height)) + ' of the image';
      $('regions').append(li);
    });
  }
  for (const id of ['mark-ok', 'mark-ng']) $(id).disabled = item.status !== 'done';
  $('decision-state').textContent = 'Decision: ' + markText(item.decision) + (item.decisionNote ? ' · ' + item.decisionNote : '');
  draw(item);
}

function defectTable(item, captionText) {
  const table = document.createElement('table');
  table.createCaption().textContent = captionText;
  const head = table.createTHead().insertRow();
  for (const h of ['Defect', 'Score (0–1)', 'Verdict', 'False-alarm estimate']) {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = h;
    head.append(th);
  }
  const body = table.createTBody();
  item.defects.forEach((d, n) => {
    const row = body.insertRow();
    const first = row.insertCell();
    if (d.location) {
      // A marker per located defect, in its colour; the box hides it.
      const toggle = document.createElement('input');
      toggle.type = 'checkbox';
      toggle.checked = !state.hiddenDefects.has(d.text);
      toggle.setAttribute('aria-label', 'Show the marker of ' + d.text);
      toggle.addEventListener('change', () => {
        if (toggle.checked) state.hiddenDefects.delete(d.text); else state.hiddenDefects.add(d.text);
        draw(item);
      });
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = DEFECT_COLOURS[n % DEFECT_COLOURS.length];
      first.append(toggle, swatch, 'D' + (n + 1) + ' ');
    }
    first.append(d.text);
    const cell = row.insertCell();
    cell.textContent = d.error ? d.error : d.score === null ? 'scoring…' : d.score.toFixed(3);
    if (d.score !== null) cell.dataset.score = String(d.score);
    row.insertCell().textContent = d.verdict === null || d.verdict === undefined ? '' : d.verdict ? 'Anomalous' : 'Normal';
    row.insertCell().textContent = d.far === undefined
      ? 'not known (not calibrated on normal images)'
      : 'about ' + pct(d.far) + '; at worst ' + oneIn(d.farBound) + ' (95% bound, ' + d.normalImages + ' normal images)';
  });
  return table;
}

function note(text) {
  const p = document.createElement('p');
  p.className = 'note';
  p.textContent = text;
  return p;
}

function renderDefects(item) {
  const out = $('defects-out');
  if (!item.defects.length) return;
  if (item.model) {
    if (!item.result) return;
    if (item.unchecked) {
      // The reason reads "the typed defects could not be checked: …".
      out.append(note(item.unchecked.charAt(0).toUpperCase() + item.unchecked.slice(1) + '. The result above is the model\'s own.'));
      return;
    }
    const flagged = item.result.flagged_by || [];
    out.append(defectTable(item, 'Each typed defect, checked by ' + item.model + '\'s CLIP layer with its own calibrated threshold'));
    out.append(note('Flagged by: ' + (flagged.length ? flagged.join(', ') : 'nothing')
      + ' · the model alone: ' + (item.result.model_is_anomalous ? 'anomalous' : 'normal') + '.'));
    return;
  }
  const caps = state.caps;
  if (!caps.zero_shot.available) {
    out.append(note('The typed defects (' + item.defects.map((d) => d.text).join(', ') + ') were not checked: ' + caps.zero_shot.reason + '. The result above is the classical model\'s.'));
    return;
  }
  if (!item.object) {
    out.append(note('The typed defects were not checked: no object was typed.'));
    return;
  }
  out.append(defectTable(item, 'Each typed defect, scored alone by zero-shot CLIP as "' + item.object + '"'));
}

// ---------- drawing ----------

function clearCanvas() {
  const c = $('overlay');
  c.getContext('2d').clearRect(0, 0, c.width, c.height);
}

function draw(item) {
  const canvas = $('overlay');
  const ctx = canvas.getContext('2d');
  const r = item.result;
  if (!r || !(item.picture || item.overlay)) { clearCanvas(); return; }
  const box = $('view-box');
  let scale;
  if (state.zoom === 'fit') {
    // Fit: the whole image in the space left on screen (never enlarged).
    const maxW = Math.max(240, box.parentElement.clientWidth - 200);
    const maxH = Math.max(200, window.innerHeight - box.getBoundingClientRect().top - 12);
    scale = Math.min(1, maxW / r.width, maxH / r.height);
    box.style.maxHeight = '';
  } else {
    // Native resolution (or 2x) in a scrolling box: drag to pan.
    scale = state.zoom;
    box.style.maxHeight = Math.max(200, window.innerHeight - box.getBoundingClientRect().top - 12) + 'px';
  }
  canvas.dataset.zoom = String(state.zoom);
  canvas.width = Math.max(1, Math.round(r.width * scale));
  canvas.height = Math.max(1, Math.round(r.height * scale));
  // The server's overlay PNG is the image with the heatmap blended in, at
  // the top (centred when the legend is wider), over a legend strip that
  // this page shows as text instead: only the image part is drawn.
  const drawOverlay = () => ctx.drawImage(item.overlay, Math.floor((item.overlay.width - r.width) / 2), 0,
    r.width, r.height, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  if (item.picture) ctx.drawImage(item.picture, 0, 0, canvas.width, canvas.height);
  else drawOverlay();
  if (item.overlay && item.picture) {
    // The slider fades between the plain image and the overlay.
    ctx.globalAlpha = Number($('opacity').value) / 100;
    drawOverlay();
    ctx.globalAlpha = 1;
  }
  if ($('show-regions').checked) {
    const sx = canvas.width / r.width;
    const sy = canvas.height / r.height;
    ctx.lineWidth = 2;
    ctx.font = 'bold 13px system-ui, sans-serif';
    r.regions.forEach((g, n) => {
      const x = g.x * sx, y = g.y * sy, w = Math.max(2, g.w * sx), h = Math.max(2, g.h * sy);
      ctx.strokeStyle = '#000';
      ctx.strokeRect(x - 1, y - 1, w + 2, h + 2);
      ctx.strokeStyle = '#fff';
      ctx.strokeRect(x, y, w, h);
      ctx.fillStyle = '#000';
      ctx.fillRect(x, Math.max(0, y - 16), 18, 16);
      ctx.fillStyle = '#fff';
      ctx.fillText(String(n + 1), x + 4, Math.max(12, y - 4));
    });
  }
  drawDefectMarkers(item, canvas, ctx, canvas.width / r.width, canvas.height / r.height);
}

/** Each typed defect the text layer located: a ring in its own colour at
 *  its `location`, numbered as in the table (toggled there). */
function drawDefectMarkers(item, canvas, ctx, sx, sy) {
  const drawn = [];
  item.defects.forEach((d, n) => {
    if (!d.location || state.hiddenDefects.has(d.text)) return;
    const x = d.location[0] * sx, y = d.location[1] * sy;
    const colour = DEFECT_COLOURS[n % DEFECT_COLOURS.length];
    ctx.lineWidth = 3;
    ctx.strokeStyle = '#000';
    ctx.beginPath(); ctx.arc(x, y, 13, 0, 2 * Math.PI); ctx.stroke();
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(x, y, 12, 0, 2 * Math.PI); ctx.stroke();
    ctx.fillStyle = colour;
    ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill();
    ctx.font = 'bold 12px system-ui, sans-serif';
    // The label goes left of the ring near the right edge, so it stays on the canvas.
    ctx.fillText('D' + (n + 1), x + 40 > canvas.width ? x - 36 : x + 15, y + 4);
    drawn.push({ text: d.text, x: Math.round(x), y: Math.round(y), colour });
  });
  canvas.dataset.markers = JSON.stringify(drawn);
}

// ---------- decisions ----------

async function decide(decision, fromUndo) {
  const item = selectedItem();
  if (!item || item.status !== 'done') return;
  const before = item.decision;
  if (!fromUndo) state.undo.push({ id: item.id, decision: before });
  item.decision = decision;
  if (!item.model) {
    item.decisionNote = 'kept in this page only: decisions are stored with a model file\'s score, and this verdict is ' + (item.batch ? 'the batch\'s own' : 'zero-shot');
  } else if (!state.caps.results_store) {
    item.decisionNote = 'kept in this page only: the server was started without --db';
  } else {
    item.decisionNote = 'saving…';
    render();
    try {
      let row;
      try {
        // The server kept the result it scored: the decision names it, so
        // nothing is uploaded or scored again.
        if (!item.result.result_id) throw new ApiError(404, 'not_found', 'no result id');
        row = await api('/v1/decisions', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ result_id: item.result.result_id, name: item.name, decision }),
        });
      } catch (err) {
        if (err.status !== 404) throw err;
        // Scored before the server restarted: the image goes with it.
        row = await api('/v1/decisions', {
          method: 'POST',
          body: form([['image', item.file], ['model', item.model], ['name', item.name], ['decision', decision]]),
        });
      }
      item.decisionNote = 'saved in the results store as ' + row.path;
    } catch (err) {
      item.decision = before;
      item.decisionNote = 'NOT saved: ' + readable(err);
    }
  }
  render();
}

/** Decides on the selected image and moves on, as the TUI's `a` / `x`. */
function decideAndNext(decision) {
  const item = selectedItem();
  if (!item || item.status !== 'done') return;
  decide(decision);
  move(1);
}

function undo() {
  const last = state.undo.pop();
  if (!last) return;
  // Back to the image the undone decision was on.
  select(last.id);
  decide(last.decision, true);
}

// ---------- downloads ----------

function rows() {
  return ordered().map((i) => ({
    name: i.name,
    status: i.status,
    source: i.model ? 'model ' + i.model : i.batch ? 'batch (musc)' : 'zero-shot ' + i.object,
    score: i.result ? i.result.score : null,
    threshold: i.result ? thresholdShown(i) : null,
    verdict: i.result ? (anomalous(i) ? 'anomalous' : 'ok') : null,
    anomalous_fraction: i.result ? i.result.anomalous_fraction : null,
    regions: i.result ? i.result.regions.length : null,
    decision: i.decision,
    defects: i.defects.map((d) => ({ text: d.text, score: d.score, anomalous: d.verdict, false_alarm_estimate: d.far === undefined ? null : d.far, error: d.error })),
    flagged_by: i.result && i.result.flagged_by ? i.result.flagged_by.join('; ') : null,
    answer: i.result ? i.result.answer : null,
    error: i.error,
  }));
}

function csvCell(v) {
  if (v === null || v === undefined) return '';
  let s = typeof v === 'object' ? JSON.stringify(v) : String(v);
  // A cell a spreadsheet would run as a formula is kept as text.
  if (typeof v === 'string' && /^[=+\-@\t\r]/.test(s)) s = "'" + s;
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function downloadCsv() {
  const data = rows();
  const keys = ['name', 'status', 'source', 'score', 'threshold', 'verdict', 'flagged_by', 'anomalous_fraction', 'regions', 'decision', 'defects', 'answer', 'error'];
  const lines = [keys.join(',')];
  for (const row of data) {
    lines.push(keys.map((k) => (k === 'defects'
      ? csvCell(row.defects.map((d) => d.text + '=' + (d.score === null ? '' : d.score.toFixed(4))).join('; '))
      : csvCell(row[k]))).join(','));
  }
  download('flawscope-results.csv', 'text/csv', lines.join('\r\n') + '\r\n');
}

function downloadJsonl() {
  download('flawscope-results.jsonl', 'application/x-ndjson', rows().map((r) => JSON.stringify(r)).join('\n') + '\n');
}

// ---------- the threshold, moved by a person ----------

/** The threshold a person set for the item's model, or null. */
function personThreshold(item) {
  return item.model && state.thresholds.has(item.model) ? state.thresholds.get(item.model) : null;
}

function thresholdShown(item) {
  const t = personThreshold(item);
  return t === null ? item.result.threshold : t;
}

/** The verdict at the threshold shown: the model's score against it, or
 *  any typed defect the text layer flagged (their thresholds stay). */
function anomalous(item) {
  const t = personThreshold(item);
  if (t === null) return item.result.is_anomalous;
  return item.result.score >= t || (item.result.defects || []).some((d) => d.is_anomalous);
}

function loadCalibration(model) {
  if (state.calibration.has(model)) return;
  state.calibration.set(model, null);
  api('/v1/models/' + encodeURIComponent(model) + '/calibration')
    .then((c) => { state.calibration.set(model, c); renderHistogram(); })
    .catch(() => state.calibration.delete(model));
}

/** The model the histogram shows: the selected image's, else the source's. */
function histogramModel() {
  const item = selectedItem();
  if (item && item.model) return item.model;
  const source = $('source').value;
  return source && source !== ZERO_SHOT && source !== BATCH ? source : null;
}

/** What the threshold `t` costs, from the model's kept calibration (no refit). */
function thresholdCosts(view, t, listNg) {
  const at = view.table[Math.max(0, Math.min(view.table.length - 1, Math.round(t * (view.table.length - 1))))];
  let text = 'At ' + t.toFixed(2) + ': about ' + pct(at.false_alarm_rate) + ' of normal parts flagged; '
    + oneIn(at.false_alarm_upper_bound_95) + ' could be flagged, at worst, judging from ' + view.normal_images + ' normal images';
  if (at.synthetic_missed_alarm_rate !== undefined) text += '; about ' + pct(at.synthetic_missed_alarm_rate) + ' of synthetic defects missed';
  if (at.labelled_missed_alarm_rate !== undefined) text += '; ' + pct(at.labelled_missed_alarm_rate) + ' of the images marked NG at the last refit missed';
  if (listNg.length) text += '; ' + listNg.filter((s) => s < t).length + ' of the ' + listNg.length + ' marked NG in this list missed';
  return text + '.';
}

function oneIn(rate) {
  if (!(rate > 0)) return 'no normal parts';
  if (rate >= 0.5) return Math.round(rate * 10) + ' in 10 normal parts';
  return '1 in ' + Math.round(1 / rate) + ' normal parts';
}

function svg(tag, attrs) {
  // The SVG namespace, read from the page's own <svg> element.
  const e = document.createElementNS($('histogram').namespaceURI, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/** Scores of the list (by decision), the calibration's normal scores and
 *  its labelled NG scores, against the threshold. */
function renderHistogram() {
  const box = $('histo');
  const model = histogramModel();
  const c = model ? state.calibration.get(model) : null;
  const items = state.items.filter((i) => i.status === 'done' && i.model === model);
  if (!model || (!items.length && !(c && c.calibrated))) { box.hidden = true; return; }
  box.hidden = false;
  const view = c && c.calibrated ? c.view : null;
  const t = state.thresholds.has(model) ? state.thresholds.get(model) : (view ? view.threshold : 0.5);
  $('threshold').value = String(t);
  $('threshold').disabled = !view && !items.length;
  $('threshold-value').textContent = t.toFixed(2);
  const bins = 30;
  const count = (scores) => {
    const out = new Array(bins).fill(0);
    for (const s of scores) out[Math.min(bins - 1, Math.max(0, Math.floor(s * bins)))]++;
    return out;
  };
  const series = [
    { cls: 'normal-cal', colour: '#8a919c', counts: count(view ? view.normal : []) },
    { cls: 'labelled-cal', colour: '#e8a0a0', counts: count(view ? view.labelled : []) },
    { cls: 'list', colour: '#0b57d0', counts: count(items.map((i) => i.result.score)) },
  ];
  const g = $('histogram');
  g.textContent = '';
  const W = 300, H = 70, w = W / bins;
  for (const s of series) {
    const top = Math.max(1, ...s.counts);
    s.counts.forEach((n, i) => {
      if (!n) return;
      const h = (H - 4) * n / top;
      g.append(svg('rect', { class: 'bin ' + s.cls, x: i * w + (s.cls === 'list' ? w * 0.35 : 0), y: H - h, width: s.cls === 'list' ? w * 0.5 : w - 1, height: h, fill: s.colour, 'fill-opacity': s.cls === 'list' ? 0.9 : 0.6 }));
    });
  }
  g.append(svg('line', { id: 'threshold-line', x1: t * W, x2: t * W, y1: 0, y2: H, stroke: '#a50e0e', 'stroke-width': 2 }));
  const ng = items.filter((i) => i.decision === 'ng').map((i) => i.result.score);
  $('threshold-costs').textContent = view
    ? thresholdCosts(view, t, ng) + ' (Grey: calibration normals; blue: this list.)'
    : (c && !c.calibrated ? 'No estimates: ' + c.reason + '.' : 'Blue: this list.');
}

// ---------- zoom and pan ----------

function setZoom(zoom) {
  state.zoom = zoom;
  const item = selectedItem();
  if (item) draw(item);
}

function cycleZoom() {
  setZoom(state.zoom === 'fit' ? 1 : state.zoom === 1 ? 2 : 'fit');
}

function wirePan() {
  const box = $('view-box');
  let from = null;
  box.addEventListener('pointerdown', (e) => {
    from = { x: e.clientX, y: e.clientY, left: box.scrollLeft, top: box.scrollTop };
    box.setPointerCapture(e.pointerId);
  });
  box.addEventListener('pointermove', (e) => {
    if (!from) return;
    box.scrollLeft = from.left - (e.clientX - from.x);
    box.scrollTop = from.top - (e.clientY - from.y);
  });
  const end = () => { from = null; };
  box.addEventListener('pointerup', end);
  box.addEventListener('pointercancel', end);
}

// ---------- the report ----------

async function downloadReport() {
  if (!state.caps || !state.caps.results_store) {
    $('list-summary').textContent = 'No report: the server was started without --db, so it keeps no results.';
    return;
  }
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const response = await fetch('/v1/report', { headers: token ? { Authorization: 'Bearer ' + token } : {} });
    if (response.status === 401) { await askToken('This server needs an access token.'); continue; }
    if (!response.ok) { $('list-summary').textContent = 'The report failed: HTTP ' + response.status; return; }
    download('flawscope-report.html', 'text/html', await response.text());
    return;
  }
}

// ---------- controls and keys ----------

function typing(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName)
    && !(target.tagName === 'INPUT' && /^(range|checkbox|file|button)$/.test(target.type)));
}

function wireControls() {
  $('files').addEventListener('change', (e) => { addFiles([...e.target.files]); e.target.value = ''; });
  // Files dropped anywhere on the page count (once: the listener is on the
  // document only, where every drop ends up).
  const drop = $('drop');
  document.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  document.addEventListener('dragleave', () => drop.classList.remove('over'));
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer) dropped(e.dataTransfer);
  });
  document.addEventListener('paste', (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  $('source').addEventListener('change', () => { updateClipNote(); renderHistogram(); });
  $('object').addEventListener('input', updateClipNote);
  $('defects').addEventListener('input', updateClipNote);
  $('opacity').addEventListener('input', () => {
    $('opacity-value').textContent = $('opacity').value + '%';
    const item = selectedItem();
    if (item) draw(item);
  });
  $('show-regions').addEventListener('change', () => { const item = selectedItem(); if (item) draw(item); });
  $('mark-ok').addEventListener('click', () => decideAndNext('ok'));
  $('mark-ng').addEventListener('click', () => decideAndNext('ng'));
  $('download-report').addEventListener('click', downloadReport);
  $('folder').addEventListener('change', (e) => { addFiles([...e.target.files]); e.target.value = ''; });
  $('threshold').addEventListener('input', () => {
    const model = histogramModel();
    if (!model) return;
    state.thresholds.set(model, Number($('threshold').value));
    render();
  });
  $('zoom-fit').addEventListener('click', () => setZoom('fit'));
  $('zoom-1').addEventListener('click', () => setZoom(1));
  $('zoom-2').addEventListener('click', () => setZoom(2));
  wirePan();
  $('mark-undo').addEventListener('click', undo);
  $('download-csv').addEventListener('click', downloadCsv);
  $('download-jsonl').addEventListener('click', downloadJsonl);
  $('clear').addEventListener('click', () => {
    if (state.running) {
      $('list-summary').textContent = 'Images are still being scored; clear the list when they are done.';
      return;
    }
    for (const i of state.items) if (i.thumb) URL.revokeObjectURL(i.thumb);
    state.items = [];
    state.undo = [];
    state.selected = null;
    render();
  });
  $('token-dialog').addEventListener('cancel', (e) => e.preventDefault());
  window.addEventListener('resize', () => { const item = selectedItem(); if (item) draw(item); });
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target) || $('token-dialog').open) return;
    const keys = {
      j: () => move(1), ArrowDown: () => move(1), k: () => move(-1), ArrowUp: () => move(-1),
      g: () => move(-Infinity), Home: () => move(-Infinity), G: () => move(Infinity), End: () => move(Infinity),
      PageDown: () => move(10), PageUp: () => move(-10),
      a: () => decideAndNext('ok'), x: () => decideAndNext('ng'), u: undo, z: cycleZoom,
    };
    const action = keys[e.key];
    if (!action) return;
    // Arrows keep moving the slider when it has focus.
    if (e.target instanceof HTMLInputElement && e.target.type === 'range' && e.key.startsWith('Arrow')) return;
    e.preventDefault();
    action();
  });
}

document.addEventListener('DOMContentLoaded', start);

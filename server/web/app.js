// flawscope web page. It uses the server's own /v1 API (the same requests
// curl would send) and keeps everything in this tab: nothing is fetched from
// anywhere else, and the token lives in sessionStorage only.
'use strict';

const TOKEN_KEY = 'flawscope.token';
const ZERO_SHOT = '\u0000zero-shot';
const PARALLEL = 2; // requests in flight at once; more would only queue on the server
const RETRIES_WHEN_BUSY = 3;

const $ = (id) => document.getElementById(id);
const state = {
  items: [],
  selected: null,
  models: new Map(),
  caps: null,
  undo: [],
  nextId: 1,
  running: 0,
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
  const defects = typedDefects();
  for (const file of files) {
    const item = {
      id: state.nextId++,
      file,
      name: file.name || 'pasted-image-' + state.nextId + '.png',
      model: source === ZERO_SHOT ? null : source,
      // The operating point asked for (a false-alarm limit), if any: the
      // server moves the model's threshold for this request only.
      maxFar: source === ZERO_SHOT ? '' : $('max-far').value,
      object,
      defects: defects.map((text) => ({ text, score: null, verdict: null, error: null })),
      status: 'queued',
      result: null,
      error: null,
      decision: 'none',
      decisionNote: '',
      overlay: null,
      picture: null,
    };
    state.items.push(item);
    if (state.selected === null) state.selected = item.id;
  }
  render();
  pump();
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
  for (const [k, v] of fields) data.append(k, v);
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
    span.classList.add(item.result.is_anomalous ? 'anomalous' : 'normal');
    span.textContent = item.result.is_anomalous ? 'Anomalous' : 'Normal';
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
    if (item.status === 'done') {
      li.dataset.score = String(item.result.score);
      li.dataset.verdict = item.result.is_anomalous ? 'anomalous' : 'normal';
    }
    li.dataset.decision = item.decision;
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = item.model ? item.name : item.name + ' (zero-shot)';
    const scoreCell = document.createElement('span');
    scoreCell.className = 'score';
    scoreCell.textContent = item.status === 'done' ? item.result.score.toFixed(3) : '';
    const mark = document.createElement('span');
    mark.className = 'mark ' + item.decision;
    mark.textContent = markText(item.decision);
    mark.title = 'decision';
    li.append(name, verdictBadge(item), scoreCell, mark);
    li.addEventListener('click', () => { select(item.id); list.focus(); });
    list.append(li);
  }
  const sel = selectedItem();
  if (sel) list.setAttribute('aria-activedescendant', 'item-' + sel.id); else list.removeAttribute('aria-activedescendant');
  const done = state.items.filter((i) => i.status === 'done');
  const failed = state.items.filter((i) => i.status === 'error').length;
  const pending = state.items.length - done.length - failed;
  $('list-summary').textContent = state.items.length
    ? done.length + ' scored (' + done.filter((i) => i.result.is_anomalous).length + ' anomalous)'
      + (pending ? ', ' + pending + ' waiting' : '') + (failed ? ', ' + failed + ' could not be scored' : '')
    : 'No images yet.';
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
  $('detail-title').textContent = item.name;
  err.hidden = item.status !== 'error';
  err.textContent = item.error || '';
  if (item.status === 'error') {
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.textContent = 'Retry';
    retry.addEventListener('click', () => { item.status = 'queued'; item.error = null; render(); pump(); });
    err.append(' ', retry);
  }
  const r = item.result;
  const source = item.model ? 'model ' + item.model : 'zero-shot CLIP (' + item.object + ')';
  $('detail-verdict').textContent = r
    ? (r.is_anomalous ? 'Anomalous' : 'Normal') + ' · score ' + r.score.toFixed(3) + ' (threshold ' + r.threshold.toFixed(2) + ', 0–1) · ' + source
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
  for (const d of item.defects) {
    const row = body.insertRow();
    row.insertCell().textContent = d.text;
    const cell = row.insertCell();
    cell.textContent = d.error ? d.error : d.score === null ? 'scoring…' : d.score.toFixed(3);
    if (d.score !== null) cell.dataset.score = String(d.score);
    row.insertCell().textContent = d.verdict === null || d.verdict === undefined ? '' : d.verdict ? 'Anomalous' : 'Normal';
    row.insertCell().textContent = d.far === undefined
      ? 'not known (not calibrated on normal images)'
      : 'about ' + pct(d.far) + ', at most ' + pct(d.farBound) + ' (95% bound, ' + d.normalImages + ' normal images)';
  }
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
  const box = canvas.parentElement.clientWidth - 220;
  const maxW = Math.max(240, Math.min(640, box));
  const maxH = Math.max(200, Math.min(420, window.innerHeight - 330));
  const scale = Math.min(maxW / r.width, maxH / r.height);
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
}

// ---------- decisions ----------

async function decide(decision, fromUndo) {
  const item = selectedItem();
  if (!item || item.status !== 'done') return;
  const before = item.decision;
  if (!fromUndo) state.undo.push({ id: item.id, decision: before });
  item.decision = decision;
  if (!item.model) {
    item.decisionNote = 'kept in this page only: decisions are stored with a model file\'s score, and this verdict is zero-shot';
  } else if (!state.caps.results_store) {
    item.decisionNote = 'kept in this page only: the server was started without --db';
  } else {
    item.decisionNote = 'saving…';
    render();
    try {
      const row = await api('/v1/decisions', {
        method: 'POST',
        body: form([['image', item.file], ['model', item.model], ['name', item.name], ['decision', decision]]),
      });
      item.decisionNote = 'saved in the results store as ' + row.path;
    } catch (err) {
      item.decision = before;
      item.decisionNote = 'NOT saved: ' + readable(err);
    }
  }
  render();
}

function undo() {
  const last = state.undo.pop();
  if (!last) return;
  select(last.id);
  decide(last.decision, true);
}

// ---------- downloads ----------

function rows() {
  return ordered().map((i) => ({
    name: i.name,
    status: i.status,
    source: i.model ? 'model ' + i.model : 'zero-shot ' + i.object,
    score: i.result ? i.result.score : null,
    threshold: i.result ? i.result.threshold : null,
    verdict: i.result ? (i.result.is_anomalous ? 'anomalous' : 'ok') : null,
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
    addFiles([...(e.dataTransfer ? e.dataTransfer.files : [])]);
  });
  document.addEventListener('paste', (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  $('source').addEventListener('change', updateClipNote);
  $('object').addEventListener('input', updateClipNote);
  $('defects').addEventListener('input', updateClipNote);
  $('opacity').addEventListener('input', () => {
    $('opacity-value').textContent = $('opacity').value + '%';
    const item = selectedItem();
    if (item) draw(item);
  });
  $('show-regions').addEventListener('change', () => { const item = selectedItem(); if (item) draw(item); });
  $('mark-ok').addEventListener('click', () => decide('ok'));
  $('mark-ng').addEventListener('click', () => decide('ng'));
  $('mark-undo').addEventListener('click', undo);
  $('download-csv').addEventListener('click', downloadCsv);
  $('download-jsonl').addEventListener('click', downloadJsonl);
  $('clear').addEventListener('click', () => {
    if (state.running) {
      $('list-summary').textContent = 'Images are still being scored; clear the list when they are done.';
      return;
    }
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
      a: () => decide('ok'), x: () => decide('ng'), u: undo,
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

// mmgpt's chat page (page.html): plain JavaScript, no libraries, talking only to serve.py's own
// POST /v1/chat/completions with stream: true.
//
// The conversation lives here, in memory: `convo` is the list of messages the server is sent, whole, on every
// question (OpenAI's API is stateless; serve.py reuses the cache of the prefix it already holds, so a new round
// costs only its new tokens). A user message carries its pictures: each opens a `### Image:` block before that
// message's question, as chat.py's /image does. An answer that was stopped stays in the conversation as far as
// it was written (as chat.py keeps it). A question the server refused (a picture it cannot read, too long, busy)
// is taken out of the conversation and shown dimmed with the server's message under it.
'use strict';

const $ = (id) => document.getElementById(id);
const els = {
  log: $('log'), empty: $('empty'), composer: $('composer'), input: $('input'), pending: $('pending'),
  file: $('file'), attach: $('attach'), pick: $('pick'), send: $('send'), stop: $('stop'), clear: $('clear'),
  model: $('model-name'), prompt: $('prompt'), copyPrompt: $('copy-prompt'), panel: $('panel'), scrim: $('scrim'),
  toggle: $('settings-toggle'), closePanel: $('close-panel'), drop: $('drop'), system: $('system'),
  apiKey: $('api-key'), greedy: $('greedy'), seed: $('seed'), resetSettings: $('reset-settings'),
};

const convo = [];        // {role: 'user', text, pictures: [{url, name, shown}]} | {role: 'assistant', text, ...}
let pending = [];        // pictures attached for the next question
let running = null;      // {controller, reply} while an answer streams
let modelId = null;      // from GET /v1/models (the server refuses a name that is not its model's)

// ---------------------------------------------------------------------------------------------------------------
// Settings: the decoding knobs (defaults: chat.py's, which are MultiModal-GPT's demo's without beam search),
// kept in localStorage so that they survive a reload. The API key stays for the tab's session only.

const DEFAULTS = { greedy: false, maxTokens: 256, temperature: 1.0, topP: 1.0, topK: 20, seed: '', system: '' };
const SETTINGS_KEY = 'mmgpt.page.settings';
// Each numeric knob is a number box and a slider kept in step.
const KNOBS = { maxTokens: 'max-tokens', temperature: 'temperature', topP: 'top-p', topK: 'top-k' };

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY)) || {}; } catch (e) { /* none, or unreadable */ }
  applySettings({ ...DEFAULTS, ...saved });
  els.apiKey.value = sessionStorage.getItem('mmgpt.page.key') || '';
}

function applySettings(s) {
  els.greedy.checked = !!s.greedy;
  for (const [name, id] of Object.entries(KNOBS)) $(id).value = $(id + '-range').value = s[name];
  els.seed.value = s.seed;
  els.system.value = s.system;
  showSamplingKnobs();
}

function settings() {
  const number = (id, fallback) => {
    const box = $(id), v = Number(box.value);
    if (box.value === '' || !Number.isFinite(v)) return fallback;
    return Math.min(Math.max(v, Number(box.min)), Number(box.max));
  };
  return {
    greedy: els.greedy.checked,
    maxTokens: Math.round(number('max-tokens', DEFAULTS.maxTokens)),
    temperature: number('temperature', DEFAULTS.temperature),
    topP: number('top-p', DEFAULTS.topP),
    topK: Math.round(number('top-k', DEFAULTS.topK)),
    seed: els.seed.value.trim() === '' ? '' : Math.max(0, Math.round(Number(els.seed.value) || 0)),
    system: els.system.value,
  };
}

function saveSettings() {
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings())); } catch (e) { /* storage off */ }
}

function showSamplingKnobs() {   // greedy makes temperature, top-p, top-k and the seed moot
  for (const field of document.querySelectorAll('.sampling')) {
    field.classList.toggle('off', els.greedy.checked);
    for (const input of field.querySelectorAll('input')) input.disabled = els.greedy.checked;
  }
}

for (const id of Object.values(KNOBS)) {
  $(id).addEventListener('input', () => { $(id + '-range').value = $(id).value; saveSettings(); });
  $(id + '-range').addEventListener('input', () => { $(id).value = $(id + '-range').value; saveSettings(); });
}
els.greedy.addEventListener('change', () => { showSamplingKnobs(); saveSettings(); });
els.seed.addEventListener('input', saveSettings);
els.system.addEventListener('input', saveSettings);
let keyTimer = null;
els.apiKey.addEventListener('input', () => {
  sessionStorage.setItem('mmgpt.page.key', els.apiKey.value);
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadModel, 400);    // with the right key, the model's name can be read now
});
els.resetSettings.addEventListener('click', () => { applySettings(DEFAULTS); limitMaxTokens(); saveSettings(); });

// The model's name, and its context length where the server tells it (vLLM's max_model_len): max new tokens
// is then kept within it.
let contextLength = null;

async function loadModel() {
  try {
    const res = await fetch('/v1/models', { headers: authHeaders() });
    if (!res.ok) throw new Error(`${res.status}`);
    const model = (await res.json()).data[0];
    modelId = model.id;
    els.model.textContent = model.id;
    contextLength = model.max_model_len || model.context_length || null;
    limitMaxTokens();
  } catch (e) {
    els.model.textContent = e.message === '401' ? 'API key needed' : 'model unknown';
    if (e.message === '401') askForKey();
  }
}

function limitMaxTokens() {
  if (!contextLength) return;
  for (const id of ['max-tokens', 'max-tokens-range']) $(id).max = contextLength;
  if (Number($('max-tokens').value) > contextLength / 2) {   // as chat.py: an answer takes at most half the context
    $('max-tokens').value = $('max-tokens-range').value = Math.floor(contextLength / 2);
  }
}

function askForKey() {   // the key's box, in view
  els.apiKey.closest('details').open = true;
  if (drawer()) openPanel();
}

function authHeaders() {
  const key = els.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------------------------------------------------------
// Pictures: picked, dropped or pasted. Each is sent as a data: URL of the file's own bytes, so the server reads
// exactly the file. Only a very large one (a phone's photo) is scaled down here first, to keep the requests
// small: the model sees 224 x 224 pixels in any case. A file the browser cannot show still goes to the server,
// which says whether it can read it.

const MAX_SIDE = 2048, MAX_BYTES = 4 << 20, SCALED_SIDE = 1024;

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function decode(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('cannot be shown'));
    img.src = url;
  });
}

async function readPicture(file) {
  const name = file.name || 'pasted picture';
  let url = await readAsDataURL(file);
  if (!file.type.startsWith('image/')) {   // e.g. no type known: say it is a picture, the server judges
    url = 'data:image/png;base64,' + url.slice(url.indexOf(',') + 1);
  }
  let img;
  try { img = await decode(url); } catch (e) { return { url, name, shown: false }; }
  const side = Math.max(img.naturalWidth, img.naturalHeight);
  if (side > MAX_SIDE || file.size > MAX_BYTES) {
    const scale = Math.min(1, SCALED_SIDE / side);
    const canvas = document.createElement('canvas');
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#fff';    // transparency on white, as the server composites it
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    url = canvas.toDataURL('image/jpeg', 0.92);
  }
  return { url, name, shown: true };
}

async function attach(files) {
  const pictures = [...files].filter((f) => f.type === '' || f.type.startsWith('image/'));
  for (const f of files) {
    if (!pictures.includes(f)) notice(`${f.name} is not a picture (${f.type}): not attached.`);
  }
  for (const f of pictures) {
    try { pending.push(await readPicture(f)); } catch (e) { notice(`${f.name} could not be read: ${e.message}`); }
  }
  renderPending();
  els.input.focus();
}

function pictureElement(picture) {
  if (!picture.shown) {   // the browser cannot show it: a tile with its name
    const tile = document.createElement('div');
    tile.className = 'nopic';
    tile.textContent = picture.name;
    tile.title = picture.name;
    return tile;
  }
  const img = document.createElement('img');
  img.src = picture.url;
  img.alt = img.title = picture.name;
  return img;
}

function renderPending() {
  els.pending.replaceChildren(...pending.map((picture, i) => {
    const chip = document.createElement('div');
    chip.className = 'chip';
    chip.append(pictureElement(picture));
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.title = remove.ariaLabel = `Remove ${picture.name}`;
    remove.innerHTML = '<svg viewBox="0 0 24 24"><path d="M6 6l12 12M18 6L6 18"/></svg>';
    remove.addEventListener('click', () => { pending.splice(i, 1); renderPending(); els.input.focus(); });
    chip.append(remove);
    return chip;
  }));
  els.input.placeholder = pending.length ? 'Ask about the picture…' : convo.length ? 'Ask more…' : 'Ask about the picture…';
}

els.attach.addEventListener('click', () => els.file.click());
els.pick.addEventListener('click', () => els.file.click());
els.file.addEventListener('change', () => { attach(els.file.files); els.file.value = ''; });
document.addEventListener('paste', (e) => {
  const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith('image/'));
  if (files.length) { e.preventDefault(); attach(files); }
});
// Dragging: the overlay shows while files are over the window (enter/leave fire for every child: count them).
let dragDepth = 0;
const carriesFiles = (e) => [...(e.dataTransfer?.types || [])].includes('Files');
window.addEventListener('dragenter', (e) => { if (carriesFiles(e)) { dragDepth++; els.drop.hidden = false; } });
window.addEventListener('dragleave', (e) => { if (carriesFiles(e) && --dragDepth <= 0) { dragDepth = 0; els.drop.hidden = true; } });
window.addEventListener('dragover', (e) => { if (carriesFiles(e)) e.preventDefault(); });
window.addEventListener('drop', (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  els.drop.hidden = true;
  attach(e.dataTransfer.files);
});

// ---------------------------------------------------------------------------------------------------------------
// The conversation on the page

const ICONS = {
  regenerate: '<svg viewBox="0 0 24 24"><path d="M20 11a8 8 0 1 0-2.3 5.7"/><path d="M20 4v7h-7"/></svg>',
  input: '<svg viewBox="0 0 24 24"><path d="M8 7l-5 5 5 5M16 7l5 5-5 5"/></svg>',
  copy: '<svg viewBox="0 0 24 24"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V6a2 2 0 0 1 2-2h8"/></svg>',
};

// Follow the end of the conversation while it grows, unless the reader has scrolled up.
function atEnd() { return els.log.scrollHeight - els.log.scrollTop - els.log.clientHeight < 80; }
function toEnd() { els.log.scrollTop = els.log.scrollHeight; }
function add(element) {
  const follow = atEnd();
  els.empty.hidden = true;
  els.log.append(element);
  if (follow || element.classList.contains('user')) toEnd();
  return element;
}

function renderUser(message) {
  const row = document.createElement('div');
  row.className = 'msg user';
  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  if (message.pictures.length) {
    const pictures = document.createElement('div');
    pictures.className = 'pictures';
    pictures.append(...message.pictures.map(pictureElement));
    bubble.append(pictures);
  }
  const text = document.createElement('div');
  text.className = 'text';
  text.textContent = message.text;
  bubble.append(text);
  row.append(bubble);
  message.el = add(row);
}

function renderAssistant(reply) {
  const row = document.createElement('div');
  row.className = 'msg assistant streaming';
  row.innerHTML = '<div class="avatar" aria-hidden="true"></div><div class="bubble"><div class="text"></div>'
                + '<div class="meta"><div class="actions"></div><span class="status" aria-live="polite"></span></div></div>';
  reply.el = add(row);
  reply.textEl = row.querySelector('.text');
}

function button(html, label, onClick, cls = 'ghost') {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = cls;
  b.innerHTML = html;
  b.title = label;
  b.addEventListener('click', onClick);
  return b;
}

// Under a finished answer: how it ended, its length and speed, and what can be done with it.
function finishAssistant(reply) {
  reply.el.classList.remove('streaming');
  const n = reply.usage?.completion_tokens;
  const seconds = reply.doneAt && reply.firstAt ? (reply.doneAt - reply.firstAt) / 1000 : 0;
  const words = [];
  if (reply.finish === 'stopped') words.push('stopped');
  else if (reply.finish === 'length') words.push(reply.fitted ? 'cut at the end of the context' : 'cut at max new tokens');
  else if (reply.fitted) words.push('max new tokens lowered to the room left in the context');
  if (n !== undefined) words.push(`${n} token${n === 1 ? '' : 's'}`);
  if (n > 1 && seconds > 0) words.push(`${((n - 1) / seconds).toFixed(1)} tokens/s`);
  reply.el.querySelector('.status').textContent = words.join(' · ');
  const actions = reply.el.querySelector('.actions');
  actions.replaceChildren(
    button(`${ICONS.regenerate}<span>Regenerate</span>`, 'Write this answer again', () => regenerate(reply),
           'ghost regen'),
    button(`${ICONS.input}<span>Input</span>`, 'Show the exact text the model was given', () => showInput(reply.prompt)),
    button(`${ICONS.copy}<span>Copy</span>`, 'Copy the answer', () => copy(reply.text)),
  );
  refreshActions();
}

// Only the last answer can be regenerated, and nothing can while an answer streams.
function refreshActions() {
  const last = convo[convo.length - 1];
  for (const b of els.log.querySelectorAll('button.regen')) {
    b.hidden = !(last && last.role === 'assistant' && b.closest('.msg') === last.el);
    b.disabled = !!running;
  }
}

function notice(message, retry = null, after = null) {
  const line = document.createElement('div');
  line.className = 'notice error';
  line.setAttribute('role', 'alert');
  line.innerHTML = '<svg viewBox="0 0 24 24"><circle cx="12" cy="12" r="9"/><path d="M12 8v5M12 16.5v.5"/></svg>';
  const say = document.createElement('div');
  say.className = 'say';
  say.textContent = message;
  line.append(say);
  if (retry) {
    line.append(button('Retry', 'Send it again', () => { if (!running) { line.remove(); retry(); } }, ''));
  }
  if (after && after.isConnected) { after.after(line); if (atEnd()) toEnd(); } else add(line);
  return line;
}

// The exact text the model was given (MultiModal-GPT's demo: "Actual inputs for Model"), its <image> and </s>
// tokens and the template's headings marked. The text itself is unchanged: the element's textContent is it.
function showPrompt(prompt) {
  els.prompt.replaceChildren();
  if (!prompt) return;
  for (const piece of prompt.split(/(<image>|<\/s>|### [A-Za-z]+:)/)) {
    if (!piece) continue;
    if (piece === '<image>' || piece === '</s>' || piece.startsWith('### ')) {
      const mark = document.createElement('span');
      mark.className = piece.startsWith('### ') ? 'head' : 'tok';
      mark.textContent = piece;
      els.prompt.append(mark);
    } else {
      els.prompt.append(piece);
    }
  }
  els.prompt.scrollTop = els.prompt.scrollHeight;    // the end: the question just asked
}

async function copy(text) {
  try { await navigator.clipboard.writeText(text); } catch (e) { /* not allowed here (http, not localhost) */ }
}
els.copyPrompt.addEventListener('click', () => copy(els.prompt.textContent));

// ---------------------------------------------------------------------------------------------------------------
// Asking, and streaming the answer

// The request for the conversation as it stands, and which picture each image_url part is (the server names a
// picture it cannot read by its place: messages[i].content[j].image_url).
function request() {
  const s = settings();
  const messages = [], places = {};
  if (s.system.trim()) messages.push({ role: 'system', content: s.system });
  for (const m of convo) {
    if (m.role === 'assistant') messages.push({ role: 'assistant', content: m.text });
    else if (!m.pictures.length) messages.push({ role: 'user', content: m.text });
    else {
      m.pictures.forEach((p, j) => { places[`messages[${messages.length}].content[${j}].image_url`] = p; });
      messages.push({ role: 'user', content: [
        ...m.pictures.map((p) => ({ type: 'image_url', image_url: { url: p.url } })),
        { type: 'text', text: m.text },
      ] });
    }
  }
  const body = { messages, stream: true, stream_options: { include_usage: true }, return_prompt: true,
                 max_tokens: s.maxTokens };
  if (modelId) body.model = modelId;
  if (s.greedy) body.temperature = 0;
  else {
    Object.assign(body, { temperature: s.temperature, top_p: s.topP, top_k: s.topK });
    if (s.seed !== '') body.seed = s.seed;
  }
  return { body, places };
}

class ServerError extends Error {
  constructor(status, error, retryAfter) {
    super(error?.message || `HTTP ${status}`);
    Object.assign(this, { status, error: error || {}, retryAfter });
  }
}

// POST the conversation and read the server-sent events: on(chunk) for every `data:` object until [DONE].
async function stream(body, signal, on) {
  const res = await fetch('/v1/chat/completions', {
    method: 'POST', signal, body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
  });
  if (!res.ok) {
    let error = null;
    try { error = (await res.json()).error; } catch (e) { /* not JSON */ }
    throw new ServerError(res.status, error, res.headers.get('Retry-After'));
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {    // one event per blank-line-terminated block
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(200, chunk.error, null);
      on(chunk);
    }
  }
  throw new ServerError(0, { message: 'the server closed the connection before the answer was complete' });
}

// What the reader is told when the server refuses or fails: the server's own message, with what to do.
function explain(e, places = {}) {
  if (e instanceof ServerError) {
    const param = e.error.param || '';
    let message = e.error.message || e.message;
    if (param && message.startsWith(param + ': ')) message = message.slice(param.length + 2);   // said below
    if (e.status === 429) return `The server is busy: ${message}`;      // with a Retry button
    if (e.error.code === 'context_length_exceeded') {
      return `Too long for the model: ${message}. Clear the conversation, or ask a shorter question.`;
    }
    if (e.status === 401) return `The server wants an API key (Settings): ${message}`;
    if (e.status === 413) return `Too large for the server (a big picture?): ${message}`;
    if (places[param]) return `The picture ${places[param].name} could not be used: ${message}`;
    if (param.includes('image_url')) return `A picture could not be used: ${message}`;
    if (e.status === 0) return `The answer broke off: ${message}.`;
    if (e.status === 200) return `The server failed while answering: ${message}`;
    return `The server refused the question (${e.status}): ${message}`;
  }
  if (e instanceof TypeError) return `Cannot reach the server: ${e.message}`;   // what fetch throws then
  return `The answer could not be read: ${e.message}`;
}

async function ask() {
  const text = els.input.value.trim();
  if (running || !text) return;
  const message = { role: 'user', text, pictures: pending };
  pending = [];
  renderPending();
  els.input.value = '';
  fitInput();
  convo.push(message);
  renderUser(message);
  await answer();
}

// Answer the conversation as it stands (it ends with a user message).
async function answer() {
  const reply = { role: 'assistant', text: '', finish: null, prompt: null, usage: null };
  const question = convo[convo.length - 1];
  renderAssistant(reply);
  const controller = new AbortController();
  running = { controller, reply };
  setRunning(true);
  const { body, places } = request();
  convo.push(reply);
  const read = (chunk) => {
    if (chunk.prompt !== undefined) { reply.prompt = chunk.prompt; showPrompt(chunk.prompt); }
    if (chunk.usage) reply.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (choice.delta && choice.delta.content) {
      reply.firstAt = reply.firstAt || performance.now();
      const follow = atEnd();
      reply.text += choice.delta.content;
      reply.textEl.textContent = reply.text;
      if (follow) toEnd();
    }
    if (choice.finish_reason) reply.finish = choice.finish_reason;
  };
  try {
    try {
      await stream(body, controller.signal, read);
    } catch (e) {
      // The conversation fits the context but not with max new tokens more: answer in the room that is left
      // (the server's default without max_tokens) rather than not at all. If the conversation alone does not
      // fit, this fails too, and says so.
      if (!(e instanceof ServerError && e.error.code === 'context_length_exceeded' && body.max_tokens)) throw e;
      delete body.max_tokens;
      reply.fitted = true;
      await stream(body, controller.signal, read);
    }
    // A server that caps max new tokens to the room left (serve.py's default) cuts the answer short of them.
    if (reply.finish === 'length' && reply.usage?.completion_tokens < body.max_tokens) reply.fitted = true;
  } catch (e) {
    if (e.name === 'AbortError') reply.finish = 'stopped';
    else if (reply.prompt !== null && reply.text) {   // it broke off mid-answer: keep what was written
      reply.finish = 'stopped';
      notice(explain(e, places), null, reply.el);
    } else {                                         // refused: the question leaves the conversation
      convo.splice(convo.length - 2, 2);
      reply.el.remove();
      question.el.classList.add('failed');
      question.el.title = 'Not in the conversation: the server did not answer it';
      const retry = [429, 0, 500, 502, 503, 401].includes(e.status) || !(e instanceof ServerError)
        ? () => {
          question.el.classList.remove('failed');
          convo.push(question);
          els.log.append(question.el);
          answer();
        }
        : null;
      notice(explain(e, places), retry, question.el);
      if (e.status === 401) askForKey();
      finishRun();
      return;
    }
  }
  reply.doneAt = performance.now();
  finishRun();
  finishAssistant(reply);
}

function finishRun() {
  running = null;
  setRunning(false);
  refreshActions();
}

function setRunning(on) {
  els.send.hidden = on;
  els.stop.hidden = !on;
  document.body.classList.toggle('running', on);
  if (!on && document.activeElement === document.body) els.input.focus();
}

function stop() { if (running) running.controller.abort(); }

async function regenerate(reply) {
  if (running || convo[convo.length - 1] !== reply) return;
  convo.pop();
  reply.el.remove();
  await answer();
}

function clearConversation() {
  stop();
  convo.length = 0;
  pending = [];
  renderPending();
  for (const el of [...els.log.children]) if (el !== els.empty) el.remove();
  els.empty.hidden = false;
  showPrompt(null);
  els.input.focus();
}

// ---------------------------------------------------------------------------------------------------------------
// Keyboard and buttons

function fitInput() {   // the question box grows with its text, up to its max-height; Send needs a question
  els.input.style.height = 'auto';
  els.input.style.height = `${els.input.scrollHeight}px`;
  els.send.disabled = !els.input.value.trim();
}

els.input.addEventListener('input', fitInput);
els.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {   // Shift+Enter: a new line
    e.preventDefault();
    ask();
  }
});
// Escape closes the settings drawer (narrow screens), else stops the answer being written.
const drawer = () => getComputedStyle(els.panel).position === 'fixed';
document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape') return;
  if (drawer() && els.panel.classList.contains('open')) closePanel();
  else stop();
});
els.composer.addEventListener('submit', (e) => { e.preventDefault(); ask(); });
els.stop.addEventListener('click', stop);
els.clear.addEventListener('click', clearConversation);

function openPanel() {
  els.panel.classList.add('open');
  els.scrim.classList.add('open');
  els.toggle.setAttribute('aria-expanded', 'true');
}
function showInput(prompt) {   // an answer's "Input": its model input, in view
  showPrompt(prompt);
  if (drawer()) openPanel();
  els.prompt.scrollIntoView({ block: 'nearest' });
}
function closePanel() {
  els.panel.classList.remove('open');
  els.scrim.classList.remove('open');
  els.toggle.setAttribute('aria-expanded', 'false');
}
els.toggle.addEventListener('click', () => (els.panel.classList.contains('open') ? closePanel() : openPanel()));
els.closePanel.addEventListener('click', closePanel);
els.scrim.addEventListener('click', closePanel);

loadSettings();
loadModel();
renderPending();
fitInput();
els.input.focus();

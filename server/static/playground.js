// adsa-serve playground. Only the public HTTP API is used (GET /v1/models, POST /v1/generate with
// stream: true, GET /metrics), so what the page shows is what any client gets.
//
// Streaming goes over fetch + ReadableStream rather than EventSource, which can neither POST nor send
// an Authorization header. SSE framing is done by the vendored eventsource-parser (MIT, see
// vendor/eventsource-parser/README.md).
import { EventSourceParserStream } from './vendor/eventsource-parser/stream.js';

const KEY_STORAGE = 'adsa-serve.api-key';
const METRICS_EVERY_MS = 3000;
const MAX_LISTED_CLASSES = 60;
const IMAGENET_CLASSES = 1000;

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat('en');

const state = {
  card: null, // the served model, GET /v1/models
  classes: [], // [{id, name, emoji?}]
  classId: 0,
  busy: false,
  run: null, // the AbortController of the run in progress: Cancel and Escape abort it
};

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(status, message, kind = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.kind = kind;
    this.retryAfter = retryAfter;
  }
}

// The HTTP status an error code stands for (docs/API.md, "Errors"), for an error event after a stream started,
// which has none of its own
const STATUS_OF_CODE = { deadline_exceeded: 504, engine_dead: 503, draining: 503, not_ready: 503 };

// Every error of this server is {"error": {"message", "type", "param", "code"}} (docs/API.md, "Errors"); a flat
// {"error": message} (a proxy's, an older server's) reads too. (Exported for the tests.)
export function errorFromBody(status, body, retryAfter = null) {
  const e = body?.error;
  const detailed = e && typeof e === 'object';
  const message = (detailed ? e.message : e) || `HTTP ${status}`;
  const kind = (detailed ? e.type ?? e.code : body?.type) ?? null;
  const code = (detailed ? e.code : body?.code ?? body?.type) ?? null;
  return new ApiError(status ?? STATUS_OF_CODE[code] ?? null, String(message), kind, retryAfter);
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set('Authorization', `Bearer ${key}`);
  let res;
  try {
    res = await fetch(path, { ...init, headers });
  } catch (e) {
    if (e.name === 'AbortError') throw e; // cancelled by the user, not a network failure
    throw new ApiError(0, `could not reach the server (${e.message})`);
  }
  if (!res.ok) {
    const body = await res.json().catch(() => null);
    throw errorFromBody(res.status, body, res.headers.get('Retry-After'));
  }
  return res;
}

// Yields {event, data} for each server-sent event of one POST /v1/generate with stream: true. Aborting `signal`
// closes the connection, and the server cancels the images (docs/API.md).
async function* generateEvents(body, signal) {
  const res = await api('/v1/generate', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream()).getReader();
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, `the connection to the server broke during the stream (${e.message})`);
    }
    if (chunk.done) return;
    yield { event: chunk.value.event, data: JSON.parse(chunk.value.data) };
  }
}

// A sentence a person can act on, for any failure.
export function describe(err) {
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err.message}`;
  const retry = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : '';
  switch (err.status) {
    case 0: return `Network error: ${err.message}.`;
    case 401: return `The server needs a valid API key: ${err.message}.`;
    case 413: return `The request is too large: ${err.message}.`;
    case 422: return `The server rejected these settings: ${err.message}.`;
    case 429: return `The server is busy (queue full): ${err.message}.${retry}`;
    case 503: return `The server is not available right now: ${err.message}.${retry}`;
    case 504: return `The request ran past its deadline: ${err.message}.`;
    case null: return `The server stopped the request: ${err.message}${err.kind ? ` (${err.kind})` : ''}.`;
    default: return `The server answered HTTP ${err.status}: ${err.message}.`;
  }
}

function showError(err) {
  const box = $('error');
  box.textContent = describe(err);
  box.dataset.status = err.status ?? '';
  box.hidden = false;
  if (err.status === 401) askForKey(sessionStorage.getItem(KEY_STORAGE) ? 'The key was refused; enter another.' : null);
}

function clearError() {
  $('error').hidden = true;
}

// ---------------------------------------------------------------- API key (kept for this tab)

function askForKey(reason) {
  $('key-reason').textContent = reason ?? 'This server needs an API key.';
  $('key-form').hidden = false;
  $('key-input').focus();
}

function setupKeyForm() {
  $('key-button').addEventListener('click', () => {
    const form = $('key-form');
    if (form.hidden) askForKey('API key for this server (only needed when it sets ADSA_API_KEYS).');
    else form.hidden = true;
  });
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $('key-input').value.trim());
    $('key-input').value = '';
    $('key-form').hidden = true;
    clearError();
    loadModel();
  });
  $('key-forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $('key-form').hidden = true;
  });
}

// Escape closes the key form if it is open, else cancels the run in progress; not in a text field, where the
// browser gives it a meaning of its own (a search field clears)
function onEscape(ev) {
  if (ev.key !== 'Escape') return;
  if (!$('key-form').hidden) $('key-form').hidden = true;
  else if (!ev.target.closest('input, textarea, select')) state.run?.abort();
}

// ---------------------------------------------------------------- model and controls

async function loadModel() {
  let card;
  try {
    card = (await (await api('/v1/models')).json()).data[0];
  } catch (err) {
    $('model-line').textContent = 'model unavailable';
    showError(err);
    // 503 while the model loads or warms up: try again when the server says to
    if (err.status === 503) setTimeout(loadModel, 1000 * (Number(err.retryAfter) || 5));
    return;
  }
  clearError();
  const fresh = state.card?.id !== card.id; // false: the same model again (after a new API key): settings stay
  state.card = card;
  const kvDtype = card.kv_cache_dtype === 'fp8' ? 'fp8 KV' : 'KV in model dtype';
  $('model-line').textContent =
    `${card.id} · ${card.model_type === 't2i' ? 'text to image' : 'class to image'} · ` +
    `${card.image_size} px · ${card.seq_len ?? '?'} tokens per sequence · ${kvDtype}`;
  await setupConditions(card, fresh);
  setupSampling(card, fresh);
  $('generate').disabled = false;
  updateOutputs();
}

async function setupConditions(card, fresh) {
  const textModel = card.model_type === 't2i';
  $('class-field').hidden = textModel;
  $('prompt-field').hidden = !textModel;
  if (textModel || !fresh) return;
  if (card.classes) {
    state.classes = card.classes;
  } else if (card.num_classes === IMAGENET_CLASSES) {
    // LlamaGen's class-conditional checkpoints are ImageNet-1k and the server has no names for them.
    // imagenet_classes.json: torchvision 0.29.1's _IMAGENET_CATEGORIES (BSD-3-Clause), the usual short names.
    const names = await fetch('/static/imagenet_classes.json').then((r) => r.json());
    state.classes = names.map((name, id) => ({ id, name }));
  } else {
    state.classes = Array.from({ length: card.num_classes ?? 0 }, (_, id) => ({ id, name: `class ${id}` }));
  }
  chooseClass(state.classes[0]?.id ?? 0);
  renderClassList('');
}

function classLabel(c) {
  return `${c.name} (#${c.id})`;
}

function chooseClass(id) {
  state.classId = id;
  const c = state.classes.find((x) => x.id === id) ?? { id, name: `class ${id}` };
  const chosen = $('class-chosen');
  chosen.replaceChildren();
  if (c.emoji) chosen.append(Object.assign(document.createElement('span'), { className: 'emoji', textContent: c.emoji }));
  chosen.append(Object.assign(document.createElement('span'), { textContent: classLabel(c) }));
  for (const li of classOptions()) li.setAttribute('aria-selected', String(Number(li.dataset.id) === id));
  setTabStop();
}

const classOptions = () => [...$('class-list').querySelectorAll('li[data-id]')];

// The list is one tab stop (the chosen class, else the first listed); arrow keys move within it
function setTabStop(target = null) {
  const options = classOptions();
  const stop = target ?? options.find((li) => li.getAttribute('aria-selected') === 'true') ?? options[0];
  for (const li of options) li.tabIndex = li === stop ? 0 : -1;
  return stop;
}

// as the server reads a prompt (adsa_core/classes.py): no emoji presentation selectors, full-width ASCII as ASCII
function fold(text) {
  return text
    .replace(/[\uFE0E\uFE0F]/g, '')
    .replace(/[\uFF01-\uFF5E]/g, (ch) => String.fromCharCode(ch.charCodeAt(0) - 0xfee0))
    .replace(/\u3000/g, ' ')
    .toLowerCase();
}

// a class by any of its names (ImageNet's synonyms too), its emoji pasted with or without U+FE0F, or its id
function classMatches(c, q) {
  return !q || [c.name, ...(c.synonyms ?? [])].some((name) => fold(name).includes(q))
    || (c.emoji && fold(c.emoji) === q) || String(c.id) === q;
}

function renderClassList(query) {
  const q = fold(query.trim());
  const matches = state.classes.filter((c) => classMatches(c, q));
  const list = $('class-list');
  list.replaceChildren(
    ...matches.slice(0, MAX_LISTED_CLASSES).map((c) => {
      const li = document.createElement('li');
      li.role = 'option';
      li.tabIndex = -1;
      li.dataset.id = c.id;
      li.setAttribute('aria-selected', String(c.id === state.classId));
      li.textContent = `${c.emoji ? c.emoji + ' ' : ''}${classLabel(c)}`;
      return li;
    }),
  );
  if (matches.length > MAX_LISTED_CLASSES) {
    const more = document.createElement('li');
    more.className = 'more muted';
    more.textContent = `… ${fmt.format(matches.length - MAX_LISTED_CLASSES)} more: refine the search`;
    list.append(more);
  } else if (!matches.length) {
    list.append(Object.assign(document.createElement('li'), { className: 'more muted', textContent: 'no class matches' }));
  }
  setTabStop();
}

function setupClassPicker() {
  const search = $('class-search');
  search.addEventListener('input', (ev) => renderClassList(ev.target.value));
  // Enter picks the first match (it would otherwise submit the form with the class chosen before);
  // ArrowDown goes into the list
  search.addEventListener('keydown', (ev) => {
    const first = classOptions()[0];
    if (ev.key === 'Enter') {
      ev.preventDefault();
      if (first) chooseClass(Number(first.dataset.id));
    } else if (ev.key === 'ArrowDown' && first) {
      ev.preventDefault();
      setTabStop(first).focus();
    }
  });
  const pick = (ev) => {
    const li = ev.target.closest('li[data-id]');
    if (li) chooseClass(Number(li.dataset.id));
  };
  $('class-list').addEventListener('click', pick);
  $('class-list').addEventListener('keydown', (ev) => {
    const options = classOptions();
    const at = options.indexOf(ev.target);
    const next = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: options.length - 1 }[ev.key];
    if (ev.key === 'Enter' || ev.key === ' ') {
      ev.preventDefault();
      pick(ev);
    } else if (next !== undefined) {
      ev.preventDefault();
      if (ev.key === 'ArrowUp' && at === 0) search.focus();
      else if (options[next]) setTabStop(options[next]).focus();
    }
  });
}

function setupSampling(card, fresh) {
  $('n').max = card.limits.max_images_per_request;
  const budget = $('budget');
  budget.max = card.seq_len ?? card.default_budget ?? 256;
  budget.min = card.min_budget ?? 1;  // below it the server refuses every sparse policy (422)
  if (!fresh) return;
  // the model's recommended settings (its card), else LlamaGen's defaults, as the server's own
  const defaults = { cfg_scale: 4.0, temperature: 1.0, top_k: 0, top_p: 1.0, ...card.sampling_defaults };
  $('cfg').value = defaults.cfg_scale;
  $('temperature').value = defaults.temperature;
  $('top-k').value = defaults.top_k;
  $('top-p').value = defaults.top_p;
  $('policy').replaceChildren(...card.policies.map((p) => new Option(p, p, false, p === card.default_policy)));
  budget.value = card.default_budget ?? budget.max;
}

function budgetText(tokens) {
  const seqLen = state.card?.seq_len;
  return seqLen ? `${tokens} of ${seqLen} tokens (${Math.round((100 * tokens) / seqLen)} %)` : `${tokens} tokens`;
}

function updateOutputs() {
  // image i has seed + i: the last one must stay an integer a JavaScript number holds exactly (2**53 - 1)
  $('seed').max = Number.MAX_SAFE_INTEGER - Math.max(0, Number($('n').value) - 1);
  $('cfg-out').textContent = Number($('cfg').value) <= 1 ? 'off' : $('cfg').value;
  const dense = $('policy').value === 'dense';
  $('budget').disabled = dense;
  $('budget-out').textContent = dense ? 'all tokens (dense)' : budgetText(Number($('budget').value));
  $('compare').textContent = dense ? 'Compare (pick a sparse policy)' : `Compare ${$('policy').value} with dense`;
  $('compare').disabled = dense || state.busy || !state.card;
}

// The request body of the current settings; `policy` overrides the chosen one (compare's dense run).
function requestBody(policy = $('policy').value) {
  const body = {
    seed: Number($('seed').value),
    n: Number($('n').value),
    cfg_scale: Number($('cfg').value),
    temperature: Number($('temperature').value),
    top_k: Number($('top-k').value),
    top_p: Number($('top-p').value),
    policy,
  };
  if (state.card.model_type === 't2i') body.prompt = $('prompt').value; // an empty one gets the server's 422
  else body.class_label = state.classId;
  if (policy !== 'dense') body.kv_budget = Number($('budget').value);
  return body;
}

// ---------------------------------------------------------------- result panes

function bytesText(n) {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  return `${(n / 2 ** 10).toFixed(1)} KiB`;
}

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;

// One request's images and figures.
class Pane {
  constructor(title, subtitle, n) {
    this.el = $('pane-template').content.firstElementChild.cloneNode(true);
    this.el.querySelector('.pane-title').textContent = title;
    this.el.querySelector('.pane-sub').textContent = subtitle;
    this.figures = Array.from({ length: n }, () => {
      const fig = $('image-template').content.firstElementChild.cloneNode(true);
      this.el.querySelector('.images').append(fig);
      return fig;
    });
  }

  stat(name, text) {
    this.el.querySelector(`[data-stat="${name}"]`).textContent = text;
  }

  progress(i, fraction) {
    this.figures[i].querySelector('progress').value = fraction;
  }

  preview(i, b64) {
    const img = this.figures[i].querySelector('img');
    img.src = `data:image/png;base64,${b64}`; // the finished rows only: the picture grows downwards
  }

  image(data) {
    const fig = this.figures[data.index];
    const img = fig.querySelector('img');
    if (data.b64_json) {
      img.src = `data:image/png;base64,${data.b64_json}`;
      img.alt = `image ${data.index}, seed ${data.seed}`;
      img.classList.add('final');
    } else {
      fig.querySelector('.frame').textContent = 'no VQ decoder on this server: token ids only';
    }
    fig.classList.add('done');
    fig.querySelector('progress').value = 1;
    fig.querySelector('figcaption').textContent = `seed ${data.seed} · ${data.timings.run_s.toFixed(2)} s decoding`;
  }

  // done.stats of the stream's final event
  finish(stats, timing) {
    this.stat('ttfp', timing.firstPreviewMs == null ? 'no preview' : seconds(timing.firstPreviewMs));
    this.stat('total', seconds(timing.totalMs));
    const seqLen = state.card.seq_len;
    this.stat('budget', seqLen ? `${stats.kv_budget_tokens} / ${seqLen}` : String(stats.kv_budget_tokens));
    this.stat('peak', fmt.format(stats.peak_kv_tokens));
    this.stat('evictions', fmt.format(stats.evictions));
    this.stat('kv-bytes', bytesText(stats.kv_bytes));
  }

  memoryBar(fraction) {
    const bar = this.el.querySelector('.memory-bar');
    bar.classList.add('shown');
    bar.firstElementChild.style.width = `${Math.max(1, Math.min(100, fraction * 100))}%`;
  }
}

// Streams one request into a pane; resolves to {stats, timing} from the final `done` event.
async function runInto(pane, body, signal) {
  const start = performance.now();
  let firstPreviewMs = null;
  for await (const { event, data } of generateEvents(body, signal)) {
    if (event === 'progress') pane.progress(data.index, data.tokens_done / data.total);
    else if (event === 'partial_image') {
      firstPreviewMs ??= performance.now() - start;
      pane.preview(data.index, data.b64_json);
    } else if (event === 'image') pane.image(data);
    else if (event === 'error') throw errorFromBody(null, data); // after the stream started: no HTTP status
    else if (event === 'done') {
      const timing = { firstPreviewMs, totalMs: performance.now() - start };
      pane.finish(data.stats, timing);
      return { stats: data.stats, timing };
    }
  }
  throw new ApiError(0, 'the stream ended before its final event');
}

function subtitleFor(body) {
  const cfg = body.cfg_scale <= 1 ? 'no CFG' : `CFG ${body.cfg_scale}`;
  return `seed ${body.seed} · ${body.n} image${body.n > 1 ? 's' : ''} · ${cfg}`;
}

function paneTitle(body) {
  return body.policy === 'dense' ? 'dense' : `${body.policy} · ${body.kv_budget} tokens`;
}

// Runs task(signal) with the controls locked and Cancel shown; Cancel (or Escape) aborts `signal`.
async function busy(task) {
  if (state.busy || !state.card) return;
  state.busy = true;
  state.run = new AbortController();
  $('generate').disabled = true;
  $('cancel').hidden = false;
  updateOutputs();
  clearError();
  $('verdict').hidden = true;
  document.body.classList.add('running');
  try {
    await task(state.run.signal);
  } catch (err) {
    if (err.name === 'AbortError') {
      for (const fig of $('panes').querySelectorAll('figure')) {
        if (!fig.classList.contains('done')) fig.querySelector('figcaption').textContent = 'cancelled';
      }
      $('verdict').textContent = 'Cancelled: the server stopped the images that were not finished.';
      $('verdict').hidden = false;
    } else {
      showError(err);
      // a pane whose request was refused before it streamed anything only takes room from the message
      for (const pane of $('panes').querySelectorAll('.pane')) if (!pane.querySelector('img[src]')) pane.remove();
    }
  } finally {
    state.busy = false;
    state.run = null;
    $('generate').disabled = false;
    if (document.activeElement === $('cancel')) $('generate').focus(); // hiding the button would drop the focus
    $('cancel').hidden = true;
    document.body.classList.remove('running');
    updateOutputs();
  }
}

function generate() {
  return busy(async (signal) => {
    const body = requestBody();
    const pane = new Pane(paneTitle(body), subtitleFor(body), body.n);
    $('panes').replaceChildren(pane.el);
    $('panes').classList.remove('compare');
    await runInto(pane, body, signal);
  });
}

// Same seed twice: dense, then the chosen policy and budget, one after the other so each time is its own.
function compare() {
  if (!$('controls').reportValidity()) return undefined;  // as Generate's submit does
  return busy(async (signal) => {
    const sparseBody = requestBody();
    const denseBody = requestBody('dense');
    const dense = new Pane('dense', `full KV cache · ${subtitleFor(denseBody)}`, denseBody.n);
    const sparse = new Pane(paneTitle(sparseBody), subtitleFor(sparseBody), sparseBody.n);
    $('panes').replaceChildren(dense.el, sparse.el);
    $('panes').classList.add('compare');
    const d = await runInto(dense, denseBody, signal);
    const s = await runInto(sparse, sparseBody, signal);
    dense.memoryBar(1);
    sparse.memoryBar(s.stats.kv_bytes / d.stats.kv_bytes);
    const verdict = $('verdict');
    verdict.textContent =
      `${sparseBody.policy} with ${budgetText(sparseBody.kv_budget)} reserved ` +
      `${Math.round((100 * s.stats.kv_bytes) / d.stats.kv_bytes)} % of dense's KV memory ` +
      `(${bytesText(s.stats.kv_bytes)} vs ${bytesText(d.stats.kv_bytes)}) and took ` +
      `${seconds(s.timing.totalMs)} vs ${seconds(d.timing.totalMs)}.`;
    verdict.hidden = false;
  });
}

// ---------------------------------------------------------------- live metrics strip

// Unlabelled samples of a Prometheus text exposition: {name: value}.
function parsePrometheus(text) {
  const samples = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][\w:]*)\s+(\S+)/.exec(line);
    if (m) samples[m[1]] = Number(m[2]);
  }
  return samples;
}

let lastScrape = null;

async function refreshMetrics() {
  try {
    // /metrics is open (Prometheus scrapes carry no key); api() still sends one if the page has it
    const m = parsePrometheus(await (await api('/metrics')).text());
    const now = performance.now();
    const images = m.adsa_images_generated_total ?? 0;
    if (lastScrape) {
      const rate = (images - lastScrape.images) / ((now - lastScrape.at) / 1000);
      $('m-rate').textContent = Math.max(0, rate).toFixed(2);
    }
    lastScrape = { at: now, images };
    $('m-images').textContent = fmt.format(images);
    const ratio = m.adsa_kv_cache_usage_ratio ?? 0;
    $('m-kv').textContent =
      `${(100 * ratio).toFixed(1)} % · ${fmt.format(m.adsa_kv_cache_used_tokens ?? 0)} of ` +
      `${fmt.format(m.adsa_kv_cache_capacity_tokens ?? 0)} tokens`;
    $('m-kv-bar').style.width = `${Math.min(100, 100 * ratio)}%`;
    $('m-running').textContent = fmt.format(m.adsa_num_requests_running ?? 0);
    $('m-waiting').textContent = fmt.format(m.adsa_num_requests_waiting ?? 0);
    $('m-status').textContent = `updated ${new Date().toLocaleTimeString()}`;
    $('metrics').classList.remove('stale');
  } catch (err) {
    $('m-status').textContent = `metrics unavailable: ${err.message}`;
    $('metrics').classList.add('stale');
  }
}

// ---------------------------------------------------------------- start

function randomSeed() {
  $('seed').value = Math.floor(Math.random() * 2 ** 31);
}

setupKeyForm();
setupClassPicker();
$('generate').disabled = $('compare').disabled = true;
for (const id of ['cfg', 'budget', 'policy', 'n']) $(id).addEventListener('input', updateOutputs);
$('seed-random').addEventListener('click', randomSeed);
$('controls').addEventListener('submit', (ev) => {
  ev.preventDefault();
  generate();
});
$('compare').addEventListener('click', compare);
$('cancel').addEventListener('click', () => state.run?.abort());
document.addEventListener('keydown', onEscape);
randomSeed();
loadModel();
refreshMetrics();
setInterval(refreshMetrics, METRICS_EVERY_MS);

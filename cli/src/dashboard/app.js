// The nightshift operator dashboard. Every call goes to /api/..., which the
// `nightshift dashboard` server forwards, signed, to the nightshift HTTP API.
'use strict';

const POLL_MS = 2000;
const RUNS_PAGE = 20;
const REPORT_PAGE = 1000;
/** How often the report of a finished run is read again until its cost is final. */
const COST_RECHECK_MS = 5000;
// Which input of the accounts form an API error's `field` names.
const FIELD_INPUTS = { count: 'account-count', kernel: 'account-kernel', payload_bytes: 'payload-bytes' };
const DASH = '-';

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

/** Builds an HTML element: attributes (class, dataset, on<event>, others) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : value);
  }
  node.append(...children.filter((child) => child != null));
  return node;
}

/** Builds an SVG element; children may be nodes, text or null (skipped). */
function svgEl(tag, attrs = {}, ...children) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value != null) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child != null));
  return node;
}

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const text = (v) => (v == null || v === '' ? DASH : String(v));
const shortId = (id) => (id ? String(id).slice(0, 8) : DASH);

function parseTime(ts) {
  const t = ts ? Date.parse(ts) : NaN;
  return Number.isNaN(t) ? null : t;
}

// Local time, 24-hour clock, in the browser's locale.
const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
  weekday: 'short', day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23',
});
const shortDateTimeFmt = new Intl.DateTimeFormat(undefined, {
  day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23',
});
const timeFmt = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});
const minuteFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', hourCycle: 'h23' });
const formatWith = (fmt) => (ts) => {
  const t = typeof ts === 'number' ? ts : parseTime(ts);
  return t == null ? DASH : fmt.format(t);
};
const fmtDateTime = formatWith(dateTimeFmt);
const fmtShortDateTime = formatWith(shortDateTimeFmt);
const fmtTime = formatWith(timeFmt);

const numberFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const fmtNum = (v) => (isNum(v) ? numberFmt.format(v) : DASH);
const fmtPercent = (share) => (isNum(share) ? `${Math.round(share * 100)} %` : DASH);

// Dollars: cents above a dollar; three significant digits below, where
// per-second prices and small runs live.
const usdFmt = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD' });
const usdSmallFmt = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD', maximumSignificantDigits: 3 });
const fmtUsd = (v) => (isNum(v) ? (Math.abs(v) >= 1 ? usdFmt : usdSmallFmt).format(v) : DASH);

function fmtDuration(ms) {
  if (!isNum(ms)) return DASH;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, '0')} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
}

/** A status or state as a coloured badge (DONE, FAILED, OPEN, ...). */
const badge = (value) => el('span', { class: `badge ${String(value ?? '').toLowerCase()}` }, text(value));

/** Shows a message in a status element; kind is '', 'ok' or 'error'. */
function setStatus(node, message, kind = '') {
  // Rewriting the same text would make screen readers repeat it.
  if (node.textContent !== message) node.textContent = message;
  node.classList.toggle('ok', kind === 'ok');
  node.classList.toggle('error', kind === 'error');
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(message, { field = null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.field = field;
  }

  /** The message as shown to the operator, naming the field when there is one. */
  describe() {
    return this.field ? `${this.message} (field: ${this.field})` : this.message;
  }
}

/** Calls the API; resolves to {status, data}, rejects with an ApiError (or an AbortError). */
async function api(method, path, { body, signal } = {}) {
  // The dashboard server forwards only calls that carry this header, which
  // another origin's page cannot send without a preflight it never grants.
  const init = { method, signal, headers: { accept: 'application/json', 'x-nightshift-dashboard': '1' } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api${path}`, init);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError('The dashboard server cannot be reached.');
  }
  const raw = await response.text();
  let data = null;
  try {
    data = raw ? JSON.parse(raw) : null;
  } catch {
    // Not JSON (a proxy's error page, say): reported below by status.
  }
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(error.message || `HTTP ${response.status} ${response.statusText}`.trim(), error);
  }
  if (data == null) throw new ApiError(`The answer to ${method} ${path} is not JSON.`);
  return { status: response.status, data };
}

/** What to tell the operator about a failure. */
const describe = (err) => (err instanceof ApiError ? err.describe() : String(err?.message ?? err));

// ---------------------------------------------------------------- sortable tables

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

/**
 * A table sorted by clicking (or Enter/Space on) its header buttons.
 * columns: [{key, label, num?, clip?, sort(row) -> value|null, cell(row) -> string|Node}];
 * each cell gets the column's key as class name. Empty values sort last
 * in either direction.
 */
class SortableTable {
  constructor(table, columns, { rowData, sortKey }) {
    this.table = table;
    this.columns = columns;
    this.rowData = rowData;
    this.sortKey = sortKey;
    this.dir = 1;
    this.rows = [];
    table.replaceChildren(el('thead', {}, el('tr')), el('tbody'));
    this.renderHead();
  }

  renderHead() {
    const cells = this.columns.map((col) => {
      const active = col.key === this.sortKey;
      const arrow = active ? (this.dir > 0 ? '▲' : '▼') : '';
      return el('th', {
        scope: 'col',
        class: col.num ? 'num' : null,
        'aria-sort': active ? (this.dir > 0 ? 'ascending' : 'descending') : 'none',
      }, el('button', { type: 'button', class: 'sort', onclick: () => this.sortBy(col.key) },
        col.label, el('span', { class: 'arrow', 'aria-hidden': 'true' }, arrow)));
    });
    this.table.tHead.rows[0].replaceChildren(...cells);
  }

  sortBy(key) {
    this.dir = key === this.sortKey ? -this.dir : 1;
    this.sortKey = key;
    this.renderHead();
    this.renderBody();
    // The header was rebuilt: keep the keyboard where it was.
    this.table.tHead.rows[0].cells[this.columns.findIndex((c) => c.key === key)].firstChild.focus();
  }

  setRows(rows) {
    this.rows = rows;
    this.renderBody();
  }

  renderBody() {
    const col = this.columns.find((c) => c.key === this.sortKey);
    const keyed = this.rows.map((row) => [col.sort(row), row]);
    keyed.sort(([a], [b]) => {
      const aEmpty = a == null || a === '';
      const bEmpty = b == null || b === '';
      if (aEmpty || bEmpty) return aEmpty - bEmpty;
      return this.dir * (typeof a === 'number' && typeof b === 'number' ? a - b : collator.compare(String(a), String(b)));
    });
    const body = el('tbody');
    for (const [, row] of keyed) {
      body.append(el('tr', { dataset: this.rowData(row) }, ...this.columns.map((c) => {
        const content = c.cell(row);
        const classes = [c.key, c.num && 'num', c.clip && 'clip'].filter(Boolean).join(' ');
        // Clipped cells show their whole text on hover.
        const whole = typeof content === 'string' ? content : content.textContent;
        return el('td', { class: classes, title: c.clip && whole !== DASH ? whole : null }, content);
      })));
    }
    this.table.tBodies[0].replaceWith(body);
  }
}

const TASK_COLUMNS = [
  { key: 'account', label: 'Account', sort: (t) => t.account, cell: (t) => text(t.account) },
  { key: 'status', label: 'Status', sort: (t) => t.status, cell: (t) => badge(t.status) },
  { key: 'instance', label: 'Instance', sort: (t) => t.instance_id, cell: (t) => text(t.instance_id) },
  {
    key: 'attempts', label: 'Attempts', num: true, sort: (t) => t.attempts,
    cell: (t) => (t.failed_attempts > 0 ? `${fmtNum(t.attempts)} (${t.failed_attempts} failed)` : fmtNum(t.attempts)),
  },
  { key: 'interruptions', label: 'Interrupted', num: true, sort: (t) => t.interruptions, cell: (t) => fmtNum(t.interruptions) },
  { key: 'start', label: 'Start', sort: (t) => parseTime(t.started_at), cell: (t) => fmtTime(t.started_at) },
  { key: 'duration', label: 'Duration', num: true, sort: (t) => t.duration_ms, cell: (t) => fmtDuration(t.duration_ms) },
  { key: 'summary', label: 'Result', clip: true, sort: (t) => t.summary, cell: (t) => text(t.summary) },
  {
    key: 'error', label: 'Error', clip: true, sort: (t) => t.error,
    cell: (t) => (t.error ? el('span', { class: 'error-text' }, t.error) : DASH),
  },
];

/** Share of an instance's slot-time spent on tasks; needs its slots from the run. */
function utilisation(inst, slots) {
  if (!isNum(inst.busy_ms) || !isNum(inst.seconds) || !isNum(slots) || inst.seconds <= 0 || slots <= 0) return null;
  // Task times come from the worker's clock, the lifetime from EC2's: a
  // fully busy instance can come out a little over 100 %.
  return Math.min(1, inst.busy_ms / (inst.seconds * 1000 * slots));
}

const INSTANCE_COLUMNS = [
  { key: 'instance', label: 'Instance', sort: (i) => i.id, cell: (i) => text(i.id) },
  { key: 'type', label: 'Type', sort: (i) => i.instance_type, cell: (i) => text(i.instance_type) },
  { key: 'zone', label: 'Zone', sort: (i) => i.zone, cell: (i) => text(i.zone) },
  { key: 'market', label: 'Market', sort: (i) => i.lifecycle, cell: (i) => text(i.lifecycle) },
  {
    key: 'running', label: 'Running', sort: (i) => parseTime(i.launched_at),
    cell: (i) => `${fmtTime(i.launched_at)} – ${i.ended_at ? fmtTime(i.ended_at) : 'now'}`,
  },
  {
    key: 'lifetime', label: 'Lifetime', num: true, sort: (i) => i.seconds,
    cell: (i) => fmtDuration(isNum(i.seconds) ? i.seconds * 1000 : null),
  },
  {
    key: 'tasks', label: 'Tasks', num: true, sort: (i) => i.tasks,
    cell: (i) => fmtNum(i.tasks),
  },
  { key: 'busy', label: 'Busy', num: true, sort: (i) => i.busy_ms, cell: (i) => fmtDuration(i.busy_ms) },
  {
    key: 'use', label: 'Slot use', num: true, sort: (i) => i.use,
    cell: (i) => fmtPercent(i.use),
  },
  { key: 'usd', label: 'Cost', num: true, sort: (i) => i.usd, cell: (i) => fmtUsd(i.usd) },
];

// ---------------------------------------------------------------- state

const state = {
  current: null, // the newest run, shown live
  pollTimer: null,
  runsCursor: null,
  report: null, // the loaded report: {run, tasks, instances, cost}
  reportRunId: null,
  reportPinned: false, // the operator chose the run: a finishing run does not replace it
  reportAbort: null,
};
let tasksTable;
let instancesTable;

// ---------------------------------------------------------------- header and info

/** The header's state line; it changes with the run's state only, not with every count. */
function describeCurrent(run) {
  if (!run) return 'No run yet: create test accounts, then start the night.';
  if (run.state === 'OPEN') return `Run ${shortId(run.id)} is open until ${fmtDateTime(run.deadline)}`;
  const when = run.finished_at ? ` at ${fmtDateTime(run.finished_at)}` : '';
  return `No run open · last run ${shortId(run.id)} ${text(run.state)}${when}`;
}

async function loadInfo() {
  try {
    const { data } = await api('GET', '/info');
    $('api-base').textContent = `${text(data.api)}${data.signed === false ? ' (unsigned)' : data.signed ? ' (signed)' : ''}`;
    const kernels = Array.isArray(data.kernels) ? data.kernels : [];
    $('account-kernel').replaceChildren(...kernels.map((k) => el('option', { value: k }, k)));
    $('create-accounts').disabled = kernels.length === 0;
    if (kernels.length === 0) setStatus($('accounts-status'), 'The API offers no kernel.', 'error');
  } catch (err) {
    $('api-base').textContent = 'unavailable';
    setStatus($('state-line'), `Cannot read the API's description: ${describe(err)}`, 'error');
  }
}

// ---------------------------------------------------------------- test accounts

async function createAccounts(event) {
  event.preventDefault();
  const status = $('accounts-status');
  const button = $('create-accounts');
  for (const id of Object.values(FIELD_INPUTS)) $(id).removeAttribute('aria-invalid');
  const body = {
    count: Number($('account-count').value),
    kernel: $('account-kernel').value,
    payload_bytes: Number($('payload-bytes').value),
  };
  button.disabled = true;
  setStatus(status, 'Submitting…');
  try {
    const { data } = await api('POST', '/accounts', { body });
    setStatus(status, `submitted ${text(data.submitted)} accounts (${body.kernel}); they wait for the night.`, 'ok');
  } catch (err) {
    setStatus(status, describe(err), 'error');
    const input = err.field && $(FIELD_INPUTS[err.field]);
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      input.focus();
    }
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- the night and the current run

async function startNight() {
  const status = $('night-status');
  const button = $('start-night');
  button.disabled = true;
  setStatus(status, 'Starting…');
  try {
    const { status: code, data } = await api('POST', '/runs');
    const run = data.run;
    if (code === 201 || data.created) {
      const dispatch = data.dispatch === 'requested'
        ? 'the dispatcher is launching workers'
        : 'workers launch on the next dispatcher tick';
      setStatus(status, `Started run ${shortId(run?.id)}: ${dispatch}.`, 'ok');
    } else {
      setStatus(status, `A run is already open: ${shortId(run?.id)}.`, 'ok');
    }
    if (run?.id) {
      showCurrent(run);
      upsertPastRun(run);
      schedulePoll(0); // read it once now, then every POLL_MS while it is open
    }
  } catch (err) {
    setStatus(status, describe(err), 'error');
  } finally {
    button.disabled = false;
  }
}

async function cancelRun() {
  const run = state.current;
  const status = $('cancel-status');
  if (!run?.id) return;
  if (!window.confirm(`Cancel run ${shortId(run.id)}? Its pending and queued tasks end CANCELLED and its instances stop.`)) return;
  const button = $('cancel-run');
  button.disabled = true;
  setStatus(status, 'Cancelling…');
  try {
    const { data } = await api('POST', `/runs/${encodeURIComponent(run.id)}/cancel`);
    setStatus(status, data.cancelled
      ? `Run ${shortId(run.id)} cancelled: its tasks end CANCELLED and its instances stop.`
      : `Run ${shortId(run.id)} was already cancelled.`, 'ok');
    showCurrent(data.run);
    upsertPastRun(data.run);
    schedulePoll(0);
  } catch (err) {
    setStatus(status, describe(err), 'error');
  } finally {
    button.disabled = false;
  }
}

/** An open run changes; so does one whose instances have not all ended yet. */
const needsPolling = (run) => run?.state === 'OPEN' || (run?.instances ?? []).some((i) => i.ended_at == null);

function schedulePoll(delay = POLL_MS) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(refreshCurrent, delay);
}

async function refreshCurrent() {
  const id = state.current?.id;
  if (!id) return;
  try {
    const { data: run } = await api('GET', `/runs/${encodeURIComponent(id)}`);
    if (state.current?.id !== id) return; // another run became current meanwhile
    const justEnded = run.state !== 'OPEN' && state.reportRunId !== run.id;
    showCurrent(run);
    upsertPastRun(run);
    if (needsPolling(run)) schedulePoll();
    if (justEnded) reportWhenEnded(run);
  } catch (err) {
    if (state.current?.id !== id) return;
    setStatus($('state-line'), `Cannot refresh run ${shortId(id)}: ${describe(err)} Retrying.`, 'error');
    if (needsPolling(state.current)) schedulePoll();
  }
}

/** Once the current run has ended, its report is shown, unless the operator chose another. */
function reportWhenEnded(run) {
  if (run.state !== 'OPEN' && (!state.reportPinned || state.reportRunId === run.id)) {
    openReport(run.id, { pinned: state.reportPinned });
  }
}

function showCurrent(run) {
  state.current = run;
  setStatus($('state-line'), describeCurrent(run));
  $('current-empty').hidden = Boolean(run);
  $('current').hidden = !run;
  const runState = $('run-state');
  runState.hidden = !run;
  $('cancel-run').hidden = run?.state !== 'OPEN';
  $('current-id').textContent = run ? text(run.id) : '';
  $('current-updated').textContent = run ? `updated ${fmtTime(Date.now())}` : '';
  if (!run) return;

  runState.textContent = text(run.state);
  runState.className = `badge ${String(run.state ?? '').toLowerCase()}`;
  runState.dataset.runId = run.id;
  $('current-started').textContent = fmtDateTime(run.started_at);
  $('current-deadline').textContent = fmtDateTime(run.deadline);
  $('current-finished').textContent = fmtDateTime(run.finished_at);

  const queued = run.queued ?? 0;
  const done = run.done ?? 0;
  const failed = run.failed ?? 0;
  // A cancelled run has nothing queued left: its cancel ended it.
  const inFlight = run.state === 'CANCELLED' ? 0 : Math.max(0, queued - done - failed);
  $('count-queued').textContent = fmtNum(inFlight);
  $('count-done').textContent = fmtNum(done);
  $('count-failed').textContent = fmtNum(failed);
  $('count-cancelled').textContent = fmtNum(run.cancelled ?? 0);
  $('count-total').textContent = fmtNum(queued);

  const bar = $('progress');
  const share = (n) => (queued > 0 ? `${(100 * n) / queued}%` : '0%');
  bar.querySelector('.done').style.width = share(done);
  bar.querySelector('.failed').style.width = share(failed);
  bar.setAttribute('aria-valuemax', String(queued));
  bar.setAttribute('aria-valuenow', String(done + failed));
  bar.setAttribute('aria-valuetext', `${done + failed} of ${queued} tasks ended`);

  const progress = run.progress ?? {};
  $('current-rate').textContent = fmtNum(progress.tasks_per_minute);
  $('current-requests').textContent = fmtNum(run.fleet_requests);
  // Pending tasks the last dispatcher pass had no room for.
  $('current-waiting').textContent = run.waiting ? 'queued on the next pass' : 'none';
  // Until the pace says, the dispatcher's plan does (from measured or
  // assumed task lengths and the slots it has).
  const plan = run.plan ?? null;
  const projection = progress.projected_finish == null && plan != null ? plan : progress;
  showProjection(projection, parseTime(run.deadline));
  $('current-plan').textContent = plan == null ? '' : `Fleet plan (${plan.slots} slots): ${plan.reason}`;
  $('current-plan').className = plan != null && plan.on_time === false ? 'late' : 'muted';
  showFleet(run.instances ?? []);
}

function showProjection(progress, deadline) {
  const node = $('current-projection');
  const projected = parseTime(progress.projected_finish);
  node.className = '';
  if (projected == null) {
    node.textContent = DASH;
    return;
  }
  let verdict = '';
  if (progress.on_time === true) {
    node.className = 'on-time';
    verdict = deadline == null ? ' · on time' : ` · on time, ${fmtDuration(deadline - projected)} to spare`;
  } else if (progress.on_time === false) {
    node.className = 'late';
    verdict = deadline == null ? ' · late' : ` · late by ${fmtDuration(projected - deadline)}`;
  }
  node.textContent = `${fmtShortDateTime(projected)}${verdict}`;
}

/** An instance of the run as the report's lines have it: busy_ms and its seconds up to now. */
function liveSeconds(inst) {
  const from = parseTime(inst.launched_at);
  const to = parseTime(inst.ended_at) ?? Date.now();
  return { busy_ms: inst.busy_ms, seconds: from == null ? null : Math.max(0, (to - from) / 1000) };
}

function showFleet(instances) {
  const rows = instances.map((inst) => el('tr', { dataset: { instanceId: inst.id ?? '' } },
    el('td', { class: 'instance' }, text(inst.id)),
    el('td', {}, text(inst.instance_type)),
    el('td', {}, text(inst.zone)),
    el('td', { title: inst.reason ?? '' }, text(inst.lifecycle)),
    el('td', {}, inst.ended_at == null ? badge('running') : badge('ended')),
    el('td', { class: 'num' }, fmtNum(inst.tasks)),
    el('td', { class: 'num' }, fmtPercent(utilisation(liveSeconds(inst), inst.slots)))));
  if (rows.length === 0) rows.push(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'No instance launched yet.')));
  $('fleet').tBodies[0].replaceChildren(...rows);
}

// ---------------------------------------------------------------- past runs

function fillPastRunRow(row, run) {
  const [, stateCell, started, finished, counts] = row.cells;
  stateCell.replaceChildren(badge(run.state));
  started.textContent = fmtShortDateTime(run.started_at);
  // The end alone as a time when the run ended on the day it started.
  const start = parseTime(run.started_at);
  const end = parseTime(run.finished_at);
  const sameDay = start != null && end != null && new Date(start).toDateString() === new Date(end).toDateString();
  finished.textContent = sameDay ? minuteFmt.format(end) : fmtShortDateTime(end);
  counts.textContent = `${text(run.done)}/${text(run.failed)}/${text(run.queued)}`;
}

/** Marks the listed run whose report is shown. */
function markSelected(row) {
  const selected = row.dataset.runId === state.reportRunId;
  row.classList.toggle('selected', selected);
  if (selected) row.setAttribute('aria-current', 'true');
  else row.removeAttribute('aria-current');
}

function pastRunRow(run) {
  const open = () => openReport(run.id, { pinned: true, scroll: true });
  const row = el('tr', {
    dataset: { runId: run.id },
    // The whole row opens the report; its button does so for the keyboard.
    onclick: (event) => { if (!event.target.closest('button')) open(); },
  },
  el('td', {}, el('button', {
    type: 'button', class: 'link mono', title: `Open the report of run ${run.id}`, onclick: open,
  }, shortId(run.id))),
  el('td'), el('td'), el('td'), el('td', { class: 'num' }));
  fillPastRunRow(row, run);
  markSelected(row);
  return row;
}

/** Updates a listed run in place (keeping focus), or lists a new one first. */
function upsertPastRun(run) {
  const body = $('past-runs').tBodies[0];
  const row = [...body.rows].find((r) => r.dataset.runId === run.id);
  if (row) fillPastRunRow(row, run);
  else body.prepend(pastRunRow(run));
  $('past-status').textContent = '';
}

async function loadPastRuns({ more = false } = {}) {
  const status = $('past-status');
  const moreButton = $('past-more');
  const cursor = more ? state.runsCursor : null;
  moreButton.disabled = true;
  try {
    const query = `limit=${RUNS_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const { data } = await api('GET', `/runs?${query}`);
    const runs = Array.isArray(data.runs) ? data.runs : [];
    const body = $('past-runs').tBodies[0];
    if (!more) body.replaceChildren();
    // A run started since the first page is listed already.
    const listed = new Set([...body.rows].map((r) => r.dataset.runId));
    body.append(...runs.filter((r) => r?.id && !listed.has(r.id)).map(pastRunRow));
    state.runsCursor = data.next_cursor ?? null;
    moreButton.hidden = !state.runsCursor;
    setStatus(status, body.rows.length === 0 ? 'No run yet.' : '');
    return runs;
  } catch (err) {
    setStatus(status, `Cannot list the runs: ${describe(err)}`, 'error');
    return null;
  } finally {
    moreButton.disabled = false;
  }
}

// ---------------------------------------------------------------- the report

/** Loads every page of a run's report, then shows it. A newer request cancels an older one. */
async function openReport(runId, { pinned, scroll = false }) {
  state.reportAbort?.abort();
  clearTimeout(state.costTimer);
  const abort = new AbortController();
  state.reportAbort = abort;
  state.reportRunId = runId;
  state.reportPinned = pinned;
  delete document.body.dataset.reportLoaded;
  delete document.body.dataset.costFinal;
  for (const row of $('past-runs').tBodies[0].rows) markSelected(row);
  if (scroll) $('report-title').scrollIntoView({ block: 'start' });

  const status = $('report-status');
  const path = `/runs/${encodeURIComponent(runId)}/report?limit=${REPORT_PAGE}`;
  setStatus(status, `Loading the report of run ${shortId(runId)}…`);
  try {
    let { data: page } = await api('GET', path, { signal: abort.signal });
    // Instances and cost come with the first page only.
    const report = { run: page.run, instances: page.instances ?? [], cost: page.cost ?? null, tasks: [...(page.tasks ?? [])] };
    let pages = 1;
    while (page.next_cursor) {
      setStatus(status, `Loading the report of run ${shortId(runId)}: ${report.tasks.length} tasks so far…`);
      ({ data: page } = await api('GET', `${path}&cursor=${encodeURIComponent(page.next_cursor)}`, { signal: abort.signal }));
      report.tasks.push(...(page.tasks ?? []));
      pages += 1;
    }
    state.report = report;
    renderReport(report);
    const snapshot = report.run?.state === 'OPEN' ? ' The run is still open: Reload for newer figures.' : '';
    const loaded = `${report.tasks.length} tasks in ${pages} ${pages === 1 ? 'page' : 'pages'}, loaded at ${fmtTime(Date.now())}.`;
    setStatus(status, loaded + snapshot);
    $('report-reload').hidden = false;
    document.body.dataset.reportLoaded = runId;
    // A run that is over costs more until its last instance ends: read
    // the report again until the cost is final.
    if (report.cost?.complete) {
      document.body.dataset.costFinal = runId;
    } else if (report.run?.state !== 'OPEN') {
      state.costTimer = setTimeout(() => openReport(runId, { pinned }), COST_RECHECK_MS);
    }
  } catch (err) {
    if (err.name === 'AbortError') return;
    setStatus(status, `Cannot load the report of run ${shortId(runId)}: ${describe(err)}`, 'error');
  }
}

function renderReport(report) {
  const run = report.run ?? {};
  $('report').hidden = false;
  const started = parseTime(run.started_at);
  const finished = parseTime(run.finished_at);
  const facts = [
    `started ${fmtDateTime(started)}`,
    finished == null ? 'not finished' : `finished ${fmtDateTime(finished)}`,
    started != null && finished != null ? `took ${fmtDuration(finished - started)}` : null,
    `${text(run.done)} done, ${text(run.failed)} failed of ${text(run.queued)} queued`,
  ];
  $('report-summary').replaceChildren(
    'Run ', el('span', { class: 'mono' }, text(run.id)), ' ', badge(run.state),
    ` · ${facts.filter(Boolean).join(' · ')}`,
  );
  renderCost(report.cost);

  const slots = new Map((run.instances ?? []).map((i) => [i.id, i.slots]));
  instancesTable.setRows(report.instances.map((i) => ({ ...i, use: utilisation(i, slots.get(i.id)) })));
  renderTimeline(report);
  renderTasks();
}

function renderCost(cost) {
  const box = $('cost');
  if (!cost) {
    box.replaceChildren(el('p', { class: 'muted' }, 'No cost for this run.'));
    return;
  }
  const saving = isNum(cost.total_usd) && isNum(cost.on_demand_usd) && cost.on_demand_usd > 0
    ? ` (${Math.round(100 * (1 - cost.total_usd / cost.on_demand_usd))} % less)` : '';
  const fact = (label, value, cls) => el('div', {}, el('dt', {}, label), el('dd', { class: cls }, value));
  const lines = (cost.lines ?? []).map((line) => el('tr', {},
    el('td', {}, text(line.item)),
    el('td', { class: 'num' }, fmtNum(line.quantity)),
    el('td', {}, text(line.unit)),
    el('td', { class: 'num' }, fmtUsd(line.usd))));
  box.replaceChildren(
    el('dl', { class: 'facts' },
      fact('Total', fmtUsd(cost.total_usd), 'big'),
      fact('All on-demand', `${fmtUsd(cost.on_demand_usd)}${saving}`),
      fact('Per 1000 tasks', fmtUsd(cost.per_thousand_tasks_usd)),
      fact('Prices', `${text(cost.region)}, as of ${text(cost.prices_as_of)}`),
      fact('Final', cost.complete ? 'yes' : 'not yet: instances still running are counted to now', cost.complete ? '' : 'late')),
    lines.length === 0 ? null : el('table', { class: 'grid compact cost-lines' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Item'), el('th', { scope: 'col', class: 'num' }, 'Quantity'),
        el('th', { scope: 'col' }, 'Unit'),
        el('th', { scope: 'col', class: 'num' }, 'Cost'))),
      el('tbody', {}, ...lines)),
    cost.note ? el('p', { class: 'note' }, cost.note) : null,
  );
}

function renderTasks() {
  const filter = $('task-filter').value;
  const tasks = state.report?.tasks ?? [];
  const shown = filter ? tasks.filter((t) => t.status === filter) : tasks;
  tasksTable.setRows(shown);
  $('task-count').textContent = `${shown.length} of ${tasks.length} tasks`;
}

// ---------------------------------------------------------------- the timeline

const TICK_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600];
const TL = { label: 150, right: 16, axis: 24, row: 10, gap: 3, pad: 5 };

/** Each task's bar and each earlier attempt, grouped by the instance that ran it. */
function timelineLanes(report) {
  const lanes = new Map();
  const add = (instanceId, item) => {
    if (!lanes.has(instanceId)) lanes.set(instanceId, []);
    lanes.get(instanceId).push(item);
  };
  const open = report.run?.state === 'OPEN';
  const runEnd = parseTime(report.run?.finished_at);
  for (const task of report.tasks) {
    const label = text(task.account);
    for (const attempt of task.attempt_log ?? []) {
      const end = parseTime(attempt?.ended_at);
      if (!attempt?.instance_id || end == null) continue;
      const outcome = attempt.outcome === 'failed' ? 'failed' : 'interrupted';
      const start = parseTime(attempt.started_at) ?? end;
      add(attempt.instance_id, {
        start, end, cls: `attempt ${outcome}`,
        title: `${label}: attempt ${outcome} ${fmtTime(start)}–${fmtTime(end)}${attempt.error ? `: ${attempt.error}` : ''}`,
      });
    }
    const start = parseTime(task.started_at);
    if (!task.instance_id || start == null) continue;
    // A task still running reaches to now, or to the end of its closed run.
    const end = parseTime(task.finished_at) ?? (open ? Date.now() : runEnd ?? start + (task.duration_ms ?? 0));
    add(task.instance_id, {
      start, end, cls: `bar ${String(task.status ?? '').toLowerCase()}`, taskId: task.task_id,
      title: `${label}: ${text(task.status)} ${fmtTime(start)}–${fmtTime(end)} (${fmtDuration(end - start)})`,
    });
  }
  const known = new Map(report.instances.map((i) => [i.id, i]));
  const first = (id) => parseTime(known.get(id)?.launched_at) ?? Math.min(...lanes.get(id).map((i) => i.start));
  return [...lanes.keys()].sort((a, b) => first(a) - first(b)).map((id) => ({ id, info: known.get(id), items: lanes.get(id) }));
}

/** Tick times at a round step, on the local clock, at most maxTicks of them. */
function ticks(t0, t1, maxTicks) {
  const span = Math.max(t1 - t0, 1);
  const step = 1000 * (TICK_STEPS_S.find((s) => (span / 1000) / s <= maxTicks) ?? TICK_STEPS_S[TICK_STEPS_S.length - 1]);
  const offset = -new Date(t0).getTimezoneOffset() * 60000;
  const out = [];
  for (let t = Math.ceil((t0 + offset) / step) * step - offset; t <= t1; t += step) out.push(t);
  return { step, times: out };
}

function renderTimeline(report) {
  const box = $('timeline-box');
  const lanes = timelineLanes(report);
  if (lanes.length === 0) {
    box.replaceChildren(el('p', { class: 'muted' }, 'No task has started on an instance.'));
    return;
  }
  // The span covers every bar and the lanes' instance lifetimes.
  const times = [];
  for (const lane of lanes) {
    for (const item of lane.items) times.push(item.start, item.end);
    times.push(parseTime(lane.info?.launched_at), parseTime(lane.info?.ended_at));
  }
  const known = times.filter((t) => t != null);
  const t0 = Math.min(...known);
  const t1 = Math.max(...known, t0 + 1000);
  const width = Math.max(box.clientWidth, 600);
  const plot = width - TL.label - TL.right;
  const x = (t) => TL.label + ((t - t0) / (t1 - t0)) * plot;

  // Overlapping bars (an instance runs several tasks at once) go on
  // separate rows of the lane: each takes the first row free at its start,
  // so a lane has as many rows as the instance ran tasks at once.
  for (const lane of lanes) {
    const rowEnds = [];
    lane.items.sort((a, b) => a.start - b.start);
    for (const item of lane.items) {
      item.x = x(item.start);
      item.w = Math.max(x(item.end) - item.x, 2);
      let row = rowEnds.findIndex((end) => end <= item.x);
      if (row < 0) row = rowEnds.length;
      rowEnds[row] = item.x + item.w;
      item.row = row;
    }
    lane.height = TL.pad * 2 + rowEnds.length * (TL.row + TL.gap) - TL.gap;
  }
  const height = TL.axis + lanes.reduce((sum, lane) => sum + lane.height, 0) + 1;

  const hatch = (id) => svgEl('pattern', {
    id, width: 5, height: 5, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)',
  },
    svgEl('rect', { width: 5, height: 5, class: 'hatch-bg' }),
    svgEl('line', { x1: 0, y1: 0, x2: 0, y2: 5, class: 'hatch-line' }));
  const { step, times: tickTimes } = ticks(t0, t1, Math.floor(plot / 80));
  const axis = svgEl('g', { class: 'axis' }, ...tickTimes.map((t) => svgEl('g', {},
    svgEl('line', { x1: x(t), x2: x(t), y1: TL.axis - 4, y2: height }),
    // A label near the right edge ends at its tick rather than overflowing.
    svgEl('text', { x: x(t), y: TL.axis - 8, 'text-anchor': x(t) > width - TL.right - 30 ? 'end' : 'middle' },
      step >= 60000 ? minuteFmt.format(t) : timeFmt.format(t)))));

  let y = TL.axis;
  const laneNodes = lanes.map((lane, index) => {
    const info = lane.info;
    const launched = parseTime(info?.launched_at);
    const ended = parseTime(info?.ended_at) ?? t1;
    const g = svgEl('g', {
      class: `lane${index % 2 ? ' odd' : ''}`, 'data-instance-id': lane.id, transform: `translate(0 ${y})`,
    },
      svgEl('rect', { class: 'lane-bg', x: 0, y: 0, width, height: lane.height }),
      svgEl('text', { class: 'lane-label', x: 6, y: Math.min(lane.height / 2, TL.pad + TL.row / 2) + 4 },
        lane.id, svgEl('title', {}, [lane.id, info?.instance_type, info?.lifecycle, info?.zone].filter(Boolean).join(' · '))),
      launched == null ? null : svgEl('rect', {
        class: 'life', x: x(launched), y: 1, width: Math.max(x(ended) - x(launched), 1), height: lane.height - 2,
      }, svgEl('title', {}, `${lane.id} running ${fmtTime(launched)}–${fmtTime(info?.ended_at)}`)),
      ...lane.items.map((item) => svgEl('rect', {
        class: item.cls, 'data-task-id': item.taskId, x: item.x, width: item.w,
        y: TL.pad + item.row * (TL.row + TL.gap), height: TL.row,
      }, svgEl('title', {}, item.title))));
    y += lane.height;
    return g;
  });

  const bars = lanes.reduce((sum, lane) => sum + lane.items.length, 0);
  box.replaceChildren(svgEl('svg', {
    id: 'timeline', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `Timeline: ${bars} bars on ${lanes.length} instances from ${fmtTime(t0)} to ${fmtTime(t1)}`,
  }, svgEl('defs', {}, hatch('hatch-interrupted'), hatch('hatch-failed')), axis, ...laneNodes));
}

// ---------------------------------------------------------------- start

async function init() {
  tasksTable = new SortableTable($('report-tasks'), TASK_COLUMNS, {
    rowData: (t) => ({ taskId: t.task_id ?? '' }), sortKey: 'start',
  });
  instancesTable = new SortableTable($('report-instances'), INSTANCE_COLUMNS, {
    rowData: (i) => ({ instanceId: i.id ?? '' }), sortKey: 'running',
  });

  $('accounts').addEventListener('submit', createAccounts);
  $('accounts').addEventListener('input', (event) => event.target.removeAttribute('aria-invalid'));
  $('start-night').addEventListener('click', startNight);
  $('cancel-run').addEventListener('click', cancelRun);
  $('past-more').addEventListener('click', () => loadPastRuns({ more: true }));
  $('task-filter').addEventListener('change', renderTasks);
  $('report-reload').addEventListener('click', () => openReport(state.reportRunId, { pinned: state.reportPinned }));
  // The timeline is drawn to the page's width: redraw it when that changes.
  let resizeTimer;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.report && renderTimeline(state.report), 150);
  });

  const [, runs] = await Promise.all([loadInfo(), loadPastRuns()]);
  if (runs === null) {
    setStatus($('state-line'), $('past-status').textContent, 'error');
    return;
  }
  // The newest run is the current one.
  showCurrent(runs[0] ?? null);
  if (needsPolling(runs[0])) schedulePoll();
  else if (runs[0]) reportWhenEnded(runs[0]);
}

init();

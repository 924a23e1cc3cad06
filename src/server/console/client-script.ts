/**
 * The console's browser script (served as /console/assets/console.js): actions, live updates
 * and charts. Plain ES2020, no build step; it only talks to this server:
 *
 *  - buttons and forms with data-action="/v1/..." POST JSON to /console/api/v1/... with the
 *    session's CSRF token (x-csrf-token, from <meta name="csrf-token">), after a confirm() when
 *    they carry data-confirm; the outcome shows in #flash;
 *  - an EventSource on /console/live?<the page's view> replaces [data-live=KEY] fragments;
 *  - on a disk page, uPlot charts of RPO, data lag, churn and backlog from
 *    /console/api/v1/history (1 h / 24 h / 7 d), refreshed on live ticks; window.mobilityCharts
 *    holds the samples drawn (the browser test compares them with the API).
 */
export const CLIENT_SCRIPT = String.raw`'use strict';
(() => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute('content') : '';
  const flashEl = document.getElementById('flash');
  function flash(msg, cls) {
    if (!flashEl) return;
    flashEl.textContent = msg;
    flashEl.className = 'show ' + cls;
  }
  function describe(path, body, j) {
    if (path === '/v1/test-failover') {
      const pid = j.point && j.point.id;
      if (j.removed) return 'Test failover of ' + pid + ' cleaned up: ' + j.disks.length + ' image(s) removed.';
      return 'Test failover of ' + pid + ' ready: ' + j.disks.map((d) => d.diskId + ' at ' + d.location + ' (' + d.method + ')').join(', ');
    }
    if (path === '/v1/failover') return 'Failed over: ' + JSON.stringify(j).slice(0, 300);
    if (path === '/v1/enable') return 'Protection enabled: ' + j.agentId + '/' + j.diskId + ' (policy ' + j.policy + ')';
    if (path === '/v1/disable') return 'Protection disabled: ' + j.agentId + '/' + j.diskId + (j.replicaRemoved ? ', replica removed' : '');
    if (path === '/v1/cut') return 'Recovery point ' + j.point.id + ' (' + j.point.kind + ') recorded.';
    if (path === '/v1/policies') return 'Policy ' + j.policy.name + ' saved.';
    if (path === '/v1/policies/assign') return 'Policy ' + j.policy.name + ' assigned to ' + j.agentId + '.';
    return 'Done.';
  }
  async function act(path, body, button) {
    if (button) button.disabled = true;
    flash('Running ' + path.replace('/v1/', '') + '…', 'busy');
    try {
      const r = await fetch('/console/api' + path, {
        method: 'POST', credentials: 'same-origin',
        headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
        body: JSON.stringify(body),
      });
      const j = await r.json().catch(() => ({ code: 'HTTP ' + r.status, message: r.statusText }));
      if (r.status === 401) { location.href = '/console/login'; return; }
      if (!r.ok) flash(j.code + ': ' + j.message, 'bad');
      else flash(describe(path, body, j), 'ok');
    } catch (err) {
      flash('The server did not answer: ' + err, 'bad');
    } finally {
      if (button) button.disabled = false;
    }
  }
  document.addEventListener('click', (e) => {
    const b = e.target.closest('button[data-action]');
    if (!b) return;
    e.preventDefault();
    if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
    act(b.dataset.action, JSON.parse(b.dataset.body || '{}'), b);
  });
  document.addEventListener('submit', (e) => {
    const f = e.target.closest('form[data-action]');
    if (!f) return;
    e.preventDefault();
    if (f.dataset.confirm && !confirm(f.dataset.confirm)) return;
    const body = {};
    for (const el of f.elements) {
      if (!el.name || el.value === '') continue;
      body[el.name] = el.dataset.scale ? Math.round(Number(el.value) * Number(el.dataset.scale)) : el.value;
    }
    act(f.dataset.action, body, f.querySelector('button[type=submit]'));
  });

  // live fragments
  const liveState = document.getElementById('live-state');
  const view = document.body.dataset.view;
  const tickers = [];
  if (view) {
    const es = new EventSource('/console/live?' + view);
    es.addEventListener('open', () => { if (liveState) liveState.className = 'live-state on'; });
    es.addEventListener('error', () => { if (liveState) liveState.className = 'live-state off'; });
    es.addEventListener('logout', () => { es.close(); location.href = '/console/login'; });
    es.addEventListener('fragments', (ev) => {
      const f = JSON.parse(ev.data);
      for (const [k, html] of Object.entries(f)) {
        for (const el of document.querySelectorAll('[data-live="' + k + '"]')) {
          if (el.tagName === 'SELECT') {
            const v = el.value;
            el.innerHTML = html;
            if ([...el.options].some((o) => o.value === v)) el.value = v;
          } else {
            el.innerHTML = html;
          }
        }
      }
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    });
    es.addEventListener('tick', (ev) => { for (const t of tickers) t(JSON.parse(ev.data).now); });
  }

  // charts
  const box = document.getElementById('charts');
  if (box && window.uPlot) {
    const agent = box.dataset.agent;
    const disk = box.dataset.disk;
    const note = document.getElementById('charts-note');
    const defs = [
      { key: 'rpo', title: 'RPO (s)', field: 'rpoMs', scale: 1 / 1000, color: '#c0392b' },
      { key: 'lag', title: 'Data lag (s)', field: 'dataLagMs', scale: 1 / 1000, color: '#d68910' },
      { key: 'churn', title: 'Churn (MiB/s)', field: 'churnBytesPerSec', scale: 1 / 1048576, color: '#2471a3' },
      { key: 'backlog', title: 'Backlog (MiB)', field: 'backlogBytes', scale: 1 / 1048576, color: '#7d3c98' },
    ];
    const plots = {};
    let range = '1h';
    let last = 0;
    let loading = false;
    async function load() {
      if (loading) return;
      loading = true;
      last = Date.now();
      try {
        const q = new URLSearchParams({ agent, disk, range });
        const r = await fetch('/console/api/v1/history?' + q, { credentials: 'same-origin' });
        if (r.status === 401) { location.href = '/console/login'; return; }
        const j = await r.json();
        if (!r.ok) { note.textContent = j.code + ': ' + j.message; return; }
        const samples = (j.series[0] && j.series[0].samples) || [];
        const xs = samples.map((s) => Date.parse(s.at) / 1000);
        const state = { range, fetchedAt: Date.now(), since: j.since, resolutionMs: j.resolutionMs, samples, plots: {} };
        for (const d of defs) {
          const ys = samples.map((s) => (s[d.field] === null ? null : s[d.field] * d.scale));
          const el = document.getElementById('chart-' + d.key);
          const data = [xs, ys];
          if (plots[d.key]) {
            plots[d.key].setData(data);
          } else {
            plots[d.key] = new uPlot({
              title: d.title, width: Math.max(300, el.clientWidth), height: 170,
              scales: { x: { time: true } },
              series: [{}, { label: d.title, stroke: d.color, width: 1.5, fill: d.color + '22', points: { show: samples.length < 90 } }],
              axes: [{}, { size: 56 }], legend: { show: true },
            }, data, el);
          }
          state.plots[d.key] = plots[d.key];
        }
        window.mobilityCharts = state;
        note.textContent = samples.length + ' samples of ' + Math.round(j.resolutionMs / 1000) + ' s since ' + j.since.replace('T', ' ').replace(/\.\d+Z$/, 'Z');
        box.dataset.samples = String(samples.length);
        box.dataset.loads = String(Number(box.dataset.loads || 0) + 1);
      } finally {
        loading = false;
      }
    }
    document.getElementById('ranges').addEventListener('click', (e) => {
      const b = e.target.closest('button[data-range]');
      if (!b) return;
      range = b.dataset.range;
      for (const x of document.querySelectorAll('#ranges button')) x.classList.toggle('on', x === b);
      load();
    });
    tickers.push(() => { if (Date.now() - last > 5000) load(); });
    window.addEventListener('resize', () => { for (const k in plots) plots[k].setSize({ width: Math.max(300, plots[k].root.parentElement.clientWidth), height: 170 }); });
    load();
  }
})();
`;

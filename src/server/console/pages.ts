/**
 * The console's pages: plain server-rendered HTML. Each page is a layout around sections; the
 * sections that change while the page is open are "live fragments" (data-live="KEY"), rendered
 * by the same functions for the first answer and for every server-sent update (live.ts), so the
 * browser never renders anything itself but the charts.
 *
 * Pages (all under /console, all behind the login):
 *   /                          overview: summary, every disk (state, progress, RPO against its threshold, lag,
 *                              backlog, churn), active alerts, machines
 *   /machine/AGENT             its disks, actions (enable, policy, cut, test failover, failover), the recovery
 *                              point timeline (crash/app), test-failover images, jobs, alerts, events
 *   /disk/AGENT/DISK           the disk's status, charts (RPO, data lag, churn, backlog; 1h/24h/7d), events
 *   /events  /jobs  /audit  /policies
 *
 * Every dynamic string goes through esc(). The page loads no inline script or style (the
 * Content-Security-Policy forbids them): console.js and console.css do the rest.
 */
import type { AlertRow, AuditRow, HistoryEvent } from '../config-db.js';
import type { DiskStatus } from '../disk-status.js';
import type { RecoveryPoint } from '../../target/catalog.js';
import type { PointImage } from '../../target/replica-store.js';
import { fmtBytes, fmtDuration } from '../../cli/progress.js';
import type { ConsoleServerView } from './console-view.js';
import { planFromDb, type Figures } from '../capacity.js';
import type { JobBoard } from './jobs.js';

export type View =
  | { page: 'overview' }
  | { page: 'machine'; agent: string }
  | { page: 'disk'; agent: string; disk: string }
  | { page: 'events' }
  | { page: 'jobs' }
  | { page: 'audit' }
  | { page: 'policies' }
  | { page: 'capacity'; rpo: string; retention: string; bandwidth: string }
  | { page: 'plans' };

/** What every render needs: the server's narrow view, the status of this moment and the jobs. */
export interface RenderData {
  server: ConsoleServerView;
  status: DiskStatus[];
  jobs: JobBoard;
  now: number;
}

export function esc(s: unknown): string {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c] as string));
}

const enc = encodeURIComponent;

function fmtMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return fmtDuration(ms / 1000);
}

function fmtTime(t: number | string | null): string {
  if (t === null) return '–';
  const d = typeof t === 'number' ? new Date(t) : new Date(t);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function fmtRate(bps: number | null): string {
  return bps === null ? '–' : `${fmtBytes(bps)}/s`;
}

/** The CSS class of a state: ok (green), busy (blue), warn (amber), bad (red), off (grey), fo (purple). */
function stateClass(state: string): string {
  switch (state) {
    case 'continuous': return 'ok';
    case 'initial-sync': case 'resyncing': return 'busy';
    case 'paused': case 'resync-required': case 'disconnected': return 'warn';
    case 'error': case 'target-unavailable': return 'bad';
    case 'failed-over': return 'fo';
    default: return 'off';
  }
}

/** An operator's one-word verdict on a disk: protected (continuous, a point within the threshold), at risk, syncing, ... */
export function healthOf(d: DiskStatus): { label: string; cls: string } {
  if (d.state === 'failed-over') return { label: 'failed over', cls: 'fo' };
  if (d.state === 'initial-sync' || d.state === 'resyncing') return { label: d.state === 'initial-sync' ? 'initial sync' : 'resyncing', cls: 'busy' };
  if (d.state === 'continuous' && d.latestPoint && !d.rpoAlert) return { label: 'protected', cls: 'ok' };
  if (d.state === 'continuous') return { label: d.latestPoint ? 'RPO exceeded' : 'no point yet', cls: 'warn' };
  return { label: d.state, cls: stateClass(d.state) };
}

function stateCell(d: DiskStatus): string {
  const h = healthOf(d);
  const progress = d.progressPermille !== null && (d.state === 'initial-sync' || d.state === 'resyncing')
    ? ` <progress max="1000" value="${d.progressPermille}"></progress> <span class="pct">${(d.progressPermille / 10).toFixed(1)}%</span>` : '';
  return `<span class="badge ${h.cls}" title="${esc(d.state)}${d.reason ? `: ${esc(d.reason)}` : ''}">${esc(h.label)}</span>${progress}`;
}

function rpoCell(d: DiskStatus): string {
  const cls = d.rpoMs === null ? 'warn' : d.rpoAlert ? 'bad' : d.rpoMs > d.rpoAlertMs * 0.7 ? 'warn' : 'ok';
  const v = d.rpoMs === null ? 0 : Math.min(d.rpoMs, d.rpoAlertMs * 1.5);
  return `<span class="rpo ${cls}">${fmtMs(d.rpoMs)}</span> <meter min="0" max="${d.rpoAlertMs * 1.5}" low="${d.rpoAlertMs * 0.7}" high="${d.rpoAlertMs}" optimum="0" value="${v}"></meter> <span class="dim">/ ${fmtMs(d.rpoAlertMs)}</span>`;
}

function diskLink(d: { agent: string; disk: string }): string {
  return `<a href="/console/disk/${enc(d.agent)}/${enc(d.disk)}">${esc(d.disk)}</a>`;
}

function machineLink(agent: string): string {
  return `<a href="/console/machine/${enc(agent)}">${esc(agent)}</a>`;
}

export function disksTable(disks: DiskStatus[], o: { machineColumn: boolean; actions?: boolean }): string {
  if (!disks.length) return '<p class="dim">No protected disks.</p>';
  const head = `<tr>${o.machineColumn ? '<th>Machine</th>' : ''}<th>Disk</th><th>State</th><th>RPO / threshold</th><th>Data lag</th><th>Backlog</th><th>Churn</th><th>Points</th><th>Latest point</th><th>Size</th>${o.actions ? '<th></th>' : ''}</tr>`;
  const rows = disks.map((d) => `<tr data-disk="${esc(d.agent)}/${esc(d.disk)}" data-state="${esc(d.state)}">`
    + (o.machineColumn ? `<td>${machineLink(d.agent)}</td>` : '')
    + `<td>${diskLink(d)}</td><td class="state">${stateCell(d)}</td><td>${rpoCell(d)}</td><td>${fmtMs(d.dataLagMs)}</td>`
    + `<td>${d.backlogBytes === null ? '–' : fmtBytes(d.backlogBytes)}</td><td>${fmtRate(d.churnBytesPerSec)}</td><td>${d.points}</td>`
    + `<td>${d.latestPoint ? `${esc(d.latestPoint)}${d.latestAppPoint === d.latestPoint ? ' <span class="tag app">app</span>' : ''}` : '–'}</td><td>${fmtBytes(d.sizeBytes)}</td>`
    + (o.actions ? `<td><button class="small danger" data-action="/v1/disable" data-body="${esc(JSON.stringify({ machine: d.agent, disk: d.disk }))}" data-confirm="Disable protection of ${esc(d.agent)}/${esc(d.disk)}? Its replica, its recovery points and test-failover images are deleted.">Disable</button></td>` : '')
    + '</tr>').join('');
  return `<table class="grid">${head}${rows}</table>`;
}

function alertsTable(alerts: AlertRow[], o: { empty: string }): string {
  if (!alerts.length) return `<p class="dim">${esc(o.empty)}</p>`;
  return `<table class="grid"><tr><th>Fired</th><th>Machine</th><th>Disk</th><th>Alert</th><th>Reason</th><th>Cleared</th></tr>${alerts.map((a) => `<tr class="${a.clearedAt === null ? 'active' : ''}">`
    + `<td>${fmtTime(a.firedAt)}</td><td>${machineLink(a.agentId)}</td><td>${diskLink({ agent: a.agentId, disk: a.diskId })}</td>`
    + `<td><span class="badge ${a.clearedAt === null ? 'bad' : 'off'}">${esc(a.kind)}</span></td><td>${esc(a.reason)}</td>`
    + `<td>${a.clearedAt === null ? '<b>active</b>' : `${fmtTime(a.clearedAt)} <span class="dim">${esc(a.clearReason ?? '')}</span>`}</td></tr>`).join('')}</table>`;
}

function eventsTable(events: HistoryEvent[]): string {
  if (!events.length) return '<p class="dim">No events.</p>';
  return `<table class="grid"><tr><th>Time</th><th>Machine</th><th>Disk</th><th>Event</th><th>State</th><th>Code</th><th>Reason</th></tr>${events.map((e) => '<tr>'
    + `<td>${fmtTime(e.t)}</td><td>${machineLink(e.agentId)}</td><td>${e.diskId ? diskLink({ agent: e.agentId, disk: e.diskId }) : ''}</td><td>${esc(e.kind)}</td>`
    + `<td>${e.state ? `<span class="badge ${stateClass(e.state)}">${esc(e.state)}</span>` : ''}</td><td>${esc(e.code ?? '')}</td><td>${esc(e.reason)}</td></tr>`).join('')}</table>`;
}

function jobsTable(d: RenderData, agent: string | null): string {
  const scans = d.jobs.scanJobs(agent === null ? d.status : d.status.filter((s) => s.agent === agent));
  const jobs = d.jobs.list(agent).slice(0, agent === null ? 200 : 20);
  if (!scans.length && !jobs.length) return '<p class="dim">No jobs.</p>';
  const scanRows = scans.map((s) => `<tr data-job="${esc(s.kind)}:${esc(s.agent)}/${esc(s.disk)}"><td>${esc(s.kind)}</td><td>${machineLink(s.agent)}/${diskLink(s)}</td><td><span class="badge busy">running</span></td>`
    + `<td><progress max="100" value="${s.pct.toFixed(1)}"></progress> ${s.pct.toFixed(1)}%</td><td>${fmtRate(s.bytesPerSec)}</td><td>${s.etaMs === null ? '–' : fmtMs(s.etaMs)}</td><td></td><td>${fmtBytes(s.sizeBytes)} disk</td></tr>`);
  const jobRows = jobs.map((j) => `<tr data-job="${j.id}" data-kind="${esc(j.kind)}" data-state="${j.state}"><td>${esc(j.kind)}</td><td>${esc(j.target)}</td>`
    + `<td><span class="badge ${j.state === 'running' ? 'busy' : j.state === 'succeeded' ? 'ok' : 'bad'}">${j.state}</span></td><td>${j.state === 'running' ? '<progress></progress>' : ''}</td><td></td>`
    + `<td>${fmtMs((j.endedAt ?? d.now) - j.startedAt)}</td><td>${esc(j.operator)}</td><td>${esc(j.summary)}</td></tr>`);
  return `<table class="grid"><tr><th>Job</th><th>Target</th><th>State</th><th>Progress</th><th>Throughput</th><th>ETA / took</th><th>By</th><th>Result</th></tr>${[...scanRows, ...jobRows].join('')}</table>`;
}

/** The recovery points of a machine on a time line (crash below, app above), then the newest ones as a table. */
function pointsTimeline(points: readonly RecoveryPoint[], now: number): string {
  if (!points.length) return '<p class="dim">No recovery points yet.</p>';
  const t0 = Date.parse(points[0].takenAt);
  const span = Math.max(60_000, now - t0);
  const x = (p: RecoveryPoint) => (((Date.parse(p.takenAt) - t0) / span) * 980 + 10).toFixed(1);
  const ticks = points.map((p) => `<line class="${p.kind}" x1="${x(p)}" x2="${x(p)}" y1="${p.kind === 'app' ? 4 : 18}" y2="${p.kind === 'app' ? 18 : 32}"><title>${esc(p.id)} ${esc(p.kind)} ${esc(p.takenAt)}</title></line>`).join('');
  const svg = `<svg class="timeline" viewBox="0 0 1000 48" preserveAspectRatio="none" role="img" aria-label="recovery points">`
    + `<line class="axis" x1="10" x2="990" y1="18" y2="18"></line>${ticks}</svg>`
    + `<div class="axis-labels"><span>${esc(fmtTime(t0))}</span><span><span class="tag app">app</span> ${points.filter((p) => p.kind === 'app').length} · <span class="tag crash">crash</span> ${points.filter((p) => p.kind !== 'app').length}</span><span>now</span></div>`;
  const rows = [...points].reverse().slice(0, 12).map((p) => `<tr><td>${esc(p.id)}</td><td><span class="tag ${p.kind}">${esc(p.kind)}</span></td><td>${fmtTime(p.takenAt)}</td><td>${p.frozenMs} ms</td><td>${Object.keys(p.disks).map(esc).join(', ')}</td><td class="dim">${esc(p.note)}</td></tr>`).join('');
  return `${svg}<table class="grid"><tr><th>Point</th><th>Kind</th><th>Taken (source clock)</th><th>Freeze</th><th>Disks</th><th>Note</th></tr>${rows}</table>`
    + (points.length > 12 ? `<p class="dim">${points.length - 12} older points not listed.</p>` : '');
}

function imagesTable(agent: string, imgs: PointImage[]): string {
  if (!imgs.length) return '<p class="dim">No test-failover images.</p>';
  const byPoint = new Map<string, PointImage[]>();
  for (const i of imgs) byPoint.set(i.pointId, [...(byPoint.get(i.pointId) ?? []), i]);
  return `<table class="grid"><tr><th>Point</th><th>Disk</th><th>Image</th><th>Made by</th><th></th></tr>${[...byPoint].map(([point, list]) => list.map((i, n) => `<tr data-image="${esc(point)}/${esc(i.diskId)}">`
    + `<td>${esc(point)}</td><td>${esc(i.diskId)}</td><td class="mono">${esc(i.location)}</td><td>${esc(i.method)} (${i.ms} ms)</td>`
    + (n === 0 ? `<td rowspan="${list.length}"><button class="small" data-action="/v1/test-failover" data-body="${esc(JSON.stringify({ agent, point, cleanup: true }))}" data-confirm="Delete the test-failover images of ${esc(point)}?">Clean up</button></td>` : '')
    + '</tr>').join('')).join('')}</table>`;
}

function summary(d: RenderData): string {
  const agents = new Set([...d.server.db.listAgents().map((a) => a.id), ...d.status.map((s) => s.agent)]);
  const count = (cls: string) => d.status.filter((s) => healthOf(s).cls === cls).length;
  const alerts = d.server.db.listAlerts({ active: true }).length;
  const tile = (n: number | string, label: string, cls: string) => `<div class="tile ${cls}"><b>${n}</b><span>${esc(label)}</span></div>`;
  return `<div class="tiles">${tile(agents.size, 'machines', '')}${tile(d.status.length, 'disks', '')}${tile(count('ok'), 'protected', 'ok')}`
    + `${tile(count('busy'), 'syncing', 'busy')}${tile(count('warn'), 'at risk', count('warn') ? 'warn' : '')}${tile(count('bad'), 'in error', count('bad') ? 'bad' : '')}`
    + `${tile(alerts, 'active alerts', alerts ? 'bad' : '')}</div>`;
}

function machinesTable(d: RenderData): string {
  const rows = d.server.db.listAgents();
  const known = new Set(rows.map((r) => r.id));
  const unregistered = [...new Set(d.status.map((s) => s.agent))].filter((a) => !known.has(a));
  if (!rows.length && !unregistered.length) return '<p class="dim">No machines registered yet (mobility register, or push-install).</p>';
  const diskCount = (a: string) => d.status.filter((s) => s.agent === a).length;
  return `<table class="grid"><tr><th>Machine</th><th>Host</th><th>Connected</th><th>Policy</th><th>Disks</th><th>Last seen</th></tr>`
    + rows.map((a) => `<tr><td>${machineLink(a.id)}</td><td>${esc(a.hostname)}</td><td>${d.server.control.connected(a.id) ? '<span class="badge ok">yes</span>' : '<span class="badge off">no</span>'}</td>`
      + `<td>${esc(a.policy ?? 'default')}</td><td>${diskCount(a.id)}</td><td>${fmtTime(a.lastSeen)}</td></tr>`).join('')
    + unregistered.map((a) => `<tr><td>${machineLink(a)}</td><td class="dim">not registered</td><td>–</td><td class="dim">server default</td><td>${diskCount(a)}</td><td>–</td></tr>`).join('')
    + '</table>';
}

/** The live fragments of a view, by key: what live.ts sends when one changed. */
export async function fragments(view: View, d: RenderData): Promise<Record<string, string>> {
  switch (view.page) {
    case 'overview':
      return {
        summary: summary(d), disks: disksTable(d.status, { machineColumn: true }), machines: machinesTable(d),
        alerts: alertsTable(d.server.db.listAlerts({ active: true }), { empty: 'No active alerts.' }), jobs: jobsTable(d, null),
      };
    case 'machine': {
      const a = view.agent;
      const registered = d.server.db.getAgent(a) !== null;
      let points: readonly RecoveryPoint[] = [];
      // only a machine the server knows has a catalog to show: one loaded for any id typed into
      // the address would stay in memory for good
      const known = registered || d.status.some((s) => s.agent === a);
      if (known) {
        try { points = (await d.server.catalog(a)).list(); } catch { /* no catalog yet */ }
      }
      let imgs: PointImage[] = [];
      try { imgs = await d.server.backend.images(a, 'test-failover'); } catch { /* store down: shown by the disks' state */ }
      const fo = await d.server.failoverState(a).catch(() => null);
      return {
        disks: disksTable(d.status.filter((s) => s.agent === a), { machineColumn: false, actions: registered }),
        points: pointsTimeline(points, d.now), pointChoice: pointOptions(points),
        images: imagesTable(a, imgs), jobs: jobsTable(d, a),
        failover: fo ? `<p class="badge fo">failed over to ${esc(fo.point)} at ${esc(fo.failedOverAt)}</p>` : '',
        alerts: alertsTable(d.server.db.listAlerts({ agentId: a, limit: 20 }), { empty: 'No alerts.' }),
        events: eventsTable(d.server.db.listEvents({ agentId: a, limit: 30 })),
      };
    }
    case 'disk': {
      const s = d.status.find((x) => x.agent === view.agent && x.disk === view.disk);
      return {
        disk: s ? disksTable([s], { machineColumn: true }) + diskFacts(s) : '<p class="dim">This disk has no replica on this server (disabled, or not protected yet).</p>',
        events: eventsTable(d.server.db.listEvents({ agentId: view.agent, diskId: view.disk, limit: 30 })),
      };
    }
    case 'events':
      return {
        alerts: alertsTable(d.server.db.listAlerts({ limit: 100 }), { empty: 'No alerts.' }),
        events: eventsTable(d.server.db.listEvents({ limit: 200 })),
      };
    case 'jobs':
      return { jobs: jobsTable(d, null) };
    default:
      return {};
  }
}

function pointOptions(points: readonly RecoveryPoint[]): string {
  return `<option value="latest">latest</option>${[...points].reverse().slice(0, 50).map((p) => `<option value="${esc(p.id)}">${esc(p.id)} · ${esc(p.kind)} · ${esc(fmtTime(p.takenAt))}</option>`).join('')}`;
}

function diskFacts(s: DiskStatus): string {
  const f: [string, string][] = [
    ['State', `${esc(s.state)}${s.reason ? ` — ${esc(s.reason)}` : ''}`], ['Connected', s.connected ? 'yes' : 'no'],
    ['Last health report', s.healthAgeMs === null ? '–' : `${fmtMs(s.healthAgeMs)} ago`], ['Latest point', `${esc(s.latestPoint ?? '–')} ${s.latestPointAt ? `(${esc(fmtTime(s.latestPointAt))})` : ''}`],
    ['Latest app-consistent point', esc(s.latestAppPoint ?? '–')], ['Stored in the target', s.storedBytes === null ? '–' : fmtBytes(s.storedBytes)],
    ['Last freeze', fmtMs(s.lastFreezeMs)], ['Freeze failures', String(s.freezeFailures)],
  ];
  return `<dl class="facts">${f.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join('')}</dl>`;
}

function live(key: string, html: string, cls = ''): string {
  return `<div data-live="${key}"${cls ? ` class="${cls}"` : ''}>${html}</div>`;
}

export interface PageShell { title: string; operator: string; csrf: string; view: View; body: string }

const NAV: [string, string][] = [['/console/', 'Overview'], ['/console/events', 'Events & alerts'], ['/console/jobs', 'Jobs'], ['/console/policies', 'Policies'], ['/console/plans', 'Recovery plans'], ['/console/capacity', 'Capacity'], ['/console/audit', 'Audit']];

function viewQuery(v: View): string {
  const q = new URLSearchParams({ page: v.page });
  if (v.page === 'machine' || v.page === 'disk') q.set('agent', v.agent);
  if (v.page === 'disk') q.set('disk', v.disk);
  return q.toString();
}

export function layout(p: PageShell): string {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="${esc(p.csrf)}"><title>${esc(p.title)} · Mobility</title>
<link rel="stylesheet" href="/console/assets/uPlot.min.css"><link rel="stylesheet" href="/console/assets/console.css">
<script src="/console/assets/uPlot.iife.min.js" defer></script><script src="/console/assets/console.js" defer></script></head>
<body data-view="${esc(viewQuery(p.view))}"><header><a class="brand" href="/console/">Mobility</a><nav>${NAV.map(([h, t]) => `<a href="${h}">${t}</a>`).join('')}</nav>
<span class="live-state" id="live-state" title="live updates">●</span>
<form method="post" action="/console/logout" class="logout"><input type="hidden" name="_csrf" value="${esc(p.csrf)}"><span>${esc(p.operator)}</span> <button type="submit" class="small">Log out</button></form></header>
<div id="flash" role="status"></div><main>${p.body}</main></body></html>`;
}

export function loginPage(o: { error?: string; name?: string }): string {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Log in · Mobility</title>
<link rel="stylesheet" href="/console/assets/console.css"></head><body class="login"><main><form method="post" action="/console/login" class="card login-form">
<h1>Mobility console</h1>${o.error ? `<p class="error" id="login-error">${esc(o.error)}</p>` : ''}
<label>Operator <input name="name" autocomplete="username" required value="${esc(o.name ?? '')}" autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button><p class="dim">Operators are created on the server with <code>mobility operator add NAME</code>.</p></form></main></body></html>`;
}

/** The body of a page (its live fragments filled in). */
export async function pageBody(view: View, d: RenderData): Promise<{ title: string; body: string }> {
  const f = await fragments(view, d);
  switch (view.page) {
    case 'overview':
      return {
        title: 'Overview',
        body: `${live('summary', f.summary)}<section><h2>Disks</h2>${live('disks', f.disks)}</section>`
          + `<section><h2>Active alerts</h2>${live('alerts', f.alerts)}</section><section><h2>Jobs</h2>${live('jobs', f.jobs)}</section>`
          + `<section><h2>Machines</h2>${live('machines', f.machines)}</section>`,
      };
    case 'machine': {
      const a = view.agent;
      const row = d.server.db.getAgent(a);
      const policies = d.server.db.listPolicies();
      const inv = row?.inventory as { os?: { distro?: string; release?: string; kernel?: string } } | null | undefined;
      const head = row
        ? `<p class="facts-line"><b>${esc(row.hostname)}</b> · ${d.server.control.connected(a) ? '<span class="badge ok">connected</span>' : '<span class="badge off">not connected</span>'} · policy <b>${esc(row.policy ?? 'default')}</b>`
          + `${inv?.os ? ` · ${esc(inv.os.distro ?? '')} ${esc(inv.os.release ?? '')} (kernel ${esc(inv.os.kernel ?? '?')})` : ''} · registered ${esc(fmtTime(row.registeredAt))}</p>`
        : '<p class="dim">Not registered with this configuration server (a <code>mobility protect</code> agent): enable, policy and cuts need a registered agent; test failover and failover work.</p>';
      const registeredActions = row ? `<form data-action="/v1/enable" class="inline"><input type="hidden" name="machine" value="${esc(a)}">
<label>Device <input name="disk" placeholder="/dev/sdb" required pattern="/.+"></label><label>Disk id <input name="diskId" placeholder="(from the device)"></label><button type="submit">Enable protection</button></form>
<form data-action="/v1/policies/assign" class="inline"><input type="hidden" name="machine" value="${esc(a)}"><label>Policy <select name="policy">${policies.map((p) => `<option${p.name === (row.policy ?? 'default') ? ' selected' : ''}>${esc(p.name)}</option>`).join('')}</select></label><button type="submit">Assign</button></form>
<form data-action="/v1/cut" class="inline"><input type="hidden" name="machine" value="${esc(a)}"><label>Cut <select name="kind"><option>crash</option><option>app</option></select></label><button type="submit">Take a recovery point now</button></form>` : '';
      return {
        title: a,
        body: `<h1>${esc(a)}</h1>${head}${live('failover', f.failover)}<section><h2>Disks</h2>${live('disks', f.disks)}</section>
<section class="actions"><h2>Actions</h2>${registeredActions}
<form data-action="/v1/test-failover" class="inline" id="test-failover-form"><input type="hidden" name="agent" value="${esc(a)}"><label>Point <select name="point" data-live="pointChoice">${f.pointChoice}</select></label>
<button type="submit" id="test-failover">Test failover</button></form>
<form data-action="/v1/failover" class="inline" data-confirm="Fail ${esc(a)} over? Replication stops and the point's images become the machine's live disks (reprotect to fail back)."><input type="hidden" name="agent" value="${esc(a)}">
<label>Point <select name="point" data-live="pointChoice">${f.pointChoice}</select></label><button type="submit" class="danger">Failover</button></form></section>
<section><h2>Recovery points</h2>${live('points', f.points)}</section><section><h2>Test-failover images</h2>${live('images', f.images)}</section>
<section><h2>Jobs</h2>${live('jobs', f.jobs)}</section><section><h2>Alerts</h2>${live('alerts', f.alerts)}</section><section><h2>Events</h2>${live('events', f.events)}</section>`,
      };
    }
    case 'disk':
      return {
        title: `${view.agent}/${view.disk}`,
        body: `<h1>${machineLink(view.agent)} / ${esc(view.disk)}</h1>${live('disk', f.disk)}
<section><h2>History <span class="ranges" id="ranges"><button data-range="1h" class="small on">1 h</button><button data-range="24h" class="small">24 h</button><button data-range="7d" class="small">7 d</button></span></h2>
<div id="charts" data-agent="${esc(view.agent)}" data-disk="${esc(view.disk)}"><div class="chart" id="chart-rpo"></div><div class="chart" id="chart-lag"></div><div class="chart" id="chart-churn"></div><div class="chart" id="chart-backlog"></div></div>
<p class="dim" id="charts-note"></p></section><section><h2>Events</h2>${live('events', f.events)}</section>`,
      };
    case 'events':
      return { title: 'Events & alerts', body: `<section><h2>Alerts</h2>${live('alerts', f.alerts)}</section><section><h2>Events</h2>${live('events', f.events)}</section>` };
    case 'jobs':
      return { title: 'Jobs', body: `<section><h2>Jobs</h2>${live('jobs', f.jobs)}</section>` };
    case 'audit':
      return { title: 'Audit', body: `<section><h2>Audit log</h2>${auditTable(d.server.db.listAudit({ limit: 500 }))}</section>` };
    case 'policies':
      return { title: 'Policies', body: policiesBody(d) };
    case 'capacity':
      return { title: 'Capacity', body: capacityBody(view, d) };
    case 'plans':
      return { title: 'Recovery plans', body: plansBody(d) };
  }
}

const mbit = (n: number | null) => (n === null ? '–' : `${((n * 8) / 1e6).toFixed(n * 8 < 1e7 ? 2 : 1)} Mbit/s`);

/** The capacity plan from the churn of profiled disks (GET /v1/capacity's figures), with what each rests on. */
function capacityBody(v: Extract<View, { page: 'capacity' }>, d: RenderData): string {
  const form = `<form method="get" action="/console/capacity" class="inline"><label>RPO <input name="rpo" value="${esc(v.rpo)}" placeholder="5m" size="6"></label>
<label>Retention <input name="retention" value="${esc(v.retention)}" placeholder="24h" size="6"></label><label>Link <input name="bandwidth" value="${esc(v.bandwidth)}" placeholder="100Mbit" size="9"></label><button type="submit">Plan</button></form>`;
  let plan: ReturnType<typeof planFromDb>;
  try {
    plan = planFromDb(d.server.db, { rpo: v.rpo, retention: v.retention, bandwidth: v.bandwidth }, d.now);
  } catch (err) {
    return `<section><h2>Capacity plan</h2>${form}<p class="badge bad">${esc((err as Error).message)}</p></section>`;
  }
  const intro = '<p class="dim">From the churn measured on profiled disks (<code>mobility enable --machine M --disk DEV --profile-only</code>: the agent tracks writes and ships nothing). Each figure shows the samples and the compression ratio it rests on; the same plan is <code>mobility capacity</code>.</p>';
  if (!plan.disks.length) return `<section><h2>Capacity plan</h2>${form}${intro}<p class="dim">No profiled disk and no churn measured yet.</p></section>`;
  const head = '<tr><th>Samples</th><th>Window</th><th>Ratio</th><th>Mean churn</th><th>P95</th><th>Peak</th><th>Bandwidth for the RPO</th><th>95 % of the time</th><th>Initial sync</th><th>Replica</th><th>Points</th></tr>';
  const cells = (f: Figures) => `<td>${f.basis.samples}${f.basis.incompleteSamples ? ` (+${f.basis.incompleteSamples} incomplete)` : ''}</td><td>${esc(fmtTime(f.basis.from))} – ${esc(fmtTime(f.basis.to))}</td>`
    + `<td>${f.basis.ratioAssumed ? '1.00 (assumed)' : f.basis.ratio.toFixed(2)}</td><td>${fmtRate(f.meanBytesPerSec)}</td><td>${fmtRate(f.p95BytesPerSec)}</td><td>${fmtRate(f.peakBytesPerSec)}</td>`
    + `<td>${mbit(f.bandwidthForRpoBytesPerSec)}</td><td>${mbit(f.bandwidthForRpoP95BytesPerSec)}</td><td>${f.initialSyncSeconds === null ? esc(f.initialSyncNote ?? '–') : fmtMs(f.initialSyncSeconds * 1000)}</td>`
    + `<td>${fmtBytes(f.replicaBytes)}</td><td>${f.recoveryPointBytes === null ? '–' : fmtBytes(f.recoveryPointBytes)}${f.recoveryPointNote ? ` <span class="dim">${esc(f.recoveryPointNote)}</span>` : ''}</td>`;
  const e = plan.estate;
  return `<section><h2>Capacity plan</h2>${form}${intro}
<p class="facts-line">Estate: <b>${e.machines}</b> machines, <b>${e.disks}</b> disks · bandwidth for an RPO of ${fmtMs(plan.options.rpoMs)}: <b>${mbit(e.bandwidthForRpoBytesPerSec)}</b> · storage for ${fmtMs(plan.options.retentionMs)}: <b>${e.storageBytes === null ? '–' : fmtBytes(e.storageBytes)}</b> · process servers: <b>${e.processServers ?? '–'}</b> <span class="dim">(${esc(e.processServersBasis)})</span></p>
<h3>Disks</h3><table class="grid" id="capacity-disks"><tr><th>Machine</th><th>Disk</th>${head.slice(4)}${plan.disks.map((x) => `<tr><td>${machineLink(x.agent)}</td><td>${esc(x.disk)}</td>${cells(x)}</tr>`).join('')}</table>
<h3>Machines</h3><table class="grid" id="capacity-machines"><tr><th>Machine</th><th>Host</th>${head.slice(4)}${plan.machines.map((x) => `<tr><td>${machineLink(x.agent)}</td><td>${esc(x.hostname ?? '–')}</td>${cells(x)}</tr>`).join('')}</table></section>`;
}

/** The recovery plans and their last runs (read-only: plans are made and run with mobility recovery-plan). */
function plansBody(d: RenderData): string {
  const plans = d.server.db.listPlans();
  if (!plans.length) return '<section><h2>Recovery plans</h2><p class="dim">No recovery plan yet: <code>mobility recovery-plan create --file PLAN.json</code>.</p></section>';
  return `<section><h2>Recovery plans</h2><p class="dim">Made and run with <code>mobility recovery-plan</code>; the last runs of each are shown here.</p>${plans.map((p) => {
    const spec = p.spec as { group?: string | null; steps?: { machines: string[]; pre?: string | null; post?: string | null; bootCheck?: unknown }[] };
    const runs = d.server.db.listPlanRuns(p.name, 5);
    const steps = (spec.steps ?? []).map((s, i) => `<tr><td>${i + 1}</td><td>${s.machines.map(machineLink).join(', ')}</td><td>${esc(s.pre ?? '–')}</td><td>${esc(s.post ?? '–')}</td><td>${s.bootCheck ? 'yes' : '–'}</td></tr>`).join('');
    const runRows = runs.map((r) => {
      const rep = r.report as { failure?: string | null; groupPoint?: string | null } | null;
      return `<tr><td>${esc(r.id)}</td><td>${esc(r.kind)}</td><td>${esc(fmtTime(r.startedAt))}</td><td>${r.ok === null ? '<span class="badge busy">running</span>' : r.ok ? '<span class="badge ok">ok</span>' : '<span class="badge bad">failed</span>'}</td><td>${esc(rep?.groupPoint ?? '–')}</td><td class="dim">${esc(rep?.failure ?? '')}</td></tr>`;
    }).join('');
    return `<h3>${esc(p.name)} <span class="dim">${spec.group ? `group ${esc(spec.group)}` : 'no group'}</span></h3><table class="grid plan-steps"><tr><th>Step</th><th>Machines</th><th>Pre</th><th>Post</th><th>Boot check</th></tr>${steps}</table>`
      + (runs.length ? `<table class="grid plan-runs"><tr><th>Run</th><th>Kind</th><th>Started</th><th>Result</th><th>Group point</th><th>Why</th></tr>${runRows}</table>` : '<p class="dim">Never run.</p>');
  }).join('')}</section>`;
}

function auditTable(rows: AuditRow[]): string {
  if (!rows.length) return '<p class="dim">Nothing audited yet.</p>';
  return `<table class="grid" id="audit"><tr><th>Time</th><th>Operator</th><th>From</th><th>Action</th><th>Target</th><th>Result</th><th>Detail</th></tr>${rows.map((r) => `<tr data-action="${esc(r.action)}" data-result="${esc(r.result)}">`
    + `<td>${fmtTime(r.t)}</td><td>${esc(r.operator)}</td><td>${esc(r.source)}</td><td>${esc(r.action)}</td><td>${esc(r.target)}</td>`
    + `<td><span class="badge ${r.result === 'ok' ? 'ok' : 'bad'}">${esc(r.result)}</span></td><td class="dim">${esc(r.detail)}</td></tr>`).join('')}</table>`;
}

function policiesBody(d: RenderData): string {
  const ps = d.server.db.listPolicies();
  const rows = ps.map((p) => `<tr><td>${esc(p.name)}</td><td>${fmtMs(p.rpoThresholdMs)}</td><td>${fmtMs(p.retentionMs)}</td><td>${fmtMs(p.crashIntervalMs)}</td><td>${p.appIntervalMs ? fmtMs(p.appIntervalMs) : 'none'}</td>`
    + `<td>${esc(p.compressMode)}</td><td>${p.bandwidthBytes ? fmtRate(p.bandwidthBytes) : 'unlimited'}</td><td>${fmtMs(p.freezeLimitMs)}</td><td>${fmtBytes(p.spoolBudgetBytes)}</td></tr>`).join('');
  const sec = (name: string, label: string, v: number) => `<label>${label} (s) <input name="${name}" type="number" min="0" step="1" value="${Math.round(v / 1000)}" data-scale="1000"></label>`;
  const def = ps.find((p) => p.name === 'default') ?? ps[0];
  return `<section><h2>Policies</h2><table class="grid"><tr><th>Name</th><th>RPO threshold</th><th>Retention</th><th>Crash interval</th><th>App interval</th><th>Compress</th><th>Bandwidth</th><th>Freeze limit</th><th>Spool budget</th></tr>${rows}</table></section>
<section class="actions"><h2>Create or change a policy</h2><p class="dim">Saving an existing name changes it; machines under it get the change at once.</p>
<form data-action="/v1/policies" class="inline"><label>Name <input name="name" required pattern="[A-Za-z0-9._-]{1,64}" value="${esc(def?.name ?? '')}"></label>
${def ? `${sec('rpoThresholdMs', 'RPO threshold', def.rpoThresholdMs)}${sec('retentionMs', 'Retention', def.retentionMs)}${sec('crashIntervalMs', 'Crash interval', def.crashIntervalMs)}${sec('appIntervalMs', 'App interval', def.appIntervalMs)}` : ''}
<label>Compress <select name="compressMode">${['auto', 'always', 'never'].map((m) => `<option${def?.compressMode === m ? ' selected' : ''}>${m}</option>`).join('')}</select></label>
<button type="submit">Save policy</button></form></section>`;
}

/**
 * The server's operator API: JSON over the same HTTPS listener as the agents'
 * WebSocket endpoint, authenticated with `Authorization: Bearer <token>`.
 *
 *   GET  /v1/status                      every agent's disks: state, RPO, data lag, backlog, churn
 *   GET  /v1/points?agent=A              recovery points of an agent
 *   GET  /v1/history?agent=A&disk=D&range=1h|24h|7d   health samples per disk (RPO, lag, backlog, churn, state)
 *   GET  /v1/events?since=T&limit=N      events, newest first
 *   GET  /v1/alerts?active=1             RPO alerts, newest first
 *   POST /v1/test-failover               {agent, point, cleanup?, download?, networkMap?, bootCheck?}: materialise (or remove)
 *                                        writable images; optionally write a network mapping into them and boot them;
 *                                        {group, point (a group point, latest or latest-app), ...}: every machine of a group at one group point
 *   GET  /v1/test-failovers?agent=A      the recorded network mappings and boot checks of an agent's test failovers
 *   GET  /metrics                        Prometheus text exposition (server/metrics.ts); the read-only
 *                                        metrics token (DATA-DIR/metrics-token) or the operator token
 *   /  and  /console/...                 the operator console (server/console/): its own login, no bearer token
 *
 * Errors answer {code, message} with a status from the code. The handler never
 * throws: a bad request cannot disturb replication.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { constants as fsConstants } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, toMobilityError } from '../../errors.js';
import type { RecoveryPoint } from '../../target/catalog.js';
import type { PointImage } from '../../target/replica-store.js';
import type { AlertRow } from '../config-db.js';
import type { ServerContext } from '../context.js';
import { failback, failover, materializePoint } from '../failover.js';
import type { InventoryNic } from '../../agent/inventory.js';
import { resolveNics } from '../recovery/network-mapping.js';
import { checkRecoveredMachine, parseMachineChecks, type MachineCheckDeps, type MachineChecks } from '../recovery/recovered-machine.js';
import { readTestFailovers, type TestFailoverRecord } from '../recovery/test-failover-record.js';
import { handleConfigApi, listGroupPoints } from './config-api.js';
import { handlePlanApi, holdMachines } from './plan-api.js';
import { authorized, readBody, send, statusFor } from './http-util.js';
import type { DiskStatus } from '../disk-status.js';

export type { DiskStatus };

export { readBody, send } from './http-util.js';

function agentParam(v: unknown): string {
  if (typeof v !== 'string' || !ID_PATTERN.test(v)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `agent id ${JSON.stringify(v)} is not [A-Za-z0-9._-]{1,64}`);
  return v;
}


/**
 * Status of every disk of every agent the server has a replica for. While the replica store does
 * not answer, the last listing it gave is shown, each disk as target-unavailable with the reason.
 */
export async function collectStatus(server: ServerContext): Promise<DiskStatus[]> {
  const out: DiskStatus[] = [];
  const now = Date.now();
  const listing = await server.listing.get();
  const targetDown = listing.error ? `${listing.error.code}: ${listing.error.message}` : null;
  const disks = [...listing.disks];
  if (targetDown || listing.pending) {
    // the store cannot list now: disks the server knows from their sessions are shown all the same
    const listed = new Set(disks.map((d) => `${d.agentId}/${d.diskId}`));
    for (const [agentId, diskId] of server.health.all()) {
      if (!listed.has(`${agentId}/${diskId}`)) disks.push({ agentId, diskId, stat: null, error: null });
    }
  }
  for (const ld of disks) {
    const { agentId: agent, diskId: disk } = ld;
    const st = ld.stat ?? { sizeBytes: 0, initialComplete: false, storedBytes: null };
    const cat = await server.catalog(agent);
    const fo = await server.failoverState(agent);
    const pts = cat.list().filter((p) => p.disks[disk]);
    const latest = pts[pts.length - 1] ?? null;
    const latestApp = [...pts].reverse().find((p) => p.kind === 'app') ?? null;
    const h = server.health.get(agent, disk);
    const rpoMs = latest ? Math.max(0, now - Date.parse(latest.takenAt)) : null;
    const rpoAlertMs = server.rpoAlertFor(agent);
    // a paused target is the reason even after the session ended: say it rather than 'disconnected'
    let state = fo ? 'failed-over' : h ? (h.connected || h.state === 'target-unavailable' ? h.state : 'disconnected') : st.initialComplete ? 'disconnected' : 'initial-sync';
    let reason = fo ? `failed over to ${fo.point} at ${fo.failedOverAt}` : h?.reason ?? '';
    if (ld.error && !fo) {
      state = 'error';
      reason = `${ld.error.code}: ${ld.error.message}`;
    } else if (targetDown && !fo) {
      state = 'target-unavailable';
      reason = targetDown;
    }
    out.push({
      agent, disk, sizeBytes: st.sizeBytes, initialComplete: st.initialComplete, storedBytes: st.storedBytes,
      state, reason, connected: h?.connected ?? false, healthAgeMs: h ? now - h.receivedAt : null,
      rpoMs, rpoAlertMs, rpoAlert: rpoMs === null || rpoMs > rpoAlertMs, latestPoint: latest?.id ?? null, latestAppPoint: latestApp?.id ?? null, points: pts.length,
      latestPointAt: latest?.takenAt ?? null,
      dataLagMs: h?.dataLagMs ?? null, backlogBytes: h?.backlogBytes ?? null, churnBytesPerSec: h?.churnBytesPerSec ?? null,
      freezeFailures: h?.freezeFailures ?? 0, lastFreezeMs: h?.lastFreezeMs ?? null, progressPermille: h?.progressPermille ?? null,
    });
  }
  return out;
}

const RANGES: Record<string, number> = { '1h': 3600_000, '24h': 24 * 3600_000, '7d': 7 * 24 * 3600_000 };

/** One point of a disk's history (a sample: the aggregate of its window). */
export interface HistoryPoint {
  /** Start of the sample's window (ISO 8601) and its length. */
  at: string; resMs: number;
  rpoMs: number | null; dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; state: string;
}

export interface HistorySeries { agent: string; disk: string; samples: HistoryPoint[] }

/**
 * Samples of the last range per disk, oldest first: 10 s samples for 1h and 24h (1-minute ones
 * where only those are kept), 1-minute samples for 7d (10 s samples folded: max RPO, lag and
 * backlog, mean churn, last state).
 */
export function collectHistory(server: ServerContext, o: { agent: string | null; disk: string | null; range: string }): { range: string; since: string; resolutionMs: number; series: HistorySeries[] } {
  const span = RANGES[o.range];
  if (!span) throw new MobilityError('MOB_ERR_USAGE', `range must be 1h, 24h or 7d, got ${JSON.stringify(o.range)}`);
  const sinceMs = Date.now() - span;
  const rows = server.db.historySamples({ agentId: o.agent, diskId: o.disk, sinceMs });
  const fold = o.range === '7d' ? 60_000 : 0;
  const series: HistorySeries[] = [];
  let cur: HistorySeries | null = null;
  let churnN = 0;
  const mx = (a: number | null, b: number | null) => (a === null ? b : b === null ? a : Math.max(a, b));
  for (const r of rows) {
    if (!cur || cur.agent !== r.agentId || cur.disk !== r.diskId) {
      cur = { agent: r.agentId, disk: r.diskId, samples: [] };
      series.push(cur);
    }
    const t = fold ? Math.floor(r.t / fold) * fold : r.t;
    const last = cur.samples[cur.samples.length - 1];
    if (fold && last && Date.parse(last.at) === t) {
      last.rpoMs = mx(last.rpoMs, r.rpoMs); last.dataLagMs = mx(last.dataLagMs, r.dataLagMs); last.backlogBytes = mx(last.backlogBytes, r.backlogBytes);
      if (r.churnBytesPerSec !== null) { last.churnBytesPerSec = ((last.churnBytesPerSec ?? 0) * churnN + r.churnBytesPerSec) / (churnN + 1); churnN++; }
      last.state = r.state;
      continue;
    }
    churnN = r.churnBytesPerSec === null ? 0 : 1;
    cur.samples.push({ at: new Date(t).toISOString(), resMs: fold ? Math.max(fold, r.resMs) : r.resMs, rpoMs: r.rpoMs, dataLagMs: r.dataLagMs, backlogBytes: r.backlogBytes, churnBytesPerSec: r.churnBytesPerSec, state: r.state });
  }
  return { range: o.range, since: new Date(sinceMs).toISOString(), resolutionMs: fold || server.history.windowMs, series };
}

/** An alert as the API answers it. */
export function alertView(a: AlertRow) {
  return {
    id: a.id, agent: a.agentId, disk: a.diskId, kind: a.kind, active: a.clearedAt === null, firedAt: new Date(a.firedAt).toISOString(),
    clearedAt: a.clearedAt === null ? null : new Date(a.clearedAt).toISOString(), rpoMs: a.rpoMs, thresholdMs: a.thresholdMs, reason: a.reason, clearReason: a.clearReason,
  };
}

function optId(v: string | null, what: string): string | null {
  if (v === null || v === '') return null;
  if (!ID_PATTERN.test(v)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `${what} ${JSON.stringify(v)} is not [A-Za-z0-9._-]{1,64}`);
  return v;
}

/** since= as an ISO 8601 time or ms since the epoch. */
function sinceParam(v: string | null): number {
  if (v === null || v === '') return 0;
  const n = /^\d+$/.test(v) ? Number(v) : Date.parse(v);
  if (!Number.isFinite(n)) throw new MobilityError('MOB_ERR_USAGE', `since must be an ISO 8601 time or ms since the epoch, got ${JSON.stringify(v)}`);
  return n;
}

export interface TestFailoverResult {
  point: RecoveryPoint;
  /** The images made (or removed, with cleanup), one per disk of the point. */
  disks: PointImage[];
  /** With download: the local sparse files written, per disk. */
  downloads: { diskId: string; file: string; bytes: number; ms: number }[];
  removed: boolean;
  /** With a network mapping or a boot check: what was done and proved (also kept, see GET /v1/test-failovers). */
  record?: TestFailoverRecord;
}

/**
 * Test failover of a point: the backend makes a writable image of every disk (a file under
 * <data-dir>/test-failover/<agent>/<point>/, or a page blob copied from the point's snapshot).
 * With download, each image is also written as a local sparse file <dir>/<disk>.img (the server
 * writes it: give a directory on the server). With cleanup, the point's images are deleted.
 */
/** Creates the directory test-failover downloads go to (mode 0700 when new) and checks it is writable: MOB_ERR_CONFIG otherwise. */
async function prepareDownloadDir(dir: string): Promise<void> {
  try {
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    await fsp.access(dir, fsConstants.W_OK);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOSPC' || e.code === 'EDQUOT') throw toMobilityError(err);
    throw new MobilityError('MOB_ERR_CONFIG', `cannot write test-failover downloads to ${dir} on the server: ${e.code ?? e.message} (give a writable directory of the server machine)`);
  }
}

/** What the network mapping and boot check of a recovered machine need from the server. */
export function machineCheckDeps(server: ServerContext): MachineCheckDeps {
  return {
    log: server.log, agentDir: (a: string) => server.agentDir(a), inventoryNics: (a: string) => inventoryNics(server, a),
    // not under replicas/<agent>/: with the file store its subdirectories are the agent's disks
    consoleDir: (a: string) => path.join(server.dataDir, 'boot-checks', a), scratch: path.join(server.dataDir, 'mnt'),
  };
}

/** The NICs the configuration server's inventory holds for the agent ([] for an agent that never registered). */
export function inventoryNics(server: ServerContext, agent: string): InventoryNic[] {
  const inv = server.db.getAgent(agent)?.inventory as { nics?: unknown } | null | undefined;
  return Array.isArray(inv?.nics) ? (inv.nics as InventoryNic[]).filter((n) => n && typeof n === 'object' && typeof n.mac === 'string') : [];
}

export async function testFailover(server: ServerContext, agent: string, ref: string, o: {
  cleanup?: boolean; download?: string | null; progress?: (diskId: string, done: number, total: number) => void;
  checks?: MachineChecks; onConsole?: (diskId: string, line: string) => void;
} = {}): Promise<TestFailoverResult> {
  const checks = o.checks && (o.checks.networkMap || o.checks.boot) ? o.checks : null;
  if (checks && o.cleanup) throw new MobilityError('MOB_ERR_USAGE', 'a network mapping or boot check goes with making images, not with cleanup');
  if (checks && !o.download && server.backend.kind !== 'file') {
    throw new MobilityError('MOB_ERR_USAGE', `the ${server.backend.kind} replica store keeps test-failover images remotely: a network mapping or boot check needs them downloaded (give download)`);
  }
  // a mapping that covers no NIC of the machine fails before anything is made
  if (checks?.networkMap) resolveNics(checks.networkMap, inventoryNics(server, agent));
  // the images are made under the agent's lock (a cut waits for it); a download, which can take
  // hours for a large disk, runs after the lock is released so replication and cuts go on
  const made = await server.withAgentLock(agent, async () => {
    const cat = await server.catalog(agent);
    const point = cat.resolve(ref);
    if (o.cleanup) {
      const imgs = (await server.backend.images(agent, 'test-failover')).filter((i) => i.pointId === point.id);
      for (const img of imgs) await server.backend.removeImage(img);
      server.log.info('test failover images removed', { agent, point: point.id, disks: imgs.map((i) => i.diskId) });
      return { point, disks: imgs, removed: true };
    }
    // the download directory is made (and checked writable) before any image is, so a bad one costs nothing
    if (o.download) await prepareDownloadDir(o.download);
    return { point, disks: await materializePoint(server, agent, point, 'test-failover'), removed: false };
  });
  const { point, disks } = made;
  if (made.removed) return { point, disks, downloads: [], removed: true };
  const downloads: TestFailoverResult['downloads'] = [];
  if (o.download) {
    for (const img of disks) {
      const file = path.join(o.download, `${img.diskId}.img`);
      const r = await server.backend.download(img, file, (done, total) => o.progress?.(img.diskId, done, total))
        .catch((err: unknown) => { throw toMobilityError(err, 'MOB_ERR_STORAGE'); });
      downloads.push({ diskId: img.diskId, file, ...r });
    }
  }
  server.log.info('test failover image ready', { agent, point: point.id, disks: disks.map((d) => ({ disk: d.diskId, location: d.location, method: d.method, ms: d.ms, undoRecords: d.undoRecords })), downloads: downloads.map((d) => d.file) });
  if (!checks) return { point, disks, downloads, removed: false };
  // the downloaded copy when there is one (what the operator keeps), else the backend's local image
  const images = disks.map((d) => ({ diskId: d.diskId, file: downloads.find((x) => x.diskId === d.diskId)?.file ?? d.localPath }));
  const missing = images.filter((i) => i.file === null);
  if (missing.length) throw new MobilityError('MOB_ERR_BOOT_CHECK', `no local image of disk(s) ${missing.map((i) => i.diskId).join(', ')} to map or boot (give download)`);
  const record = await checkRecoveredMachine(machineCheckDeps(server), agent, point, images as { diskId: string; file: string }[], checks, o.onConsole);
  return { point, disks, downloads, removed: false, record };
}

export interface GroupTestFailoverResult {
  group: string;
  /** The group point (the same on every machine). */
  point: string;
  kind: 'crash' | 'app';
  takenAt: string;
  /** One test failover per machine of the group point, each at that machine's part of it. */
  machines: ({ agentId: string } & TestFailoverResult)[];
  removed: boolean;
}

/**
 * Test failover of a consistency group: every machine of one group point. ref is a group point
 * id, latest or latest-app (the newest complete group point, of any kind or app-consistent on
 * every machine). Only complete group points (every member recorded its part) are offered. With
 * download, each machine's images go to DOWNLOAD/<agent>/.
 */
export async function groupTestFailover(server: ServerContext, group: string, ref: string, o: { cleanup?: boolean; download?: string | null; progress?: (diskId: string, done: number, total: number) => void } = {}): Promise<GroupTestFailoverResult> {
  const all = await listGroupPoints(server, group);
  const complete = all.filter((p) => p.complete);
  let gp: (typeof all)[number] | undefined;
  if (ref === 'latest') gp = complete[complete.length - 1];
  else if (ref === 'latest-app') gp = [...complete].reverse().find((p) => p.kind === 'app');
  else {
    gp = all.find((p) => p.id === ref);
    if (gp && !gp.complete) {
      throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `group point ${ref} is incomplete (recorded on ${Object.keys(gp.points).join(', ') || 'no machine'} of ${gp.members.join(', ')}): a group test failover needs every machine at the same point`);
    }
  }
  if (!gp) {
    throw new MobilityError('MOB_ERR_UNKNOWN_POINT', ref.startsWith('latest') ? `group ${group} has no complete ${ref === 'latest-app' ? 'app-consistent ' : ''}group point yet (mobility group cut ${group})` : `group ${group} has no group point ${ref} (see mobility points --group ${group})`);
  }
  const machines: GroupTestFailoverResult['machines'] = [];
  for (const agentId of gp.members) {
    const r = await testFailover(server, agentId, gp.points[agentId]!.id, {
      cleanup: o.cleanup, download: o.download ? path.join(o.download, agentId) : null,
      progress: o.progress ? (d, done, total) => o.progress!(`${agentId}/${d}`, done, total) : undefined,
    });
    machines.push({ agentId, ...r });
  }
  server.log.info(o.cleanup ? 'group test failover images removed' : 'group test failover ready', { group, point: gp.id, machines: machines.map((m) => `${m.agentId}:${m.point.id}`) });
  return { group, point: gp.id, kind: gp.kind, takenAt: gp.takenAt, machines, removed: Boolean(o.cleanup) };
}

/**
 * Answers one request of the listener. operator: the request was already authenticated as an
 * operator's (the console's session, see console/console-service.ts): no bearer token needed.
 */
export async function handleApi(server: ServerContext, req: IncomingMessage, res: ServerResponse, o: { operator?: boolean } = {}): Promise<void> {
  try {
    const url = new URL(req.url ?? '/', 'http://x');
    // the operator console (its own login and sessions; never the bearer token)
    if (!o.operator && (url.pathname === '/' || url.pathname === '/console' || url.pathname.startsWith('/console/'))) {
      await server.operatorConsole.handle(req, res, url);
      return;
    }
    if (url.pathname === '/v1/replicate') {
      send(res, 426, { code: 'MOB_ERR_USAGE', message: 'connect with a WebSocket to /v1/replicate' });
      return;
    }
    // unauthenticated: server time (preflight clock check) and registration (its own secret, rate limited)
    if (req.method === 'GET' && url.pathname === '/v1/time') {
      send(res, 200, { nowMs: Date.now() });
      return;
    }
    if (req.method === 'POST' && (url.pathname === '/v1/register/challenge' || url.pathname === '/v1/register')) {
      if (!server.identity) throw new MobilityError('MOB_ERR_CONFIG', 'registration needs TLS (the server runs with --no-tls)');
      const b = await readBody(req);
      const ip = req.socket.remoteAddress ?? '?';
      send(res, 200, url.pathname === '/v1/register' ? await server.registry.register(b, ip) : await server.registry.challenge(b, ip));
      return;
    }
    if (req.method === 'GET' && url.pathname === '/metrics') {
      // the metrics token (read-only, for Prometheus) or the operator token
      req.resume();
      if (!authorized(server.metricsToken, req) && !authorized(server.token, req)) throw new MobilityError('MOB_ERR_AUTH', 'missing or wrong bearer token (GET /metrics takes DATA-DIR/metrics-token or the operator token)');
      const body = await server.metrics.render();
      res.writeHead(200, { 'content-type': server.metrics.contentType });
      res.end(body);
      return;
    }
    if (!o.operator && !authorized(server.token, req)) {
      req.resume();
      throw new MobilityError('MOB_ERR_AUTH', 'missing or wrong bearer token');
    }
    if (req.method === 'GET' && url.pathname === '/v1/status') {
      const disks = await collectStatus(server);
      const ls = server.listing.state();
      const target = {
        kind: server.backend.kind, location: server.backend.location, listedAt: ls.at === null ? null : new Date(ls.at).toISOString(),
        error: ls.error ? { code: ls.error.code, message: ls.error.message } : null,
        /** a listing of the store is still running (slow store): the disks are as last listed */
        listing: ls.pending,
      };
      // the active alerts too (newest first): mobility status shows them without a second request
      // the last test failover of each agent that mapped a network or booted (what a DR drill proved)
      const agents = [...new Set(disks.map((d) => d.agent))];
      const testFailovers = (await Promise.all(agents.map((a) => readTestFailovers(server.agentDir(a), a).then((r) => r[r.length - 1] ?? null, () => null))))
        .filter((r): r is TestFailoverRecord => r !== null);
      send(res, 200, { disks, target, rpoAlertMs: server.rpoAlertMs, retentionMs: server.retentionMs, alerts: server.db.listAlerts({ active: true }).map(alertView), testFailovers });
    } else if (req.method === 'GET' && url.pathname === '/v1/history') {
      const q = url.searchParams;
      send(res, 200, collectHistory(server, { agent: optId(q.get('agent'), 'agent id'), disk: optId(q.get('disk'), 'disk id'), range: q.get('range') || '1h' }));
    } else if (req.method === 'GET' && url.pathname === '/v1/events') {
      const q = url.searchParams;
      const limit = q.get('limit') ? Number(q.get('limit')) : 100;
      if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw new MobilityError('MOB_ERR_USAGE', `limit must be a whole number from 1 to 10000, got ${JSON.stringify(q.get('limit'))}`);
      const events = server.db.listEvents({ sinceMs: sinceParam(q.get('since')), limit, agentId: optId(q.get('agent'), 'agent id'), diskId: optId(q.get('disk'), 'disk id') });
      send(res, 200, { events: events.map((e) => ({ id: e.id, at: new Date(e.t).toISOString(), agent: e.agentId, disk: e.diskId, kind: e.kind, state: e.state, code: e.code, reason: e.reason })) });
    } else if (req.method === 'GET' && url.pathname === '/v1/alerts') {
      const q = url.searchParams;
      const active = q.get('active') === '1' || q.get('active') === 'true';
      send(res, 200, { alerts: server.db.listAlerts({ active, agentId: optId(q.get('agent'), 'agent id') }).map(alertView) });
    } else if (req.method === 'GET' && url.pathname === '/v1/points') {
      const agent = agentParam(url.searchParams.get('agent'));
      send(res, 200, { agent, points: (await server.catalog(agent)).list() });
    } else if (req.method === 'POST' && url.pathname === '/v1/failover') {
      const b = await readBody(req);
      const agent = agentParam(b.agent);
      const ref = typeof b.point === 'string' && b.point ? b.point : 'latest';
      // one recovery of a machine at a time (a plan's run, a test failover, a failover)
      const release = holdMachines([agent], 'a failover');
      try {
        send(res, 200, await failover(server, agent, ref, b.finalCut !== false));
      } finally {
        release();
      }
    } else if (req.method === 'POST' && url.pathname === '/v1/failback') {
      const b = await readBody(req);
      send(res, 200, await failback(server, agentParam(b.agent)));
    } else if (req.method === 'POST' && url.pathname === '/v1/test-failover') {
      const b = await readBody(req);
      if (b.group !== undefined && b.group !== null && (typeof b.group !== 'string' || !b.group)) throw new MobilityError('MOB_ERR_USAGE', 'group must be a group name');
      const group = typeof b.group === 'string' ? optId(b.group, 'group') : null;
      if (group !== null && b.agent !== undefined && b.agent !== null) throw new MobilityError('MOB_ERR_USAGE', 'give agent or group, not both');
      const agent = group === null ? agentParam(b.agent) : '';
      const ref = typeof b.point === 'string' && b.point ? b.point : 'latest';
      const run = (o: { cleanup: boolean; download: string | null; checks: MachineChecks; onConsole?: (diskId: string, line: string) => void; progress?: (diskId: string, done: number, total: number) => void }): Promise<object> => {
        if (group === null) return testFailover(server, agent, ref, o);
        if (o.checks && (o.checks.networkMap || o.checks.boot)) throw new MobilityError('MOB_ERR_USAGE', 'a network mapping or boot check of a group runs per machine, in boot order: use a recovery plan');
        return groupTestFailover(server, group, ref, o);
      };
      let download: string | null = null;
      if (b.download !== undefined && b.download !== null) {
        if (typeof b.download !== 'string' || !path.isAbsolute(b.download)) throw new MobilityError('MOB_ERR_USAGE', 'download must be an absolute directory on the server');
        download = b.download;
      }
      const checks = parseMachineChecks(b);
      // one recovery of a machine at a time (a plan's run, a test failover or its cleanup, a
      // failover): held before any answer starts, so a refusal is a plain error
      const release = holdMachines(group === null ? [agent] : server.db.getGroup(group).members, b.cleanup === true ? 'a test failover cleanup' : 'a test failover');
      try {
        if (b.stream === true) {
          // newline-delimited JSON: progress lines while images are made and downloaded, then the result
          res.writeHead(200, { 'content-type': 'application/x-ndjson' });
          let last = 0;
          try {
            const r = await run({
              cleanup: b.cleanup === true, download, checks,
              onConsole: (diskId, line) => { res.write(JSON.stringify({ type: 'console', disk: diskId, line }) + '\n'); },
              progress: (diskId, done, total) => {
                if (done < total && Date.now() - last < 250) return;
                last = Date.now();
                res.write(JSON.stringify({ type: 'progress', disk: diskId, doneBytes: done, totalBytes: total }) + '\n');
              },
            });
            res.end(JSON.stringify({ type: 'result', ...r }) + '\n');
          } catch (err) {
            const e = toMobilityError(err);
            res.end(JSON.stringify({ type: 'error', code: e.code, message: e.message }) + '\n');
          }
          return;
        }
        send(res, 200, await run({ cleanup: b.cleanup === true, download, checks }));
      } finally {
        release();
      }
    } else if (req.method === 'GET' && url.pathname === '/v1/test-failovers') {
      const agent = agentParam(url.searchParams.get('agent'));
      send(res, 200, { agent, records: await readTestFailovers(server.agentDir(agent), agent) });
    } else if (await handlePlanApi(server, req, res, url, { testFailover, groupPoints: listGroupPoints, machineCheckDeps, inventoryNics })) {
      // answered
    } else if (await handleConfigApi(server, req, res, url)) {
      // answered
    } else {
      req.resume();
      send(res, 404, { code: 'MOB_ERR_USAGE', message: `no such endpoint: ${req.method} ${url.pathname}` });
    }
  } catch (err) {
    const e = toMobilityError(err);
    if (e.code === 'MOB_ERR_INTERNAL' || e.code === 'MOB_ERR_STORAGE') server.log.error('api request failed', { code: e.code, error: e.message });
    const details = (err as { details?: unknown }).details;
    if (!res.headersSent) send(res, statusFor(e.code), { code: e.code, message: e.message, ...(details ? { details } : {}) });
  }
}

/**
 * The server's operator API: JSON over the same HTTPS listener as the agents'
 * WebSocket endpoint, authenticated with `Authorization: Bearer <token>`.
 *
 *   GET  /v1/status                      every agent's disks: state, RPO, data lag, backlog, churn
 *   GET  /v1/points?agent=A              recovery points of an agent
 *   POST /v1/test-failover               {agent, point, cleanup?}: materialise (or remove) writable images
 *
 * Errors answer {code, message} with a status from the code. The handler never
 * throws: a bad request cannot disturb replication.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ID_PATTERN } from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import { type MaterializedDisk, type RecoveryPoint } from '../target/catalog.js';
import { failback, failover, materializePoint, readFailoverState } from './failover.js';
import type { ProcessServer } from './process-server.js';
import { handleConfigApi } from './config-api.js';

const MAX_BODY = 64 * 1024;

export function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body, null, 1) + '\n');
}

function statusFor(code: string): number {
  switch (code) {
    case 'MOB_ERR_AUTH': case 'MOB_ERR_PASSPHRASE': case 'MOB_ERR_TOKEN_USED': return 401;
    case 'MOB_ERR_FORBIDDEN': case 'MOB_ERR_CLONE': case 'MOB_ERR_NOT_REGISTERED': return 403;
    case 'MOB_ERR_RATE_LIMITED': return 429;
    case 'MOB_ERR_UNKNOWN_MACHINE': case 'MOB_ERR_UNKNOWN_POLICY': return 404;
    case 'MOB_ERR_AGENT_OFFLINE': return 503;
    case 'MOB_ERR_PREFLIGHT': return 412;
    case 'MOB_ERR_USAGE': case 'MOB_ERR_CONFIG': case 'MOB_ERR_BAD_DISK_ID': return 400;
    case 'MOB_ERR_UNKNOWN_POINT': case 'MOB_ERR_UNKNOWN_DISK': return 404;
    case 'MOB_ERR_FAILED_OVER': case 'MOB_ERR_DISK_BUSY': case 'MOB_ERR_NOT_PROTECTING': case 'MOB_ERR_AGENT_EXISTS': return 409;
    // mobility cut: the agent's cut failed, or no point came in time
    case 'MOB_ERR_FREEZE': case 'MOB_ERR_HOOK': case 'MOB_ERR_CUT': case 'MOB_ERR_POINT_UNVERIFIED': case 'MOB_ERR_TRACKING_LOST': return 502;
    case 'MOB_ERR_CUT_TIMEOUT': return 504;
    default: return 500;
  }
}

function authorized(server: ProcessServer, req: IncomingMessage): boolean {
  const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
  if (!m) return false;
  const a = crypto.createHash('sha256').update(m[1]).digest();
  const b = crypto.createHash('sha256').update(server.token).digest();
  return crypto.timingSafeEqual(a, b);
}

export async function readBody(req: IncomingMessage): Promise<Record<string, unknown>> {
  let size = 0;
  const parts: Buffer[] = [];
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > MAX_BODY) throw new MobilityError('MOB_ERR_USAGE', `request body over ${MAX_BODY} bytes`);
    parts.push(c as Buffer);
  }
  try {
    const v = JSON.parse(Buffer.concat(parts).toString('utf8') || '{}') as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw new MobilityError('MOB_ERR_USAGE', `request body is not a JSON object: ${(err as Error).message}`);
  }
}

function agentParam(v: unknown): string {
  if (typeof v !== 'string' || !ID_PATTERN.test(v)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `agent id ${JSON.stringify(v)} is not [A-Za-z0-9._-]{1,64}`);
  return v;
}

async function agents(server: ProcessServer): Promise<string[]> {
  try {
    return (await fsp.readdir(path.join(server.opts.dataDir, 'replicas'), { withFileTypes: true })).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  } catch {
    return [];
  }
}

export interface DiskStatus {
  agent: string; disk: string; sizeBytes: number; initialComplete: boolean;
  state: string; reason: string; connected: boolean; healthAgeMs: number | null;
  rpoMs: number | null; rpoAlert: boolean; latestPoint: string | null; latestAppPoint: string | null; points: number;
  dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; freezeFailures: number; lastFreezeMs: number | null;
  /** Progress of the running scan (initial sync or resync), 0..1000, from the agent's last health report. */
  progressPermille: number | null;
}

/** Status of every disk of every agent the server has a replica for. */
export async function collectStatus(server: ProcessServer): Promise<DiskStatus[]> {
  const out: DiskStatus[] = [];
  const now = Date.now();
  for (const agent of await agents(server)) {
    const cat = await server.catalog(agent);
    const fo = await readFailoverState(server, agent);
    // disk ids only: a replica being created lives in a temporary sibling until it is published
    const dirs = (await fsp.readdir(server.agentDir(agent), { withFileTypes: true })).filter((d) => d.isDirectory() && ID_PATTERN.test(d.name) && !d.name.startsWith('.'));
    for (const dd of dirs) {
      let st: { sizeBytes: number; initialComplete: boolean };
      try {
        st = JSON.parse(await fsp.readFile(path.join(server.diskDir(agent, dd.name), 'state.json'), 'utf8')) as typeof st;
      } catch {
        continue;
      }
      const pts = cat.list().filter((p) => p.disks[dd.name]);
      const latest = pts[pts.length - 1] ?? null;
      const latestApp = [...pts].reverse().find((p) => p.kind === 'app') ?? null;
      const h = server.health.get(agent)?.get(dd.name) ?? null;
      const rpoMs = latest ? Math.max(0, now - Date.parse(latest.takenAt)) : null;
      out.push({
        agent, disk: dd.name, sizeBytes: st.sizeBytes, initialComplete: st.initialComplete,
        state: fo ? 'failed-over' : h ? (h.connected ? h.state : 'disconnected') : st.initialComplete ? 'disconnected' : 'initial-sync',
        reason: fo ? `failed over to ${fo.point} at ${fo.failedOverAt}` : h?.reason ?? '', connected: h?.connected ?? false, healthAgeMs: h ? now - h.receivedAt : null,
        rpoMs, rpoAlert: rpoMs === null || rpoMs > server.rpoAlertFor(agent), latestPoint: latest?.id ?? null, latestAppPoint: latestApp?.id ?? null, points: pts.length,
        dataLagMs: h?.dataLagMs ?? null, backlogBytes: h?.backlogBytes ?? null, churnBytesPerSec: h?.churnBytesPerSec ?? null,
        freezeFailures: h?.freezeFailures ?? 0, lastFreezeMs: h?.lastFreezeMs ?? null, progressPermille: h?.progressPermille ?? null,
      });
    }
  }
  return out;
}

/** Materialises every disk of a point under <data-dir>/test-failover/<agent>/<point>/, or removes that directory. */
export async function testFailover(server: ProcessServer, agent: string, ref: string, cleanup: boolean): Promise<{ point: RecoveryPoint; dir: string; disks: MaterializedDisk[]; removed: boolean }> {
  return server.withAgentLock(agent, async () => {
    const cat = await server.catalog(agent);
    const point = cat.resolve(ref);
    const dir = path.join(server.opts.dataDir, 'test-failover', agent, point.id);
    if (cleanup) {
      await fsp.rm(dir, { recursive: true, force: true });
      return { point, dir, disks: [], removed: true };
    }
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const disks = await materializePoint(server, agent, point, dir);
    server.log.info('test failover image ready', { agent, point: point.id, dir, disks: disks.map((d) => ({ disk: d.diskId, method: d.method, ms: d.ms, undoRecords: d.undoRecords })) });
    return { point, dir, disks, removed: false };
  });
}

export async function handleApi(server: ProcessServer, req: IncomingMessage, res: ServerResponse): Promise<void> {
  try {
    const url = new URL(req.url ?? '/', 'http://x');
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
    if (!authorized(server, req)) {
      req.resume();
      throw new MobilityError('MOB_ERR_AUTH', 'missing or wrong bearer token');
    }
    if (req.method === 'GET' && url.pathname === '/v1/status') {
      send(res, 200, { disks: await collectStatus(server), rpoAlertMs: server.rpoAlertMs, retentionMs: server.retentionMs });
    } else if (req.method === 'GET' && url.pathname === '/v1/points') {
      const agent = agentParam(url.searchParams.get('agent'));
      send(res, 200, { agent, points: (await server.catalog(agent)).list() });
    } else if (req.method === 'POST' && url.pathname === '/v1/failover') {
      const b = await readBody(req);
      const agent = agentParam(b.agent);
      const ref = typeof b.point === 'string' && b.point ? b.point : 'latest';
      send(res, 200, await failover(server, agent, ref, b.finalCut !== false));
    } else if (req.method === 'POST' && url.pathname === '/v1/failback') {
      const b = await readBody(req);
      send(res, 200, await failback(server, agentParam(b.agent)));
    } else if (req.method === 'POST' && url.pathname === '/v1/test-failover') {
      const b = await readBody(req);
      const agent = agentParam(b.agent);
      const ref = typeof b.point === 'string' && b.point ? b.point : 'latest';
      send(res, 200, await testFailover(server, agent, ref, b.cleanup === true));
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

/**
 * Configuration-server endpoints of the operator API (bearer token):
 *
 *   GET  /v1/machines                     registered machines, inventory, connection, policy, disks
 *   GET  /v1/policies                     replication policies
 *   POST /v1/policies                     {name, rpoThresholdMs?, retentionMs?, crashIntervalMs?, appIntervalMs?, compress?, bandwidthBytes?}
 *   POST /v1/policies/assign              {machine, policy}
 *   POST /v1/enable                       {machine, disk (device path on the machine), diskId?, policy?}
 *   POST /v1/disable                      {machine, disk (disk id or device), keepReplica?}
 *   POST /v1/tokens                       {label?, ttlMs?}: a one-time registration token
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ID_PATTERN } from '../constants.js';
import { MobilityError } from '../errors.js';
import { readBody, send } from './api.js';
import type { Policy } from './config-db.js';
import type { ProcessServer } from './process-server.js';
import { TOKEN_TTL_MS } from './registry.js';

const MIN_CRASH_INTERVAL_MS = 15_000;

function str(v: unknown, what: string): string {
  if (typeof v !== 'string' || !v) throw new MobilityError('MOB_ERR_USAGE', `${what} is required`);
  return v;
}

function ms(v: unknown, what: string, fallback: number, min = 0): number {
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw new MobilityError('MOB_ERR_USAGE', `${what} must be an integer >= ${min}`);
  return v;
}

export function diskIdFor(device: string): string {
  return path.basename(device).replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'disk';
}

/** Waits until no session holds the disk (the agent stopped replicating it). */
async function waitReleased(server: ProcessServer, key: string, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const held = server.diskLocks.get(key);
    if (held === undefined) return true;
    if (held instanceof Promise) { await held; continue; }
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function handleConfigApi(server: ProcessServer, req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean> {
  const db = server.db;
  const route = `${req.method ?? ''} ${url.pathname}`;
  switch (route) {
    case 'GET /v1/machines': {
      const disks = db.listDisks();
      send(res, 200, {
        machines: db.listAgents().map((a) => ({
          agentId: a.id, hostname: a.hostname, machineId: a.machineId, connected: server.control.connected(a.id), lastSeen: a.lastSeen,
          registeredAt: a.registeredAt, registeredWith: a.registeredWith, policy: a.policy ?? 'default',
          disks: disks.filter((d) => d.agentId === a.id), inventory: a.inventory, inventoryAt: a.inventoryAt,
        })),
      });
      return true;
    }
    case 'GET /v1/policies':
      send(res, 200, { policies: db.listPolicies() });
      return true;
    case 'POST /v1/policies': {
      const b = await readBody(req);
      const name = str(b.name, 'name');
      if (!ID_PATTERN.test(name)) throw new MobilityError('MOB_ERR_USAGE', `policy name ${JSON.stringify(name)} is not [A-Za-z0-9._-]{1,64}`);
      let base: Policy;
      try { base = db.getPolicy(name); } catch { base = db.getPolicy('default'); }
      const crash = ms(b.crashIntervalMs, 'crashIntervalMs', base.crashIntervalMs, MIN_CRASH_INTERVAL_MS);
      const app = ms(b.appIntervalMs, 'appIntervalMs', base.appIntervalMs, 0);
      const p = db.putPolicy({
        name, rpoThresholdMs: ms(b.rpoThresholdMs, 'rpoThresholdMs', base.rpoThresholdMs, 1000), retentionMs: ms(b.retentionMs, 'retentionMs', base.retentionMs, 60_000),
        crashIntervalMs: crash, appIntervalMs: app, compress: typeof b.compress === 'boolean' ? b.compress : base.compress,
        bandwidthBytes: ms(b.bandwidthBytes, 'bandwidthBytes', base.bandwidthBytes, 0),
      });
      // agents under this policy get it now
      for (const a of db.listAgents()) if ((a.policy ?? 'default') === name) server.control.push(a.id);
      server.log.info('policy saved', { policy: p });
      send(res, 200, { policy: p });
      return true;
    }
    case 'POST /v1/policies/assign': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const p = db.getPolicy(str(b.policy, 'policy'));
      db.setAgentPolicy(a.id, p.name);
      const pushed = server.control.push(a.id);
      server.log.info('policy assigned', { agent: a.id, policy: p.name, pushed });
      send(res, 200, { agentId: a.id, policy: p, pushed });
      return true;
    }
    case 'POST /v1/enable': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const device = str(b.disk, 'disk');
      if (!device.startsWith('/')) throw new MobilityError('MOB_ERR_USAGE', `disk must be an absolute device path on the machine (e.g. /dev/sdb), not ${JSON.stringify(device)}`);
      const diskId = typeof b.diskId === 'string' && b.diskId ? b.diskId : diskIdFor(device);
      if (!ID_PATTERN.test(diskId)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `disk id ${JSON.stringify(diskId)} is not [A-Za-z0-9._-]{1,64}`);
      const policy = typeof b.policy === 'string' && b.policy ? db.getPolicy(b.policy) : null;
      const clash = db.listDisks(a.id).find((d) => d.diskId !== diskId && d.device === device);
      if (clash) throw new MobilityError('MOB_ERR_CONFIG', `${device} is already enabled on ${a.id} as disk ${clash.diskId}`);
      const pre = await server.control.preflight(a.id, [device]);
      if (!pre.ok) {
        const failed = pre.checks.filter((c) => !c.ok);
        throw Object.assign(new MobilityError('MOB_ERR_PREFLIGHT', `preflight on ${a.id} failed: ${failed.map((c) => `${c.code ?? c.id}: ${c.message}${c.fix ? ` (fix: ${c.fix})` : ''}`).join('; ')}`), { details: pre.checks });
      }
      if (policy) db.setAgentPolicy(a.id, policy.name);
      db.enableDisk(a.id, diskId, device);
      const pushed = server.control.push(a.id);
      server.log.info('replication enabled', { agent: a.id, disk: diskId, device, policy: policy?.name ?? a.policy ?? 'default' });
      send(res, 200, { agentId: a.id, diskId, device, policy: (policy ?? db.getPolicy(a.policy ?? 'default')).name, pushed, preflight: pre.checks });
      return true;
    }
    case 'POST /v1/disable': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const ref = str(b.disk, 'disk');
      const row = db.listDisks(a.id).find((d) => d.diskId === ref || d.device === ref);
      if (!row) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `no enabled disk ${JSON.stringify(ref)} on ${a.id} (enabled: ${db.listDisks(a.id).map((d) => d.diskId).join(', ') || 'none'})`);
      db.disableDisk(a.id, row.diskId);
      const pushed = server.control.push(a.id);
      let replicaRemoved = false;
      if (b.keepReplica !== true) {
        const released = await waitReleased(server, `${a.id}/${row.diskId}`, 60_000);
        if (!released) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${row.diskId} was disabled but a session still holds its replica; the replica was kept (disable again to remove it)`);
        await server.withAgentLock(a.id, async () => {
          if (db.listDisks(a.id).length === 0) {
            await fsp.rm(server.agentDir(a.id), { recursive: true, force: true });
            await server.resetCatalog(a.id);
          } else {
            await fsp.rm(server.diskDir(a.id, row.diskId), { recursive: true, force: true });
          }
        });
        server.health.get(a.id)?.delete(row.diskId);
        replicaRemoved = true;
      }
      server.log.info('replication disabled', { agent: a.id, disk: row.diskId, pushed, replicaRemoved });
      send(res, 200, { agentId: a.id, diskId: row.diskId, pushed, replicaRemoved });
      return true;
    }
    case 'POST /v1/tokens': {
      const b = await readBody(req);
      const label = typeof b.label === 'string' ? b.label.slice(0, 200) : '';
      const ttl = ms(b.ttlMs, 'ttlMs', TOKEN_TTL_MS, 1000);
      const token = db.createToken(label, ttl);
      server.log.info('one-time token created', { id: token.split('.')[0], label, ttlMs: ttl });
      send(res, 200, { token, expiresAt: new Date(Date.now() + ttl).toISOString(), fingerprint: server.identity?.fingerprint256 ?? null });
      return true;
    }
    default:
      return false;
  }
}

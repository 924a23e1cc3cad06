/**
 * Failover and failback of an agent's disks, server side.
 *
 *   failover   (optionally) ask the connected agent for a final cut and wait for it; have the
 *              backend make a writable image of the chosen point of every disk (a file under
 *              <data-dir>/failover/<agent>/, or a page blob failover/<agent>/<disk>); record
 *              replicas/<agent>/failover.json; disconnect the agent and refuse its sessions
 *              (MOB_ERR_FAILED_OVER) until failback: replication stops.
 *   reprotect  a session with purpose "reprotect" reads the promoted images (digests and pages),
 *              so the original machine pulls only the differences into its disks (agent/reprotect.ts).
 *   failback   once the original disks equal the promoted images: each promoted image becomes the
 *              disk's replica under a new generation (the backend's adopt; the recovery points of
 *              the old timeline are dropped), failover.json is removed and the agent may protect
 *              again; its next session runs a checksum resync, which finds nothing to send.
 */
import fsp from 'node:fs/promises';
import { MobilityError } from '../errors.js';
import { diskPoint, type RecoveryPoint } from '../target/catalog.js';
import type { PointImage } from '../target/replica-store.js';
import type { ServerContext } from './context.js';
import { failoverStateFile, writeFailoverState, type FailoverState } from './failover-state.js';

export interface FailoverResult {
  point: RecoveryPoint;
  finalCut: { requested: boolean; pointId: string | null; note: string };
  disks: PointImage[];
}

export async function failover(server: ServerContext, agent: string, ref: string, finalCut: boolean, finalCutTimeoutMs = 120_000): Promise<FailoverResult> {
  const existing = await server.failoverState(agent);
  if (existing) throw new MobilityError('MOB_ERR_FAILED_OVER', `agent ${agent} was already failed over to ${existing.point} at ${existing.failedOverAt}`);
  const fc = { requested: false, pointId: null as string | null, note: '' };
  if (finalCut && ref === 'latest') {
    const before = new Set((await server.catalog(agent)).list().map((p) => p.id));
    fc.requested = server.requestCut(agent, 'crash', 'final cut before failover');
    if (!fc.requested) fc.note = 'the agent is not connected: failing over to the newest existing point';
    else {
      const end = Date.now() + finalCutTimeoutMs;
      while (Date.now() < end && fc.pointId === null) {
        const added = (await server.catalog(agent)).list().find((p) => !before.has(p.id));
        if (added) fc.pointId = added.id;
        else await new Promise((r) => setTimeout(r, 100));
      }
      if (!fc.pointId) fc.note = `no final cut within ${Math.round(finalCutTimeoutMs / 1000)} s: failing over to the newest existing point`;
    }
  }
  return server.withAgentLock(agent, async () => {
    const cat = await server.catalog(agent);
    const point = cat.resolve(ref);
    // images of an earlier failover that never completed are replaced
    for (const img of await server.backend.images(agent, 'failover')) await server.backend.removeImage(img);
    const disks = await materializePoint(server, agent, point, 'failover');
    const st: FailoverState = {
      version: 2, agent, point: point.id, pointTakenAt: point.takenAt, failedOverAt: new Date().toISOString(),
      disks: Object.fromEntries(disks.map((d) => [d.diskId, d])),
    };
    await writeFailoverState(server.agentDir(agent), st);
    // replication stops: the agent's sessions end, and new ones are refused until failback
    server.disconnectAgent(agent, new MobilityError('MOB_ERR_FAILED_OVER', `agent ${agent} was failed over to ${point.id}; replication stopped (run 'mobility reprotect' to fail back)`));
    server.log.info('failed over', { agent, point: point.id, finalCut: fc, disks: disks.map((d) => ({ disk: d.diskId, location: d.location, method: d.method, ms: d.ms })) });
    return { point, finalCut: fc, disks };
  });
}

/** Has the backend make an image of every disk of the point; call with the agent lock held. */
export async function materializePoint(server: ServerContext, agent: string, point: RecoveryPoint, purpose: 'failover' | 'test-failover'): Promise<PointImage[]> {
  const disks: PointImage[] = [];
  for (const diskId of Object.keys(point.disks)) {
    disks.push(await server.backend.materialize(agent, diskId, diskPoint(point, diskId), async () => {
      const cat = await server.catalog(agent);
      return cat.epochsFrom(point, diskId).map((p) => diskPoint(p, diskId));
    }, purpose));
  }
  return disks;
}

/** The promoted images become the replicas (new generation); the old timeline's points are dropped. */
export async function failback(server: ServerContext, agent: string): Promise<{ disks: string[]; droppedPoints: number }> {
  return server.withAgentLock(agent, async () => {
    const st = await server.failoverState(agent);
    if (!st) throw new MobilityError('MOB_ERR_CONFIG', `agent ${agent} is not failed over`);
    for (const diskId of Object.keys(st.disks)) {
      if (server.diskBusy(agent, diskId)) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agent} is in use by a session; retry when it ends`);
    }
    const cat = await server.catalog(agent);
    const dropped = cat.list().length;
    // each adopt is idempotent: a crash part-way leaves failover.json, and failback runs again
    for (const img of Object.values(st.disks)) await server.backend.adopt(img);
    await server.resetCatalog(agent);
    await fsp.rm(failoverStateFile(server.agentDir(agent)), { force: true });
    for (const img of await server.backend.images(agent, 'failover')) await server.backend.removeImage(img);
    server.log.info('failed back', { agent, disks: Object.keys(st.disks), droppedPoints: dropped });
    return { disks: Object.keys(st.disks), droppedPoints: dropped };
  });
}

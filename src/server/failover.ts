/**
 * Failover and failback of an agent's disks, server side.
 *
 *   failover   (optionally) ask the connected agent for a final cut and wait for it; materialise
 *              the chosen point of every disk as <data-dir>/failover/<agent>/<disk>.img (the
 *              promoted disks); record replicas/<agent>/failover.json; disconnect the agent and
 *              refuse its sessions (MOB_ERR_FAILED_OVER) until failback: replication stops.
 *   reprotect  a session with purpose "reprotect" reads the promoted images (digests and pages),
 *              so the original machine pulls only the differences into its disks (agent/reprotect.ts).
 *   failback   once the original disks equal the promoted images: each promoted image becomes the
 *              disk's replica under a new generation (the recovery points of the old timeline are
 *              dropped), failover.json is removed and the agent may protect again; its next session
 *              runs a checksum resync, which finds nothing to send.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { READ_CHUNK_BYTES } from '../constants.js';
import { MobilityError } from '../errors.js';
import { xxh64 } from '@node-rs/xxhash';
import { materializeDisk, type MaterializedDisk, type RecoveryPoint } from '../target/catalog.js';
import type { ReplicaState } from '../target/local/local-store.js';
import { writeFileDurable } from '../util/durable-file.js';
import type { ProcessServer } from './process-server.js';

export interface FailoverState {
  version: 1;
  agent: string;
  point: string;
  pointTakenAt: string;
  failedOverAt: string;
  /** diskId -> promoted image (absolute path) and size */
  disks: Record<string, { image: string; sizeBytes: number }>;
}

function stateFile(server: ProcessServer, agent: string): string {
  return path.join(server.agentDir(agent), 'failover.json');
}

export async function readFailoverState(server: ProcessServer, agent: string): Promise<FailoverState | null> {
  try {
    return JSON.parse(await fsp.readFile(stateFile(server, agent), 'utf8')) as FailoverState;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MobilityError('MOB_ERR_STATE_CORRUPT', `failover state of agent ${agent} is unreadable: ${(err as Error).message}`);
  }
}

export interface FailoverResult {
  point: RecoveryPoint;
  finalCut: { requested: boolean; pointId: string | null; note: string };
  dir: string;
  disks: MaterializedDisk[];
}

export async function failover(server: ProcessServer, agent: string, ref: string, finalCut: boolean, finalCutTimeoutMs = 120_000): Promise<FailoverResult> {
  const existing = await readFailoverState(server, agent);
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
    const dir = path.join(server.opts.dataDir, 'failover', agent);
    await fsp.rm(dir, { recursive: true, force: true });
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const disks = await materializePoint(server, agent, point, dir);
    const st: FailoverState = {
      version: 1, agent, point: point.id, pointTakenAt: point.takenAt, failedOverAt: new Date().toISOString(),
      disks: Object.fromEntries(disks.map((d) => [d.diskId, { image: d.image, sizeBytes: d.sizeBytes }])),
    };
    await writeFileDurable(stateFile(server, agent), JSON.stringify(st, null, 2) + '\n', 0o600);
    // replication stops: the agent's sessions end, and new ones are refused until failback
    server.disconnectAgent(agent, new MobilityError('MOB_ERR_FAILED_OVER', `agent ${agent} was failed over to ${point.id}; replication stopped (run 'mobility reprotect' to fail back)`));
    server.log.info('failed over', { agent, point: point.id, finalCut: fc, dir, disks: disks.map((d) => ({ disk: d.diskId, method: d.method, ms: d.ms })) });
    return { point, finalCut: fc, dir, disks };
  });
}

/** Writes an image of every disk of the point into dir (<disk>.img); call with the agent lock held. */
export async function materializePoint(server: ProcessServer, agent: string, point: RecoveryPoint, dir: string): Promise<MaterializedDisk[]> {
  const disks: MaterializedDisk[] = [];
  for (const [diskId, d] of Object.entries(point.disks)) {
    const ddir = server.diskDir(agent, diskId);
    disks.push(await materializeDisk({
      diskId, replica: path.join(ddir, 'replica.img'), undoDir: path.join(ddir, 'undo'), out: path.join(dir, `${diskId}.img`),
      sizeBytes: d.sizeBytes, epochs: async () => (await server.catalog(agent)).epochsFrom(point, diskId),
    }));
  }
  return disks;
}

/** The promoted images become the replicas (new generation); the old timeline's points are dropped. */
export async function failback(server: ProcessServer, agent: string): Promise<{ disks: string[]; droppedPoints: number }> {
  return server.withAgentLock(agent, async () => {
    const st = await readFailoverState(server, agent);
    if (!st) throw new MobilityError('MOB_ERR_CONFIG', `agent ${agent} is not failed over`);
    for (const diskId of Object.keys(st.disks)) {
      if (server.diskLocks.get(`${agent}/${diskId}`)) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agent} is in use by a session; retry when it ends`);
    }
    const cat = await server.catalog(agent);
    const dropped = cat.list().length;
    const now = new Date().toISOString();
    for (const [diskId, d] of Object.entries(st.disks)) {
      const ddir = server.diskDir(agent, diskId);
      const prev = JSON.parse(await fsp.readFile(path.join(ddir, 'state.json'), 'utf8')) as ReplicaState;
      // order: the new replica file first, then its state (a crash in between leaves the
      // failover state in place, and failback can run again: the image is then already moved)
      if (fs.existsSync(d.image)) await fsp.rename(d.image, path.join(ddir, 'replica.img'));
      await fsp.rm(path.join(ddir, 'wal.log'), { force: true });
      await fsp.rm(path.join(ddir, 'undo'), { recursive: true, force: true });
      const next: ReplicaState = {
        ...prev, sizeBytes: d.sizeBytes, generation: randomUUID(), initialComplete: true, lastDurableSeq: 0, updatedAt: now,
        lastPass: { kind: 'failback', seq: 0, at: now },
      };
      await writeFileDurable(path.join(ddir, 'state.json'), JSON.stringify(next, null, 2) + '\n', 0o600);
    }
    await server.resetCatalog(agent);
    await fsp.rm(stateFile(server, agent), { force: true });
    await fsp.rm(path.join(server.opts.dataDir, 'failover', agent), { recursive: true, force: true });
    server.log.info('failed back', { agent, disks: Object.keys(st.disks), droppedPoints: dropped });
    return { disks: Object.keys(st.disks), droppedPoints: dropped };
  });
}

/** A promoted image opened read-only for a reprotect session. */
export class PromotedImage {
  private constructor(readonly file: string, private readonly fh: fsp.FileHandle, readonly sizeBytes: number) {}

  static async open(file: string, sizeBytes: number): Promise<PromotedImage> {
    const fh = await fsp.open(file, 'r').catch((err: Error) => { throw new MobilityError('MOB_ERR_STATE_CORRUPT', `promoted image ${file} cannot be opened: ${err.message}`); });
    const st = await fh.stat();
    if (st.size !== sizeBytes) {
      await fh.close();
      throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `promoted image ${file} is ${st.size} bytes, the disk ${sizeBytes}`);
    }
    return new PromotedImage(file, fh, sizeBytes);
  }

  private range(firstPage: number, count: number, pageSize: number): [number, number] {
    const start = firstPage * pageSize;
    if (!Number.isSafeInteger(start) || count <= 0 || start >= this.sizeBytes) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${this.sizeBytes}-byte disk`);
    }
    return [start, Math.min(start + count * pageSize, this.sizeBytes)];
  }

  async read(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const [start, end] = this.range(firstPage, count, pageSize);
    const buf = Buffer.alloc(end - start);
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, start + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buf;
  }

  async pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const [start, end] = this.range(firstPage, count, pageSize);
    const out = Buffer.allocUnsafe(Math.ceil((end - start) / pageSize) * 8);
    let page = 0;
    for (let o = start; o < end; o += READ_CHUNK_BYTES) {
      const n = Math.min(READ_CHUNK_BYTES, end - o);
      const chunk = await this.read(o / pageSize, Math.ceil(n / pageSize), pageSize);
      for (let p = 0; p < chunk.length; p += pageSize) out.writeBigUInt64LE(xxh64(chunk.subarray(p, Math.min(p + pageSize, chunk.length))), 8 * page++);
    }
    return out;
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}

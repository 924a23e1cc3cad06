/**
 * The failover record of an agent (replicas/<agent>/failover.json in the server's data
 * directory): which point was promoted, when, and the promoted image of each disk. While
 * it exists the agent's replication sessions are refused (MOB_ERR_FAILED_OVER).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import type { PointImage } from '../target/replica-store.js';
import { writeFileDurable } from '../util/durable-file.js';

export interface FailoverState {
  version: 2;
  agent: string;
  point: string;
  pointTakenAt: string;
  failedOverAt: string;
  /** diskId -> the promoted image (a local file, or a blob of the target) */
  disks: Record<string, PointImage>;
}

export function failoverStateFile(agentDir: string): string {
  return path.join(agentDir, 'failover.json');
}

/** The failover record, or null when the agent is not failed over. Version-1 records (local images) are read as such. */
export async function readFailoverState(agentDir: string, agent: string): Promise<FailoverState | null> {
  let st: FailoverState | { version: 1; disks: Record<string, { image: string; sizeBytes: number }> } & Omit<FailoverState, 'version' | 'disks'>;
  try {
    st = JSON.parse(await fsp.readFile(failoverStateFile(agentDir), 'utf8')) as typeof st;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MobilityError('MOB_ERR_STATE_CORRUPT', `failover state of agent ${agent} is unreadable: ${(err as Error).message}`);
  }
  if (st.version === 1) {
    const disks: Record<string, PointImage> = {};
    for (const [diskId, d] of Object.entries(st.disks)) {
      disks[diskId] = { agentId: agent, diskId, pointId: st.point, purpose: 'failover', sizeBytes: d.sizeBytes, location: d.image, localPath: d.image, method: 'file', ms: 0, undoRecords: 0 };
    }
    return { ...st, version: 2, disks };
  }
  return st;
}

export async function writeFailoverState(agentDir: string, st: FailoverState): Promise<void> {
  await fsp.mkdir(agentDir, { recursive: true, mode: 0o700 });
  await writeFileDurable(failoverStateFile(agentDir), JSON.stringify(st, null, 2) + '\n', 0o600);
}

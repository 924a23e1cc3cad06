/**
 * What a test failover proved, kept next to the agent's recovery points
 * (replicas/<agent>/test-failovers.json in the server's metadata directory, mode 0600,
 * replaced atomically): per run the point, the images, the network mapping applied and the
 * boot check's result. The newest MAX_RECORDS runs are kept.
 *
 * Who calls: test failover (http/api.ts) appends one record per run that mapped or booted;
 * status and GET /v1/test-failovers read them. Appends of one agent are serialised here, so two
 * runs finishing together both stay.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../../errors.js';
import { writeFileDurable } from '../../util/durable-file.js';
import type { BootCheckResult } from './boot-check.js';
import type { NetworkMappingResult } from './guest-network.js';

export const MAX_RECORDS = 50;

export interface TestFailoverRecord {
  agent: string;
  point: string;
  pointTakenAt: string;
  at: string;
  /** The local image of each disk that was mapped or booted. */
  images: { diskId: string; file: string }[];
  /** The network mapping written (null: none asked), and the disk it went to. */
  networkMapping: (NetworkMappingResult & { diskId: string }) | null;
  /** The boot check's result (null: none asked, or it could not run: see error). */
  bootCheck: BootCheckResult | null;
  /** The step that failed before a result, with its code. */
  error: { step: 'network-mapping' | 'boot-check'; code: string; message: string } | null;
}

const FILE = 'test-failovers.json';
const queues = new Map<string, Promise<unknown>>();

export async function readTestFailovers(agentDir: string, agent: string): Promise<TestFailoverRecord[]> {
  let text: string;
  try { text = await fsp.readFile(path.join(agentDir, FILE), 'utf8'); } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  try {
    const j = JSON.parse(text) as { version?: number; records?: TestFailoverRecord[] };
    return Array.isArray(j.records) ? j.records : [];
  } catch (err) {
    throw new MobilityError('MOB_ERR_STATE_CORRUPT', `the test failover records of agent ${agent} are unreadable: ${(err as Error).message}`);
  }
}

/** Appends a record (the oldest beyond MAX_RECORDS go). A damaged file is replaced rather than blocking new records. */
export function appendTestFailover(agentDir: string, rec: TestFailoverRecord): Promise<void> {
  const prev = queues.get(agentDir) ?? Promise.resolve();
  const run = prev.catch(() => undefined).then(async () => {
    const old = await readTestFailovers(agentDir, rec.agent).catch(() => [] as TestFailoverRecord[]);
    await fsp.mkdir(agentDir, { recursive: true, mode: 0o700 });
    await writeFileDurable(path.join(agentDir, FILE), JSON.stringify({ version: 1, records: [...old, rec].slice(-MAX_RECORDS) }, null, 2) + '\n', 0o600);
  });
  queues.set(agentDir, run);
  return run;
}

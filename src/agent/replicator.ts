/**
 * One-shot replication of a machine's disks to a process server: picks the
 * pass for each disk (initial, incremental, checksum resync, verify), runs it,
 * and reconnects with capped exponential backoff and jitter when the
 * connection drops, resuming from the server's last durable sequence.
 *
 * Pass selection (mode 'auto'):
 *   no replica on the server                       -> initial (fresh map)
 *   map present, same generation and geometry      -> incremental, or initial if the initial pass never completed (resume)
 *   map missing, corrupt or of another generation  -> resync (checksum): never a full copy of data the target already has
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import os from 'node:os';
import {
  AGENT_VERSION, DEFAULT_BLOCK_SIZE, DEFAULT_RETRY_DEADLINE_MS, DIGEST_MAP_PERSIST_MS, PAGE_SIZE, RECONNECT_MAX_MS, RECONNECT_MIN_MS,
} from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { Connection } from '../transport/client.js';
import type { DiskState } from '../protocol/frame-codec.js';
import { RateLimiter } from '../transport/rate-limiter.js';
import { DigestMap } from '../source/digest-map.js';
import { openDiskSource, type DiskSource } from '../source/disk-source.js';
import { SourcePass, type PassKind, type PassStats } from '../source/source-pass.js';
import type { CompressMode } from '../protocol/block-codec.js';

export type ReplicateMode = 'auto' | 'initial' | 'incremental' | 'resync' | 'verify';

export interface ReplicateOptions {
  serverUrl: string;
  token: string;
  ca?: string;
  pin?: string;
  agentId: string;
  disks: { path: string; id: string }[];
  stateDir: string;
  mode: ReplicateMode;
  blockSize?: number;
  /** Default 'auto': lz4 only while the link is the bottleneck. */
  compress?: CompressMode;
  maxRateBytes?: number;
  retryDeadlineMs?: number;
  logger: Logger;
  onProgress?: (p: { diskId: string; kind: PassKind; done: number; total: number; stats: PassStats }) => void;
}

export interface DiskResult {
  diskId: string;
  path: string;
  sizeBytes: number;
  kind: PassKind;
  /** Why this pass was chosen (e.g. "digest map missing"). */
  reason: string;
  stats: PassStats;
  durationMs: number;
  reconnects: number;
  consistent: boolean | null;
}

interface DiskCtx {
  id: string;
  path: string;
  src: DiskSource;
  mapFile: string;
  map: DigestMap | null;
  mapProblem: string | null;
  pass: SourcePass | null;
  reason: string;
  saving: Promise<void> | null;
  lastSave: number;
  result: DiskResult | null;
  reconnects: number;
  started: number;
}

export function defaultAgentId(): string {
  return os.hostname().replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 64) || 'agent';
}

export async function replicate(opts: ReplicateOptions): Promise<DiskResult[]> {
  const bs = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
  const log = opts.logger;
  const limiter = opts.maxRateBytes ? new RateLimiter(opts.maxRateBytes) : undefined;
  const stateDir = path.join(opts.stateDir, opts.agentId);
  await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
  const ctxs: DiskCtx[] = [];
  try {
    for (const d of opts.disks) {
      const src = await openDiskSource(d.path);
      const mapFile = path.join(stateDir, `${d.id}.map`);
      let map: DigestMap | null = null;
      let mapProblem: string | null = null;
      try {
        map = await DigestMap.load(mapFile);
        if (!map) mapProblem = 'digest map missing';
      } catch (err) {
        const e = toMobilityError(err, 'MOB_ERR_STATE_CORRUPT');
        mapProblem = e.message;
        log.warn('digest map unusable; a checksum resync will rebuild it', { disk: d.id, code: e.code, error: e.message });
      }
      ctxs.push({ id: d.id, path: d.path, src, mapFile, map, mapProblem, pass: null, reason: '', saving: null, lastSave: 0, result: null, reconnects: 0, started: Date.now() });
    }
    const hello = {
      agentId: opts.agentId, token: opts.token, agentVersion: AGENT_VERSION, readOnly: opts.mode === 'verify',
      disks: ctxs.map((c) => ({ diskId: c.id, sizeBytes: c.src.size, blockSize: bs, pageSize: PAGE_SIZE })),
    };
    const deadlineMs = opts.retryDeadlineMs ?? DEFAULT_RETRY_DEADLINE_MS;
    let backoff = RECONNECT_MIN_MS;
    let failingSince = 0;
    for (;;) {
      let conn: Connection | null = null;
      // the backoff and the retry deadline reset only when a connection made progress, so a
      // server that accepts and then fails every session (e.g. a full store) is not retried forever
      const progressBefore = progressOf(ctxs);
      try {
        conn = await Connection.connect({ url: opts.serverUrl, ca: opts.ca, pin: opts.pin, hello, limiter });
        for (let i = 0; i < ctxs.length; i++) {
          const c = ctxs[i];
          if (c.result) continue;
          const ws = conn.welcome.disks[i];
          preparePass(c, ws, i, opts, bs);
          await c.pass!.run(conn);
          await saveMap(c, true);
          c.result = {
            diskId: c.id, path: c.path, sizeBytes: c.src.size, kind: c.pass!.kind, reason: c.reason, stats: c.pass!.stats,
            durationMs: Date.now() - c.started, reconnects: c.reconnects,
            consistent: c.pass!.kind === 'verify' ? c.pass!.stats.mismatches.length === 0 : null,
          };
          log.info('pass complete', { disk: c.id, kind: c.pass!.kind, reason: c.reason, blocksSent: c.pass!.stats.blocksSent, bytesSent: c.pass!.stats.bytesSent, ms: c.result.durationMs });
        }
        conn.shutdown();
        return ctxs.map((c) => c.result!);
      } catch (err) {
        conn?.shutdown();
        const e = toMobilityError(err);
        for (const c of ctxs) if (c.pass && !c.result) await saveMap(c, true).catch(() => undefined);
        if (e.code === 'MOB_ERR_REPLICA_DIVERGED') {
          // the replica is not what our map says: rebuild the map from the replica itself
          for (const c of ctxs) if (c.pass && !c.result && c.pass.kind !== 'verify') { c.map = null; c.mapProblem = 'replica diverged from the digest map'; c.pass = null; }
        }
        if (!e.retryable) throw e;
        if (progressOf(ctxs) > progressBefore) {
          backoff = RECONNECT_MIN_MS;
          failingSince = 0;
        }
        if (!failingSince) failingSince = Date.now();
        if (Date.now() - failingSince > deadlineMs) {
          throw new MobilityError('MOB_ERR_RETRY_EXHAUSTED', `gave up after ${Math.round((Date.now() - failingSince) / 1000)} s: ${e.code}: ${e.message}`, { cause: e });
        }
        for (const c of ctxs) if (!c.result) c.reconnects++;
        const wait = Math.round(backoff * (0.5 + Math.random() / 2));
        log.warn('connection lost; reconnecting', { code: e.code, error: e.message, retryInMs: wait });
        await new Promise((r) => setTimeout(r, wait));
        backoff = Math.min(RECONNECT_MAX_MS, backoff * 2);
      }
    }
  } finally {
    for (const c of ctxs) await c.src.close().catch(() => undefined);
  }
}

function progressOf(ctxs: DiskCtx[]): number {
  let n = 0;
  for (const c of ctxs) n += (c.pass?.ackedFrames ?? 0) + (c.result ? 1 : 0);
  return n;
}

/** Chooses the pass for a disk on (re)connect, or resumes the running one. */
function preparePass(c: DiskCtx, ws: DiskState, diskIndex: number, opts: ReplicateOptions, bs: number): void {
  if (c.pass && c.map && c.map.header.generation === ws.generation) {
    c.pass.resume(ws.lastDurableSeq);
    return;
  }
  if (c.pass) opts.logger.warn('replica was recreated on the server while replicating; starting over', { disk: c.id });
  const fresh = () => new DigestMap({ version: 1, diskId: c.id, diskSize: c.src.size, pageSize: PAGE_SIZE, generation: ws.generation });
  const mapUsable = c.map !== null && c.map.header.generation === ws.generation && c.map.header.diskSize === c.src.size && c.map.header.pageSize === PAGE_SIZE;
  let kind: PassKind;
  if (opts.mode === 'verify') {
    if (!ws.replicaExists) throw new MobilityError('MOB_ERR_CONFIG', `disk ${c.id} has no replica on the server to verify`);
    kind = 'verify';
    c.reason = 'requested';
    c.map = fresh(); // verify never touches the persisted map
  } else if (opts.mode === 'initial' || !ws.replicaExists) {
    kind = 'initial';
    c.reason = ws.replicaExists ? 'requested' : 'new replica';
    c.map = fresh();
  } else if (opts.mode === 'resync' || !mapUsable) {
    kind = 'resync';
    c.reason = opts.mode === 'resync' ? 'requested'
      : c.mapProblem ?? (c.map && c.map.header.generation !== ws.generation ? 'digest map belongs to another replica generation' : 'disk geometry changed');
    c.map = fresh();
  } else {
    kind = ws.initialComplete ? 'incremental' : 'initial';
    c.reason = ws.initialComplete ? 'digest map valid' : 'resuming interrupted initial replication';
    if (opts.mode === 'incremental' && !ws.initialComplete) c.reason += ' (incremental requested)';
  }
  if (opts.mode === 'incremental' && kind === 'resync') {
    throw new MobilityError('MOB_ERR_STATE_CORRUPT', `disk ${c.id}: incremental requested but ${c.reason}; run with --mode resync`);
  }
  c.started = Date.now();
  const pass = new SourcePass(kind, c.src, c.map!, {
    diskIndex, blockSize: bs, pageSize: PAGE_SIZE, compress: opts.compress ?? 'auto',
    onMapChanged: () => { if (kind === 'initial' || kind === 'incremental') void saveMap(c, false); },
    onProgress: (p) => opts.onProgress?.({ diskId: c.id, kind, ...p }),
  });
  pass.resume(ws.lastDurableSeq);
  c.pass = pass;
  opts.logger.info('pass starting', { disk: c.id, kind, reason: c.reason, sizeBytes: c.src.size, knownPages: c.map!.knownPages() });
}

/** Persists the map durably, throttled unless forced. Never concurrent with itself. */
async function saveMap(c: DiskCtx, force: boolean): Promise<void> {
  if (!c.map || !c.pass || c.pass.kind === 'verify') return;
  if (c.pass.kind === 'resync' && !c.pass.done) return; // matched pages are trusted only once the server synced the pass end
  if (c.saving) {
    await c.saving;
    if (!force) return;
  }
  if (!force && Date.now() - c.lastSave < DIGEST_MAP_PERSIST_MS) return;
  if (!c.map.dirty && !force) return;
  c.lastSave = Date.now();
  c.saving = c.map.save(c.mapFile).finally(() => { c.saving = null; });
  await c.saving;
}

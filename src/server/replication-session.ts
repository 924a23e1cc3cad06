/**
 * One agent connection to the replication endpoint: authenticates the Hello, opens
 * the disks' stores through the leases, verifies every block before it is
 * persisted, acknowledges only durable data, turns cuts into recovery points
 * through the point book, and serves reprotect reads from promoted images. One bad
 * client never affects the others: its errors are answered with a coded Error
 * frame and its connection is closed; nothing from the offending frame is persisted.
 *
 * A session gets the narrow pieces it needs (SessionDeps), never the server.
 */
import crypto from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { WebSocket } from 'ws';
import { DIGEST_REQUESTS_IN_FLIGHT, HEARTBEAT_MAX_MISSED, ID_PATTERN, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PROTOCOL_VERSION } from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { decodeMessage, encodeMessage, errorMessage, Encoding, type Cut, type Data, type DecodedFrame, type DiskState, type Hello } from '../protocol/frame-codec.js';
import { decodeBlock } from '../protocol/block-codec.js';
import { digest, digestEquals, zeroBuffer } from '../protocol/digest.js';
import type { ImageReader, ReplicaBackend, ReplicaStore, WriteOp } from '../target/replica-store.js';
import type { DiskLeases } from './disk-leases.js';
import type { FailoverState } from './failover-state.js';
import type { HealthBoard } from './health.js';
import type { SessionMetrics } from './metrics.js';
import type { CutStore, PointBook } from './points.js';

/** What a session needs from the server. */
export interface SessionDeps {
  log: Logger;
  stats: { rejected: number; bytesReceived: number };
  heartbeatMs: number;
  maxFrameBytes: number;
  creditBytes: number;
  /** Event-loop utilization in percent, reported in every Ack (see util/loop-load.ts). */
  busyPct(): number;
  /** The pre-shared agent token (token sessions of unregistered agents). */
  token(): string;
  /** A registered agent must authenticate with its certificate, never the token. */
  isRegistered(agentId: string): boolean;
  /** The host agent that acts for a VM machine (host mode), or null when the machine is not a VM. */
  hostOf(agentId: string): string | null;
  failoverState(agentId: string): Promise<FailoverState | null>;
  backend: ReplicaBackend;
  leases: DiskLeases;
  points: PointBook;
  health: HealthBoard;
  /** Counts what nothing else does: frames, bytes per disk, target write latency, freezes, errors (server/metrics.ts). */
  metrics: SessionMetrics;
}

export function tokenMatches(given: string, expected: string): boolean {
  const a = crypto.createHash('sha256').update(given).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

interface SessionDisk {
  key: string;
  diskId: string;
  sizeBytes: number;
  blockSize: number;
  pageSize: number;
  store: ReplicaStore;
  lastSeq: number;
}

/** Replica blocks read at once to apply a frame's changed pages on (see onData). */
const PATCH_READS_IN_FLIGHT = 16;

/** Runs tasks, at most `limit` at a time; rejects with the first failure once every started task settled. */
async function runLimited(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | null = null;
  const worker = async () => {
    while (!failure && next < tasks.length) {
      const task = tasks[next++];
      try {
        await task();
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (failure) throw (failure as { err: unknown }).err;
}

/** Largest buffer one data frame's lz4 blocks are decoded into at once (a larger frame decodes block by block). */
const MAX_DECODED_FRAME_BYTES = 32 * 1024 * 1024;
/** Pages a cut may sample per disk (the agent sends far fewer). */
const MAX_CUT_SAMPLES = 4096;

const zeroDigests = new Map<number, bigint>();
function zeroDigest(len: number): bigint {
  let d = zeroDigests.get(len);
  if (d === undefined) {
    d = digest(zeroBuffer(len));
    zeroDigests.set(len, d);
  }
  return d;
}

/**
 * Inclusive runs [first, last] of the sorted page numbers; runs with at most `gap` pages between
 * them are merged (Infinity: one run from the first to the last page).
 */
export function pageRuns(pages: number[], gap: number): [number, number][] {
  const out: [number, number][] = [];
  for (const x of pages) {
    const last = out[out.length - 1];
    if (last && x - last[1] - 1 <= gap) last[1] = x;
    else out.push([x, x]);
  }
  return out;
}

export class Session {
  private state: 'await-hello' | 'ready' | 'closed' = 'await-hello';
  private chain: Promise<void> = Promise.resolve();
  private disks: SessionDisk[] = [];
  private agentId = '';
  /** The disks the Hello named (status notes on them when the target fails). */
  private diskIds: string[] = [];
  private granted = 0;
  private received = 0;
  private digestInFlight = 0;
  private readOnly = false;
  /** Reprotect sessions read the promoted images instead of replicas. */
  private images: ImageReader[] | null = null;
  private helloInProgress = false;
  private lastRecv = Date.now();
  private hbTimer: NodeJS.Timeout;
  private readonly log: Logger;

  constructor(private readonly server: SessionDeps, private readonly ws: WebSocket, peer: string,
    private readonly certAgentId: string | null = null, private readonly certError: MobilityError | null = null) {
    this.log = server.log.child({ peer });
    ws.on('message', (data, isBinary) => this.onMessage(data as Buffer, isBinary));
    ws.on('close', () => this.cleanup());
    ws.on('error', (err) => {
      // ws raises 1009 here for messages above WS_MAX_PAYLOAD
      this.log.warn('connection error', { error: err.message });
      this.cleanup();
    });
    this.hbTimer = setInterval(() => this.heartbeat(), this.server.heartbeatMs);
    this.hbTimer.unref();
  }

  private heartbeat(): void {
    if (this.helloInProgress) return; // opening replicas (WAL replay) may take a while: not the agent's silence
    if (Date.now() - this.lastRecv > this.server.heartbeatMs * HEARTBEAT_MAX_MISSED) {
      this.fail(new MobilityError('MOB_ERR_HEARTBEAT_TIMEOUT', `no frame from the agent for ${Date.now() - this.lastRecv} ms`));
      return;
    }
    // nothing but a Welcome or an Error may precede the Welcome
    if (this.state === 'ready') this.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: Date.now(), reply: false } }));
  }

  get agent(): string { return this.agentId; }
  /** The registered agent whose certificate opened this session (null: token session). */
  get certAgent(): string | null { return this.certAgentId; }
  /** A ready session that writes (protect or replicate) can take a cut. */
  get canCut(): boolean { return this.state === 'ready' && !this.readOnly; }

  sendCutRequest(kind: 'crash' | 'app', reason: string): void {
    this.send(encodeMessage({ type: 'cutRequest', cutRequest: { kind, reason } }));
  }

  private send(buf: Buffer): void {
    if (this.ws.readyState === this.ws.OPEN) this.ws.send(buf);
  }

  private onMessage(data: Buffer, isBinary: boolean): void {
    this.lastRecv = Date.now();
    if (this.state === 'closed') return;
    this.server.stats.bytesReceived += data.length;
    let frame: DecodedFrame;
    try {
      if (!isBinary) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'text messages are not part of the protocol');
      frame = decodeMessage(data, this.server.maxFrameBytes);
    } catch (err) {
      this.server.metrics.frame('invalid');
      this.fail(toMobilityError(err, 'MOB_ERR_FRAME_MALFORMED'));
      return;
    }
    this.server.metrics.frame(frame.type);
    const size = data.length;
    this.chain = this.chain.then(() => this.handle(frame, size)).catch((err) => this.fail(toMobilityError(err)));
  }

  private async handle(frame: DecodedFrame, size: number): Promise<void> {
    if (this.state === 'closed') return;
    if (this.state === 'await-hello') {
      if (frame.type !== 'hello') throw new MobilityError('MOB_ERR_HANDSHAKE', `expected hello, got ${frame.type}`);
      this.helloInProgress = true;
      try {
        await this.onHello(frame.hello);
      } finally {
        this.helloInProgress = false;
        this.lastRecv = Date.now();
      }
      return;
    }
    if (this.readOnly && (frame.type === 'data' || frame.type === 'passEnd' || frame.type === 'cut')) {
      throw new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', `${frame.type} frames are not allowed in a read-only (verify) session`);
    }
    switch (frame.type) {
      case 'data':
        this.received += size;
        if (this.received > this.granted) {
          throw new MobilityError('MOB_ERR_CREDIT_EXCEEDED', `agent sent ${this.received} bytes with ${this.granted} granted`);
        }
        await this.onData(frame.data, frame.payload, size);
        return;
      case 'readRequest':
        this.onReadRequest(frame.readRequest.disk, frame.readRequest.requestId, frame.readRequest.firstPage, frame.readRequest.pageCount);
        return;
      case 'digestRequest':
        this.onDigestRequest(frame.digestRequest.disk, frame.digestRequest.requestId, frame.digestRequest.firstPage, frame.digestRequest.pageCount);
        return;
      case 'passEnd': {
        const d = this.disk(frame.passEnd.disk);
        this.nextSeq(d, frame.passEnd.seq);
        const kind = frame.passEnd.kind;
        if (!['initial', 'incremental', 'resync'].includes(kind)) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `unknown pass kind ${kind}`);
        await d.store.endPass(kind, frame.passEnd.seq);
        this.log.info('pass complete', { agent: this.agentId, disk: d.diskId, kind, seq: frame.passEnd.seq });
        this.send(encodeMessage({ type: 'ack', ack: { disk: frame.passEnd.disk, seq: frame.passEnd.seq, creditBytes: 0, busyPct: this.server.busyPct() } }));
        return;
      }
      case 'cut':
        // the point's time becomes a Date: beyond ±8.64e15 ms there is none (found by the fuzz test)
        if (frame.cut.takenAtMs > 8.64e15) throw new MobilityError('MOB_ERR_CUT', `cut time ${frame.cut.takenAtMs} ms is not a representable date`);
        await this.onCut(frame.cut);
        return;
      case 'health':
        this.server.health.record(this.agentId, this.disks.map((d) => d.diskId), frame.health);
        return;
      case 'heartbeat':
        if (!frame.heartbeat.reply) this.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: frame.heartbeat.sentAtMs, reply: true } }));
        return;
      case 'hello':
        throw new MobilityError('MOB_ERR_HANDSHAKE', 'hello sent twice');
      default:
        throw new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', `an agent may not send ${frame.type} frames`);
    }
  }

  private async onHello(h: Hello): Promise<void> {
    if (h.protocolVersion !== PROTOCOL_VERSION) {
      throw new MobilityError('MOB_ERR_PROTOCOL_VERSION', `agent speaks protocol ${h.protocolVersion}, server speaks ${PROTOCOL_VERSION}`);
    }
    if (this.certError) {
      this.server.stats.rejected++;
      throw this.certError;
    }
    if (this.certAgentId !== null) {
      // a registered agent: its certificate is its identity, and it writes only its own disks, or
      // those of the VMs it hosts (host mode: a VM machine has no certificate of its own)
      if (h.agentId !== this.certAgentId && !(ID_PATTERN.test(h.agentId) && this.server.hostOf(h.agentId) === this.certAgentId)) {
        this.server.stats.rejected++;
        throw new MobilityError('MOB_ERR_FORBIDDEN', `the certificate of agent ${this.certAgentId} cannot replicate the disks of agent ${JSON.stringify(h.agentId)}`);
      }
    } else {
      if (!tokenMatches(h.token, this.server.token())) {
        this.server.stats.rejected++;
        throw new MobilityError('MOB_ERR_AUTH', 'agent token refused');
      }
      if (ID_PATTERN.test(h.agentId) && this.server.isRegistered(h.agentId)) {
        this.server.stats.rejected++;
        throw new MobilityError('MOB_ERR_FORBIDDEN', `agent ${h.agentId} is registered: its replication must authenticate with its own client certificate, not the shared token`);
      }
    }
    if (!ID_PATTERN.test(h.agentId)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `agent id ${JSON.stringify(h.agentId)} is not [A-Za-z0-9._-]{1,64}`);
    if (h.disks.length === 0 || h.disks.length > 64) throw new MobilityError('MOB_ERR_HANDSHAKE', `a session carries 1 to 64 disks, not ${h.disks.length}`);
    const seen = new Set<string>();
    for (const d of h.disks) {
      if (!ID_PATTERN.test(d.diskId)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `disk id ${JSON.stringify(d.diskId)} is not [A-Za-z0-9._-]{1,64}`);
      if (seen.has(d.diskId)) throw new MobilityError('MOB_ERR_HANDSHAKE', `disk ${d.diskId} listed twice`);
      seen.add(d.diskId);
      if (d.pageSize < 512 || d.pageSize > 65536 || (d.pageSize & (d.pageSize - 1)) !== 0) throw new MobilityError('MOB_ERR_HANDSHAKE', `page size ${d.pageSize} is not a power of two in 512..65536`);
      if (d.blockSize < MIN_BLOCK_SIZE || d.blockSize > MAX_BLOCK_SIZE || d.blockSize % d.pageSize !== 0) throw new MobilityError('MOB_ERR_HANDSHAKE', `block size ${d.blockSize} is not a multiple of the page size within ${MIN_BLOCK_SIZE}..${MAX_BLOCK_SIZE}`);
      if (!Number.isSafeInteger(d.sizeBytes) || d.sizeBytes <= 0 || d.sizeBytes % 512 !== 0) throw new MobilityError('MOB_ERR_HANDSHAKE', `disk size ${d.sizeBytes} is not a positive multiple of 512`);
    }
    this.agentId = h.agentId;
    this.readOnly = h.readOnly === true;
    this.diskIds = h.disks.map((d) => d.diskId);
    const fo = await this.server.failoverState(h.agentId);
    if (h.purpose === 'reprotect') return this.onReprotectHello(h, fo);
    if (h.purpose) throw new MobilityError('MOB_ERR_HANDSHAKE', `unknown session purpose ${JSON.stringify(h.purpose)}`);
    if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `agent ${h.agentId} was failed over to ${fo.point} at ${fo.failedOverAt}; replication is stopped until 'mobility reprotect' fails it back`);
    // a disk the filesystem cannot hold as one file is refused before anything is created
    if (!h.readOnly) {
      for (const d of h.disks) {
        await this.server.backend.checkFits(h.agentId, d.diskId, d.sizeBytes);
      }
    }
    const states: DiskState[] = [];
    // new replicas stay in their temporary directories until every disk of the session is open:
    // a session refused half-way (or whose connection drops) leaves nothing behind
    // a new replica already published when a later disk failed (or the connection dropped) is removed too
    const created = new Set<string>();
    const published = new Set<string>();
    const dropUnpublished = async () => { for (const d of this.disks) await d.store.discard(); };
    const undo = async () => {
      await dropUnpublished();
      this.releaseAll(new Set([...created].filter((k) => published.has(k))));
    };
    try {
      for (const d of h.disks) {
        const { store, created: isNew, key } = await this.server.leases.acquire(this, h.agentId, d.diskId, d.sizeBytes, h.readOnly, false);
        if (isNew) created.add(key);
        this.disks.push({ key, diskId: d.diskId, sizeBytes: d.sizeBytes, blockSize: d.blockSize, pageSize: d.pageSize, store, lastSeq: store.lastDurableSeq });
        states.push({
          diskId: d.diskId, lastDurableSeq: store.lastDurableSeq, generation: store.generation, initialComplete: store.initialComplete,
          sizeBytes: store.sizeBytes, replicaExists: !isNew,
        });
      }
      if (this.state !== 'closed') {
        for (const d of this.disks) {
          await d.store.publish();
          published.add(d.key);
        }
      }
    } catch (err) {
      await undo();
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
    if (this.state === 'closed') {
      await undo();
      return;
    }
    this.state = 'ready';
    this.granted = this.server.creditBytes;
    this.log.info('agent connected', { agent: h.agentId, disks: h.disks.map((d) => d.diskId), agentVersion: h.agentVersion });
    this.send(encodeMessage({
      type: 'welcome',
      welcome: {
        protocolVersion: PROTOCOL_VERSION, sessionId: crypto.randomUUID(), disks: states, creditBytes: this.granted,
        maxFrameBytes: this.server.maxFrameBytes, heartbeatMs: this.server.heartbeatMs,
      },
    }));
  }

  /** A reprotect session: the agent reads the promoted images (digests and pages), writes nothing. */
  private async onReprotectHello(h: Hello, fo: FailoverState | null): Promise<void> {
    if (!fo) throw new MobilityError('MOB_ERR_CONFIG', `agent ${h.agentId} is not failed over: nothing to reprotect from`);
    this.readOnly = true;
    const images: ImageReader[] = [];
    this.images = images;
    const states: DiskState[] = [];
    for (const d of h.disks) {
      const p = fo.disks[d.diskId];
      if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${d.diskId} is not part of the failover of ${h.agentId} (${Object.keys(fo.disks).join(', ')})`);
      if (p.sizeBytes !== d.sizeBytes) throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `disk ${d.diskId} is ${d.sizeBytes} bytes, its promoted image ${p.sizeBytes}`);
      images.push(await this.server.backend.openImage(p));
      this.pageSizes.push(d.pageSize);
      states.push({ diskId: d.diskId, lastDurableSeq: 0, generation: fo.point, initialComplete: true, sizeBytes: p.sizeBytes, replicaExists: true });
    }
    if (this.state === 'closed') return;
    this.state = 'ready';
    this.log.info('reprotect session', { agent: h.agentId, point: fo.point, disks: h.disks.map((d) => d.diskId) });
    this.send(encodeMessage({
      type: 'welcome',
      welcome: { protocolVersion: PROTOCOL_VERSION, sessionId: crypto.randomUUID(), disks: states, creditBytes: 0, maxFrameBytes: this.server.maxFrameBytes, heartbeatMs: this.server.heartbeatMs },
    }));
  }

  private pageSizes: number[] = [];

  private image(i: number): ImageReader {
    const img = this.images?.[i];
    if (!img) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk index ${i} is not part of this session`);
    return img;
  }

  private onReadRequest(diskIdx: number, requestId: number, firstPage: number, pageCount: number): void {
    if (!this.images) throw new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', 'read requests are only allowed in reprotect sessions');
    const img = this.image(diskIdx);
    if (pageCount <= 0 || pageCount > 256) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `read request for ${pageCount} pages (1..256)`);
    if (this.digestInFlight >= DIGEST_REQUESTS_IN_FLIGHT * 2) throw new MobilityError('MOB_ERR_CREDIT_EXCEEDED', 'too many outstanding requests');
    this.digestInFlight++;
    img.read(firstPage, pageCount, this.pageSizes[diskIdx]).then(
      (data) => {
        this.digestInFlight--;
        this.send(encodeMessage({ type: 'readReply', readReply: { disk: diskIdx, requestId, firstPage, pageCount } }, data));
      },
      (err) => this.fail(toMobilityError(err, 'MOB_ERR_STORAGE')),
    );
  }

  /**
   * A cut covers everything received before it on this session, for every disk of the session,
   * and carries the source's sampled page digests: the point is recorded only if they match.
   */
  private async onCut(c: Cut): Promise<void> {
    if (c.kind !== 'crash' && c.kind !== 'app') throw new MobilityError('MOB_ERR_CUT', `unknown cut kind ${JSON.stringify(c.kind)}`);
    const seen = new Set<number>();
    const stores: CutStore[] = [];
    for (const cd of c.disks) {
      const d = this.disk(cd.disk);
      if (seen.has(cd.disk)) throw new MobilityError('MOB_ERR_CUT', `cut names disk ${d.diskId} twice`);
      seen.add(cd.disk);
      if (cd.seq > d.lastSeq) throw new MobilityError('MOB_ERR_CUT', `cut names sequence ${cd.seq} on disk ${d.diskId}, but only ${d.lastSeq} was received`);
      const pages = cd.samplePages ?? [];
      const digests = cd.sampleDigests ?? new Uint8Array(0);
      if (pages.length === 0) throw new MobilityError('MOB_ERR_CUT', `cut carries no verification samples for disk ${d.diskId}: a point needs evidence`);
      if (pages.length > MAX_CUT_SAMPLES) throw new MobilityError('MOB_ERR_CUT', `cut carries ${pages.length} samples for disk ${d.diskId} (at most ${MAX_CUT_SAMPLES})`);
      if (digests.length !== pages.length * 8) throw new MobilityError('MOB_ERR_CUT', `cut carries ${digests.length} digest bytes for ${pages.length} sampled pages of disk ${d.diskId}`);
      for (const p of pages) {
        if (!Number.isSafeInteger(p) || p < 0 || p * d.pageSize >= d.sizeBytes) throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `sampled page ${p} lies beyond the ${d.sizeBytes}-byte disk ${d.diskId}`);
      }
      stores.push({ index: cd.disk, diskId: d.diskId, store: d.store, seq: d.lastSeq, pageSize: d.pageSize, samplePages: pages, sampleDigests: digests });
    }
    if (seen.size !== this.disks.length) throw new MobilityError('MOB_ERR_CUT', `a cut must cover every disk of the session (${seen.size} of ${this.disks.length})`);
    // the disks were frozen whether or not the cut becomes a point
    this.server.metrics.cutFrozen(this.agentId, stores.map((s) => s.diskId), c.frozenMs);
    const r = await this.server.points.recordCut(this.agentId, stores, c);
    if (!r.pointId) {
      for (const i of new Set(r.mismatches.map((m) => m.disk))) {
        const id = this.disks[i]?.diskId;
        if (id) this.server.metrics.diskError(this.agentId, id, 'MOB_ERR_POINT_UNVERIFIED');
      }
    }
    if (r.pointId) {
      this.send(encodeMessage({ type: 'cutAck', cutAck: { cutId: c.cutId, pointId: r.pointId, verifiedPages: r.verifiedPages } }));
    } else {
      this.send(encodeMessage({
        type: 'cutAck',
        cutAck: { cutId: c.cutId, pointId: '', errorCode: 'MOB_ERR_POINT_UNVERIFIED', errorMessage: r.message, mismatches: r.mismatches.slice(0, 64) },
      }));
    }
  }

  private disk(i: number): SessionDisk {
    const d = this.disks[i];
    if (!d) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk index ${i} is not part of this session (${this.disks.length} disks)`);
    return d;
  }

  private nextSeq(d: SessionDisk, seq: number): void {
    if (seq <= d.lastSeq) throw new MobilityError('MOB_ERR_SEQUENCE', `sequence ${seq} on disk ${d.diskId} does not follow ${d.lastSeq}`);
    d.lastSeq = seq;
  }

  /** Validates and decodes every block of the frame before anything is queued for persistence. */
  private async onData(m: Data, payload: Buffer, size: number): Promise<void> {
    const d = this.disk(m.disk);
    this.nextSeq(d, m.seq);
    const ops: (WriteOp | WriteOp[])[] = [];
    // every whole lz4 block of the frame decodes into one buffer: one allocation per frame, and
    // blocks adjacent on disk stay adjacent in memory (a target sends them on without a copy)
    let lz4Bytes = 0;
    let lz4Payload = 0;
    for (const b of m.blocks) {
      if (b.pageMask.length === 0 && b.encoding === Encoding.LZ4) {
        const offset = b.index * d.blockSize;
        if (Number.isSafeInteger(offset) && offset >= 0 && offset < d.sizeBytes) lz4Bytes += Math.min(d.blockSize, d.sizeBytes - offset);
        lz4Payload += b.length;
      }
    }
    // no more than what the frame's payload can decode to (lz4 expands at most ~255x): a small
    // hostile frame claiming big blocks does not get a big buffer
    const decoded = lz4Bytes > 0 && lz4Bytes <= MAX_DECODED_FRAME_BYTES && lz4Payload <= payload.length && lz4Bytes <= 256 * lz4Payload
      ? Buffer.allocUnsafe(lz4Bytes) : null;
    let at = 0;
    let o = 0;
    /** Decoded bytes the frame carries (whole blocks, changed pages) and bytes it flags as zero (metrics). */
    let dataBytes = 0;
    let zeroBytes = 0;
    const patches: { index: number; run: (spans: boolean) => Promise<void> }[] = [];
    for (const b of m.blocks) {
      const offset = b.index * d.blockSize;
      if (!Number.isSafeInteger(offset) || offset < 0 || offset >= d.sizeBytes) {
        throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `block ${b.index} lies beyond the ${d.sizeBytes}-byte disk ${d.diskId}`);
      }
      const blockLen = Math.min(d.blockSize, d.sizeBytes - offset);
      if (b.length > payload.length - o) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `block ${b.index} claims ${b.length} payload bytes, ${payload.length - o} remain`);
      const p = payload.subarray(o, o + b.length);
      o += b.length;
      let data: Buffer | null;
      if (b.pageMask.length === 0) {
        if (b.encoding === Encoding.ZERO) {
          if (b.length !== 0) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'zero block carries a payload');
          if (b.digest.length !== 8 || Buffer.from(b.digest).readBigUInt64LE(0) !== zeroDigest(blockLen)) {
            throw new MobilityError('MOB_ERR_DIGEST_MISMATCH', `block ${b.index} of ${d.diskId}: zero flag does not match its digest`);
          }
          data = null;
          zeroBytes += blockLen;
        } else {
          const into = decoded && b.encoding === Encoding.LZ4 && at + blockLen <= decoded.length ? decoded.subarray(at, at + blockLen) : undefined;
          data = decodeBlock(b.encoding, p, blockLen, into);
          if (into) at += blockLen;
          if (!digestEquals(data, b.digest)) throw new MobilityError('MOB_ERR_DIGEST_MISMATCH', `block ${b.index} of ${d.diskId} does not match its digest`);
          dataBytes += blockLen;
        }
      } else {
        // filled in by the patch: the whole block, or the runs of changed pages (in place, so the
        // frame's writes keep their order)
        const slot: WriteOp[] = [];
        const { index, pageMask, encoding, digest: dig } = b;
        patches.push({
          index,
          run: async (spans: boolean) => {
            const r = await this.patch(d, index, offset, blockLen, pageMask, encoding, p, dig);
            dataBytes += r.pageBytes;
            if (!spans) {
              slot.push({ offset, length: blockLen, data: r.block });
              return;
            }
            // only the changed pages are written (WAL, replica, undo): a 4 KiB change in a 64 KiB
            // block costs 4 KiB on the target, not 64. The rest of the verified block is what the
            // store already holds (read() sees every accepted write, and the store applies
            // overlapping writes in submission order). Runs closer than the store's patch gap are
            // written as one (a remote store pays per call, not per byte).
            for (const [a, z] of pageRuns(r.pages, Math.floor((d.store.patchGapBytes ?? 0) / d.pageSize))) {
              const start = a * d.pageSize;
              const end = Math.min(blockLen, (z + 1) * d.pageSize);
              slot.push({ offset: offset + start, length: end - start, data: r.block.subarray(start, end) });
            }
          },
        });
        ops.push(slot);
        continue;
      }
      ops.push({ offset, length: blockLen, data });
    }
    if (o !== payload.length) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `frame carries ${payload.length - o} payload bytes no block accounts for`);
    // changed pages are applied on the replica's current blocks: read together (with a remote
    // target each read is a request), one after the other when a block comes twice in the frame
    if (patches.length) {
      // a block named twice in one frame: each patch reads the store as it was before the frame
      // (the frame's writes are submitted together, after), so the later one's verified block is
      // written whole and wins, as it would have without the earlier one
      const distinct = new Set(patches.map((x) => x.index)).size === patches.length;
      await runLimited(patches.map((x) => () => x.run(distinct)), distinct ? PATCH_READS_IN_FLIGHT : 1);
    }
    const seq = m.seq;
    this.server.metrics.data(this.agentId, d.diskId, size, dataBytes, zeroBytes);
    // the callback keeps only numbers: the decoded header's byte fields are views of the
    // message, which must not outlive this call (see target/staging.ts)
    const disk = m.disk;
    const submitted = performance.now();
    d.store.submit(ops.flat(), seq).then(
      () => {
        this.server.metrics.targetWrite((performance.now() - submitted) / 1000);
        // credit comes back only with the ack, after persistence: that bounds what is buffered here
        this.granted += size;
        this.send(encodeMessage({ type: 'ack', ack: { disk, seq, creditBytes: size, busyPct: this.server.busyPct() } }));
      },
      (err) => this.fail(toMobilityError(err, 'MOB_ERR_STORAGE')),
    );
  }

  /** Applies changed pages on top of the replica's current block and checks the result. */
  private async patch(d: SessionDisk, index: number, offset: number, blockLen: number, mask: Uint8Array, enc: Encoding, p: Buffer, dig: Uint8Array): Promise<{ block: Buffer; pageBytes: number; pages: number[] }> {
    const pagesInBlock = Math.ceil(blockLen / d.pageSize);
    if (mask.length !== Math.ceil(pagesInBlock / 8)) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `page mask of ${mask.length} bytes for a ${pagesInBlock}-page block`);
    const pages: number[] = [];
    let expected = 0;
    for (let i = 0; i < mask.length * 8; i++) {
      if (!(mask[i >> 3] & (1 << (i & 7)))) continue;
      if (i >= pagesInBlock) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `page mask names page ${i} of a ${pagesInBlock}-page block`);
      pages.push(i);
      expected += Math.min(d.pageSize, blockLen - i * d.pageSize);
    }
    if (pages.length === 0) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `empty page mask for block ${index}`);
    const delta = decodeBlock(enc, p, expected);
    const block = Buffer.from(await d.store.read(offset, blockLen));
    let src = 0;
    for (const i of pages) {
      const len = Math.min(d.pageSize, blockLen - i * d.pageSize);
      delta.copy(block, i * d.pageSize, src, src + len);
      src += len;
    }
    if (!digestEquals(block, dig)) {
      throw new MobilityError('MOB_ERR_REPLICA_DIVERGED', `block ${index} of ${d.diskId}: changed pages applied to the replica do not give the source block`);
    }
    return { block, pageBytes: expected, pages };
  }

  private onDigestRequest(diskIdx: number, requestId: number, firstPage: number, pageCount: number): void {
    if (pageCount <= 0 || pageCount > 65536) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `digest request for ${pageCount} pages (1..65536)`);
    if (this.images) {
      const img = this.image(diskIdx);
      if (this.digestInFlight >= DIGEST_REQUESTS_IN_FLIGHT * 2) throw new MobilityError('MOB_ERR_CREDIT_EXCEEDED', 'too many outstanding digest requests');
      this.digestInFlight++;
      img.pageDigests(firstPage, pageCount, this.pageSizes[diskIdx]).then(
        (digests) => {
          this.digestInFlight--;
          this.send(encodeMessage({ type: 'digestReply', digestReply: { disk: diskIdx, requestId, firstPage, pageCount: digests.length / 8 } }, digests));
        },
        (err) => this.fail(toMobilityError(err, 'MOB_ERR_STORAGE')),
      );
      return;
    }
    const d = this.disk(diskIdx);
    if (firstPage * d.pageSize >= d.sizeBytes) throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `page ${firstPage} lies beyond the ${d.sizeBytes}-byte disk ${d.diskId}`);
    if (this.digestInFlight >= DIGEST_REQUESTS_IN_FLIGHT * 2) throw new MobilityError('MOB_ERR_CREDIT_EXCEEDED', 'too many outstanding digest requests');
    this.digestInFlight++;
    d.store.pageDigests(firstPage, pageCount, d.pageSize).then(
      (digests) => {
        this.digestInFlight--;
        this.send(encodeMessage({ type: 'digestReply', digestReply: { disk: diskIdx, requestId, firstPage, pageCount: digests.length / 8 } }, digests));
      },
      (err) => this.fail(toMobilityError(err, 'MOB_ERR_STORAGE')),
    );
  }

  /** Sends a coded error, closes the connection and releases the disks. Idempotent. */
  fail(err: MobilityError): void {
    if (this.state === 'closed') return;
    // a target that failed (unreachable, credentials, quota) pauses the disks: status says why
    if (err.code.startsWith('MOB_ERR_TARGET_') && this.agentId) {
      for (const d of this.diskIds) this.server.health.note(this.agentId, d, 'target-unavailable', `${err.code}: ${err.message}`);
    }
    if (err.code !== 'MOB_ERR_SHUTTING_DOWN') this.server.metrics.sessionError(err.code, this.agentId || null, this.diskIds);
    const level = err.code === 'MOB_ERR_SHUTTING_DOWN' ? 'info' : 'warn';
    this.log.log(level, 'closing session', { agent: this.agentId || undefined, code: err.code, error: err.message });
    this.send(errorMessage(err));
    this.ws.close(4000, err.code);
    const t = setTimeout(() => this.ws.terminate(), 2000);
    t.unref();
    this.cleanup();
  }

  private cleanup(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    clearInterval(this.hbTimer);
    // let in-flight handling settle, then checkpoint and release each disk
    void this.chain.finally(() => this.releaseAll());
  }

  /** Closes every disk's store; those named in `remove` (replicas this session created) are removed once closed. */
  private releaseAll(remove: Set<string> = new Set()): void {
    if (this.images) for (const img of this.images) void img.close();
    this.images = null;
    if (this.agentId) this.server.health.markDisconnected(this.agentId, this.disks.filter((d) => !remove.has(d.key)).map((d) => d.diskId));
    for (const d of this.disks) this.server.leases.release(d.key, d.store, remove.has(d.key) ? { agentId: this.agentId, diskId: d.diskId } : undefined);
    this.disks = [];
  }
}

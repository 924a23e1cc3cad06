/**
 * Process server: accepts agent connections over wss, authenticates them,
 * verifies every block before it is persisted, commits through the replica
 * store and acknowledges only durable data. One bad client never affects the
 * others: its errors are answered with a coded Error frame and its connection
 * is closed; nothing from the offending frame is persisted.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import https from 'node:https';
import http from 'node:http';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import {
  CREDIT_WINDOW_BYTES, DIGEST_REQUESTS_IN_FLIGHT, HEARTBEAT_MAX_MISSED, HEARTBEAT_MS, ID_PATTERN, MAX_BLOCK_SIZE,
  MAX_FRAME_BYTES, MIN_BLOCK_SIZE, PROTOCOL_VERSION, WS_MAX_PAYLOAD,
} from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { ensureTlsIdentity, type TlsIdentity } from '../transport/tls.js';
import { decodeMessage, encodeMessage, errorMessage, Encoding, type Data, type DecodedFrame, type DiskState, type Hello } from '../protocol/frame-codec.js';
import { decodeBlock } from '../protocol/block-codec.js';
import { digest, digestEquals, zeroBuffer } from '../protocol/digest.js';
import { ReplicaStore, type WriteOp } from '../target/local/local-store.js';
import { checkReplicaFits } from '../target/local/file-size-limit.js';
import { PointCatalog, type PointKind, type RecoveryPoint } from '../target/catalog.js';
import type { Cut, CutMismatch, Health } from '../protocol/frame-codec.js';
import { handleApi } from './api.js';
import { PromotedImage, readFailoverState, type FailoverState } from './failover.js';
import { writeFileDurable } from '../util/durable-file.js';
import type { TLSSocket } from 'node:tls';
import { ConfigDb, type Policy } from './config-db.js';
import { ControlHub } from './control.js';
import { ensurePassphrase, Registry } from './registry.js';

export interface ProcessServerOptions {
  dataDir: string;
  host?: string;
  port?: number;
  tls?: boolean;
  extraNames?: string[];
  logger?: Logger;
  heartbeatMs?: number;
  maxFrameBytes?: number;
  creditBytes?: number;
  /** Recovery points older than this are pruned (the newest is always kept). Default 24 h. */
  retentionMs?: number;
  /** status flags a disk whose newest point is older than this. Default 15 min. */
  rpoAlertMs?: number;
  /** Failed registrations per address before MOB_ERR_RATE_LIMITED (default 10 per minute). */
  registerFailureLimit?: number;
  /** Registration challenges per address per minute (default 60). */
  registerChallengeLimit?: number;
}

/** Last Health report of a disk, as kept by the server for status. */
export interface DiskHealthRecord {
  state: string; reason: string; backlogBytes: number; dataLagMs: number; churnBytesPerSec: number;
  freezeFailures: number; lastFreezeMs: number; progressPermille: number; receivedAt: number; connected: boolean;
}

/** What a cut watcher hears (ProcessServer.watchCuts): a recorded recovery point, or a cut that failed. */
export type CutNotice = { point: RecoveryPoint } | { failed: { code: string; message: string } };

/** Reads the pre-shared agent token, creating it (mode 0600) on first start. */
export async function ensureToken(dataDir: string): Promise<string> {
  const file = path.join(dataDir, 'token');
  try {
    const t = (await fsp.readFile(file, 'utf8')).trim();
    if (t) return t;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const token = crypto.randomBytes(32).toString('base64url');
  await writeFileDurable(file, token + '\n', 0o600);
  return token;
}

function tokenMatches(given: string, expected: string): boolean {
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

/** One disk of a cut, as recordCut needs it: its store, the cut's sequence and the source's samples. */
export interface CutStore { index: number; diskId: string; store: ReplicaStore; seq: number; pageSize: number; samplePages: number[]; sampleDigests: Uint8Array }
export interface CutOutcome { pointId: string | null; mismatches: CutMismatch[]; message: string; verifiedPages: number }

/** Compares the source's sampled page digests with the replica's pages; returns the differences. */
async function verifySamples(s: CutStore): Promise<CutMismatch[]> {
  const out: CutMismatch[] = [];
  const src = Buffer.from(s.sampleDigests.buffer, s.sampleDigests.byteOffset, s.sampleDigests.byteLength);
  for (const [i, page] of s.samplePages.entries()) {
    const have = (await s.store.pageDigests(page, 1, s.pageSize)).readBigUInt64LE(0);
    const want = src.readBigUInt64LE(8 * i);
    if (have !== want) out.push({ disk: s.index, page, replicaDigest: have, sourceDigest: want });
  }
  return out;
}

function hex64(v: bigint): string {
  return v.toString(16).padStart(16, '0');
}

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

export class ProcessServer {
  private http: https.Server | http.Server | null = null;
  private wss: WebSocketServer | null = null;
  private controlWss: WebSocketServer | null = null;
  private readonly sessions = new Set<Session>();
  /** Disk key -> the session holding it, or the promise of its store closing. */
  readonly diskLocks = new Map<string, Session | Promise<void>>();
  readonly log: Logger;
  token = '';
  identity: TlsIdentity | null = null;
  stats = { sessions: 0, rejected: 0, bytesReceived: 0, points: 0, pruned: 0, unverified: 0 };
  private readonly catalogs = new Map<string, Promise<PointCatalog>>();
  private readonly agentLocks = new Map<string, Promise<unknown>>();
  /** agent -> disk -> last health */
  readonly health = new Map<string, Map<string, DiskHealthRecord>>();
  db!: ConfigDb;
  registry!: Registry;
  control!: ControlHub;

  constructor(readonly opts: ProcessServerOptions) {
    this.log = opts.logger ?? createLogger({ component: 'server' });
  }

  get heartbeatMs(): number { return this.opts.heartbeatMs ?? HEARTBEAT_MS; }
  get maxFrameBytes(): number { return this.opts.maxFrameBytes ?? MAX_FRAME_BYTES; }
  get creditBytes(): number { return this.opts.creditBytes ?? CREDIT_WINDOW_BYTES; }

  /** Starts listening; resolves with the bound address. */
  async start(): Promise<AddressInfo> {
    await fsp.mkdir(this.opts.dataDir, { recursive: true, mode: 0o700 });
    this.token = await ensureToken(this.opts.dataDir);
    this.db = ConfigDb.open(this.opts.dataDir);
    await ensurePassphrase(this.opts.dataDir);
    this.control = new ControlHub(this.db, this.log.child({ component: 'control' }));
    this.registry = new Registry({
      dataDir: this.opts.dataDir, db: this.db, log: this.log.child({ component: 'registry' }),
      fingerprint: () => this.identity?.fingerprint256 ?? '', failureLimit: this.opts.registerFailureLimit, challengeLimit: this.opts.registerChallengeLimit,
      isConnected: (agentId) => this.control.connected(agentId) || [...this.sessions].some((s) => s.certAgent === agentId),
      onReplaced: (agentId) => {
        const e = new MobilityError('MOB_ERR_NOT_REGISTERED', `agent ${agentId} registered again: connections made with its previous certificate are closed`);
        for (const s of this.sessions) if (s.certAgent === agentId) s.fail(e);
        this.control.disconnect(agentId, e);
      },
    });
    const useTls = this.opts.tls ?? true;
    if (useTls) {
      this.identity = await ensureTlsIdentity(this.opts.dataDir, this.opts.extraNames);
      // client certificates are asked for, not required: operators and legacy agents use the bearer token
      this.http = https.createServer({ key: this.identity.key, cert: this.identity.cert, ca: this.identity.ca, requestCert: true, rejectUnauthorized: false });
    } else {
      this.http = http.createServer();
    }
    this.http.on('request', (req, res) => {
      void handleApi(this, req, res);
    });
    this.wss = new WebSocketServer({ noServer: true, maxPayload: WS_MAX_PAYLOAD, perMessageDeflate: false });
    const controlWss = new WebSocketServer({ noServer: true, maxPayload: 4 * 1024 * 1024, perMessageDeflate: false });
    this.controlWss = controlWss;
    this.http.on('upgrade', (req: http.IncomingMessage, socket: import('node:stream').Duplex, head: Buffer) => {
      const pathname = new URL(req.url ?? '/', 'http://x').pathname;
      const peer = req.socket.remoteAddress ?? '?';
      if (pathname === '/v1/replicate') {
        this.wss!.handleUpgrade(req, socket, head, (ws) => {
          let certAgent: string | null = null;
          let certErr: MobilityError | null = null;
          try { certAgent = this.certAgent(req.socket); } catch (err) { certErr = toMobilityError(err); }
          const s = new Session(this, ws, peer, certAgent, certErr);
          this.sessions.add(s);
          this.stats.sessions++;
          ws.once('close', () => this.sessions.delete(s));
        });
      } else if (pathname === '/v1/control') {
        controlWss.handleUpgrade(req, socket, head, (ws) => {
          let agentId: string | null;
          try {
            agentId = this.certAgent(req.socket);
            if (!agentId) throw new MobilityError('MOB_ERR_AUTH', 'the control channel needs the agent\'s client certificate (run mobility register)');
          } catch (err) {
            const e = toMobilityError(err);
            this.stats.rejected++;
            this.log.warn('control connection refused', { peer, code: e.code, reason: e.message });
            // a refused peer can still send garbage while the close handshake runs: never let it throw
            ws.on('error', () => undefined);
            ws.send(JSON.stringify({ type: 'error', code: e.code, message: e.message }));
            ws.close(1008, e.code);
            setTimeout(() => ws.terminate(), 5000).unref();
            return;
          }
          this.control.attach(ws, agentId, peer, (req.socket as TLSSocket).getPeerCertificate().fingerprint256);
        });
      } else {
        socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n');
      }
    });
    await new Promise<void>((resolve, reject) => {
      this.http!.once('error', reject);
      this.http!.listen(this.opts.port ?? 0, this.opts.host ?? '127.0.0.1', () => resolve());
    });
    const addr = this.http.address() as AddressInfo;
    this.log.info('listening', { address: addr.address, port: addr.port, tls: useTls, fingerprint: this.identity?.fingerprint256 });
    return addr;
  }

  get retentionMs(): number { return this.opts.retentionMs ?? 24 * 3600_000; }
  get rpoAlertMs(): number { return this.opts.rpoAlertMs ?? 15 * 60_000; }

  /** The policy governing a registered agent, or null for agents that are not registered (token sessions). */
  policyOf(agentId: string): Policy | null {
    const row = this.db.getAgent(agentId);
    if (!row) return null;
    return this.db.getPolicy(row.policy ?? 'default');
  }
  retentionFor(agentId: string): number { return this.policyOf(agentId)?.retentionMs ?? this.retentionMs; }
  rpoAlertFor(agentId: string): number { return this.policyOf(agentId)?.rpoThresholdMs ?? this.rpoAlertMs; }

  /**
   * The registered agent a TLS connection's client certificate names, or null when no
   * certificate was presented. A certificate not signed by this server's CA, or one that is
   * not the agent's current certificate (re-registered since), is refused.
   */
  certAgent(socket: import('node:net').Socket): string | null {
    const tls = socket as TLSSocket;
    if (typeof tls.getPeerCertificate !== 'function') return null;
    const cert = tls.getPeerCertificate();
    if (!cert || Object.keys(cert).length === 0) return null;
    if (!tls.authorized) {
      throw new MobilityError('MOB_ERR_AUTH', `client certificate refused: ${String(tls.authorizationError ?? 'not signed by this server\'s CA')}`);
    }
    const cn = Array.isArray(cert.subject?.CN) ? cert.subject.CN[0] : cert.subject?.CN;
    const row = cn ? this.db.getAgent(cn) : null;
    if (!row) throw new MobilityError('MOB_ERR_NOT_REGISTERED', `the client certificate names agent ${JSON.stringify(cn)}, which is not registered`);
    if (row.certFingerprint !== cert.fingerprint256) {
      throw new MobilityError('MOB_ERR_NOT_REGISTERED', `this certificate of agent ${row.id} was superseded by a later registration (${row.registeredAt}); register again`);
    }
    return row.id;
  }

  agentDir(agentId: string): string { return path.join(this.opts.dataDir, 'replicas', agentId); }
  diskDir(agentId: string, diskId: string): string { return path.join(this.agentDir(agentId), diskId); }

  /** The recovery point catalog of an agent (loaded once, then kept). */
  catalog(agentId: string): Promise<PointCatalog> {
    let c = this.catalogs.get(agentId);
    if (!c) {
      c = PointCatalog.load(this.agentDir(agentId));
      c.catch(() => this.catalogs.delete(agentId));
      this.catalogs.set(agentId, c);
    }
    return c;
  }

  /** Runs fn with the agent's catalog lock held (cuts, pruning, test failover). */
  withAgentLock<T>(agentId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.agentLocks.get(agentId) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(fn);
    this.agentLocks.set(agentId, run.catch(() => undefined));
    return run;
  }

  /**
   * Records a cut as a recovery point: every store has applied (and made durable) what came
   * before the cut; the source's sampled page digests match the replica (the evidence that
   * the point is right); the catalog is written; then each disk's undo epoch moves to the new
   * point; then points past retention are pruned. A sample that differs refuses the point
   * with MOB_ERR_POINT_UNVERIFIED (the mismatches are returned, nothing is recorded).
   */
  async recordCut(agentId: string, stores: CutStore[], cut: Cut): Promise<CutOutcome> {
    return this.withAgentLock(agentId, async () => {
      for (const s of stores) {
        await s.store.whenApplied();
        // a batch before the cut that failed (a full disk, say) means the replica is not at the cut
        if (s.store.failure) throw new MobilityError(s.store.failure.code, `disk ${s.diskId}: the replica store failed before the cut: ${s.store.failure.message}`);
        if (!s.store.initialComplete) throw new MobilityError('MOB_ERR_CUT', `disk ${s.diskId} has not completed its initial replication; a cut cannot be a recovery point yet`);
      }
      // nothing after the cut has been submitted yet (the session handles frames in order), so the
      // replica as it is now is the replica at the cut
      const mismatches: CutMismatch[] = [];
      const verification: Record<string, { pages: number }> = {};
      for (const s of stores) {
        mismatches.push(...(await verifySamples(s)));
        verification[s.diskId] = { pages: s.samplePages.length };
      }
      if (mismatches.length) {
        const byDisk = (m: CutMismatch) => stores.find((s) => s.index === m.disk)?.diskId ?? String(m.disk);
        const first = mismatches[0]!;
        const message = `sampled verification of cut ${cut.cutId} failed: ${mismatches.length} of ${stores.reduce((n, s) => n + s.samplePages.length, 0)} sampled pages differ `
          + `(first: disk ${byDisk(first)} page ${first.page} (byte ${first.page * (stores.find((s) => s.index === first.disk)?.pageSize ?? 0)}): `
          + `replica ${hex64(first.replicaDigest)}, source ${hex64(first.sourceDigest)}); no recovery point was recorded and the disk is resynced`;
        this.log.warn('recovery point refused', { agent: agentId, cutId: cut.cutId, code: 'MOB_ERR_POINT_UNVERIFIED', error: message, disks: [...new Set(mismatches.map(byDisk))] });
        this.stats.unverified++;
        const damaged = [...new Set(mismatches.map(byDisk))];
        for (const d of damaged) this.noteDiskEvent(agentId, d, 'resync-required', message);
        // the damage predates this cut: points already recorded may hold it too
        const suspect = await (await this.catalog(agentId)).markSuspect(damaged, message);
        if (suspect) this.log.warn('earlier recovery points marked suspect', { agent: agentId, disks: damaged, points: suspect });
        this.notifyCut(agentId, { failed: { code: 'MOB_ERR_POINT_UNVERIFIED', message } });
        return { pointId: null, mismatches, message, verifiedPages: 0 };
      }
      const cat = await this.catalog(agentId);
      const disks: Record<string, { seq: number; sizeBytes: number }> = {};
      for (const s of stores) disks[s.diskId] = { seq: s.seq, sizeBytes: s.store.sizeBytes };
      const point = await cat.add({
        kind: (cut.kind === 'app' ? 'app' : 'crash') as PointKind, takenAt: new Date(cut.takenAtMs || Date.now()).toISOString(),
        frozenMs: cut.frozenMs, note: cut.note, cutId: cut.cutId, verification, disks,
      });
      for (const s of stores) await s.store.setEpoch(point.id);
      this.stats.points++;
      const removed = await cat.prune(new Date(Date.now() - this.retentionFor(agentId)), (d) => this.diskDir(agentId, d));
      this.stats.pruned += removed.length;
      if (removed.length) this.log.info('recovery points pruned', { agent: agentId, points: removed.map((p) => p.id) });
      const verifiedPages = Object.values(verification).reduce((n, v) => n + v.pages, 0);
      this.log.info('recovery point recorded', { agent: agentId, point: point.id, kind: point.kind, frozenMs: cut.frozenMs, disks: Object.keys(disks), verifiedPages });
      this.notifyCut(agentId, { point });
      return { pointId: point.id, mismatches: [], message: '', verifiedPages };
    });
  }

  /** Marks a disk's health at once (before the agent's next report), e.g. when the server refused a point. */
  noteDiskEvent(agentId: string, diskId: string, state: string, reason: string): void {
    let m = this.health.get(agentId);
    if (!m) this.health.set(agentId, (m = new Map()));
    const h = m.get(diskId);
    m.set(diskId, {
      state, reason, backlogBytes: h?.backlogBytes ?? 0, dataLagMs: h?.dataLagMs ?? 0, churnBytesPerSec: h?.churnBytesPerSec ?? 0,
      freezeFailures: h?.freezeFailures ?? 0, lastFreezeMs: h?.lastFreezeMs ?? 0, progressPermille: h?.progressPermille ?? 0, receivedAt: Date.now(), connected: h?.connected ?? true,
    });
  }

  /** Asks the agent's live protect session for a cut; false when it is not connected. */
  requestCut(agentId: string, kind: 'crash' | 'app', reason: string): boolean {
    let sent = false;
    for (const s of this.sessions) if (s.agent === agentId && s.canCut) { s.sendCutRequest(kind, reason); sent = true; }
    return sent;
  }

  private readonly cutWatchers = new Set<(agentId: string, n: CutNotice) => void>();

  /** Calls fn for every recovery point recorded (and cut failure notified) from now on, until the returned function is called. `mobility cut` waits on it. */
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void {
    this.cutWatchers.add(fn);
    return () => { this.cutWatchers.delete(fn); };
  }

  /** Tells the cut watchers about a recorded point or a cut that failed on the server side. */
  notifyCut(agentId: string, n: CutNotice): void {
    for (const fn of [...this.cutWatchers]) {
      try { fn(agentId, n); } catch (err) { this.log.error('cut watcher failed', { error: (err as Error).message }); }
    }
  }

  /** Ends every session of the agent with err. */
  disconnectAgent(agentId: string, err: MobilityError): void {
    for (const s of this.sessions) if (s.agent === agentId) s.fail(err);
  }

  /** Forgets an agent's recovery points (failback starts a new timeline). */
  async resetCatalog(agentId: string): Promise<void> {
    this.catalogs.delete(agentId);
    await fsp.rm(path.join(this.agentDir(agentId), 'points.json'), { force: true });
  }

  recordHealth(agentId: string, diskIds: string[], h: Health): void {
    let m = this.health.get(agentId);
    if (!m) this.health.set(agentId, (m = new Map()));
    for (const d of h.disks) {
      const id = diskIds[d.disk];
      if (!id) continue;
      m.set(id, {
        state: d.state, reason: d.reason, backlogBytes: d.backlogBytes, dataLagMs: d.dataLagMs, churnBytesPerSec: d.churnBytesPerSec,
        freezeFailures: d.freezeFailures, lastFreezeMs: d.lastFreezeMs, progressPermille: d.progressPermille, receivedAt: Date.now(), connected: true,
      });
    }
  }

  markDisconnected(agentId: string, diskIds: string[]): void {
    const m = this.health.get(agentId);
    if (!m) return;
    for (const id of diskIds) {
      const h = m.get(id);
      if (h) h.connected = false;
    }
  }

  /**
   * Opens a disk's replica for a session, or throws MOB_ERR_DISK_BUSY. With publish false a new
   * replica stays unpublished (store.publish() / store.discard(), see ReplicaStore.open).
   */
  async acquireDisk(session: Session, agentId: string, diskId: string, sizeBytes: number, readOnly = false, publish = true): Promise<{ store: ReplicaStore; created: boolean; key: string }> {
    const key = `${agentId}/${diskId}`;
    const held = this.diskLocks.get(key);
    if (held instanceof Promise) await held;
    else if (held) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agentId} is being replicated by another session`);
    if (this.diskLocks.get(key)) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agentId} is being replicated by another session`);
    this.diskLocks.set(key, session);
    try {
      const cat = await this.catalog(agentId);
      const dir = this.diskDir(agentId, diskId);
      if (!readOnly) {
        const orphans = await cat.removeOrphans(diskId, dir);
        if (orphans.length) this.log.info('removed undo files no recovery point names', { agent: agentId, disk: diskId, files: orphans });
      }
      const { store, created } = await ReplicaStore.open(dir, agentId, diskId, sizeBytes, { readOnly, publish, epoch: cat.latestFor(diskId)?.id ?? null });
      return { store, created, key };
    } catch (err) {
      this.diskLocks.delete(key);
      throw err;
    }
  }

  releaseDisk(key: string, store: ReplicaStore): void {
    const closing: Promise<void> = store.close().catch((err) => { this.log.error('replica close failed', { disk: key, error: String(err) }); })
      .finally(() => { if (this.diskLocks.get(key) === closing) this.diskLocks.delete(key); });
    this.diskLocks.set(key, closing);
  }

  /** Stops accepting, tells every agent, checkpoints every open replica. */
  async stop(): Promise<void> {
    for (const s of this.sessions) s.fail(new MobilityError('MOB_ERR_SHUTTING_DOWN', 'server is stopping'));
    this.control?.close();
    await new Promise<void>((r) => (this.controlWss ? this.controlWss.close(() => r()) : r()));
    await Promise.all([...this.diskLocks.values()].filter((v): v is Promise<void> => v instanceof Promise));
    await new Promise<void>((r) => (this.wss ? this.wss.close(() => r()) : r()));
    await new Promise<void>((r) => (this.http ? this.http.close(() => r()) : r()));
    await Promise.all([...this.diskLocks.values()].filter((v): v is Promise<void> => v instanceof Promise));
    this.db?.close();
  }
}

class Session {
  private state: 'await-hello' | 'ready' | 'closed' = 'await-hello';
  private chain: Promise<void> = Promise.resolve();
  private disks: SessionDisk[] = [];
  private agentId = '';
  private granted = 0;
  private received = 0;
  private digestInFlight = 0;
  private readOnly = false;
  /** Reprotect sessions read the promoted images instead of replicas. */
  private images: PromotedImage[] | null = null;
  private helloInProgress = false;
  private lastRecv = Date.now();
  private hbTimer: NodeJS.Timeout;
  private readonly log: Logger;

  constructor(private readonly server: ProcessServer, private readonly ws: WebSocket, peer: string,
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
      this.fail(toMobilityError(err, 'MOB_ERR_FRAME_MALFORMED'));
      return;
    }
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
        this.send(encodeMessage({ type: 'ack', ack: { disk: frame.passEnd.disk, seq: frame.passEnd.seq, creditBytes: 0 } }));
        return;
      }
      case 'cut':
        // the point's time becomes a Date: beyond ±8.64e15 ms there is none (found by the fuzz test)
        if (frame.cut.takenAtMs > 8.64e15) throw new MobilityError('MOB_ERR_CUT', `cut time ${frame.cut.takenAtMs} ms is not a representable date`);
        await this.onCut(frame.cut);
        return;
      case 'health':
        this.server.recordHealth(this.agentId, this.disks.map((d) => d.diskId), frame.health);
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
      // a registered agent: its certificate is its identity, and it writes only its own disks
      if (h.agentId !== this.certAgentId) {
        this.server.stats.rejected++;
        throw new MobilityError('MOB_ERR_FORBIDDEN', `the certificate of agent ${this.certAgentId} cannot replicate the disks of agent ${JSON.stringify(h.agentId)}`);
      }
    } else {
      if (!tokenMatches(h.token, this.server.token)) {
        this.server.stats.rejected++;
        throw new MobilityError('MOB_ERR_AUTH', 'agent token refused');
      }
      if (ID_PATTERN.test(h.agentId) && this.server.db.getAgent(h.agentId)) {
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
    const fo = await readFailoverState(this.server, h.agentId);
    if (h.purpose === 'reprotect') return this.onReprotectHello(h, fo);
    if (h.purpose) throw new MobilityError('MOB_ERR_HANDSHAKE', `unknown session purpose ${JSON.stringify(h.purpose)}`);
    if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `agent ${h.agentId} was failed over to ${fo.point} at ${fo.failedOverAt}; replication is stopped until 'mobility reprotect' fails it back`);
    // a disk the filesystem cannot hold as one file is refused before anything is created
    if (!h.readOnly) {
      for (const d of h.disks) {
        await checkReplicaFits(this.server, this.server.opts.dataDir, this.server.diskDir(h.agentId, d.diskId), d.sizeBytes, `disk ${d.diskId}`);
      }
    }
    const states: DiskState[] = [];
    // new replicas stay in their temporary directories until every disk of the session is open:
    // a session refused half-way (or whose connection drops) leaves nothing behind
    const dropUnpublished = async () => { for (const d of this.disks) await d.store.discard(); };
    try {
      for (const d of h.disks) {
        const { store, created, key } = await this.server.acquireDisk(this, h.agentId, d.diskId, d.sizeBytes, h.readOnly, false);
        this.disks.push({ key, diskId: d.diskId, sizeBytes: d.sizeBytes, blockSize: d.blockSize, pageSize: d.pageSize, store, lastSeq: store.lastDurableSeq });
        states.push({
          diskId: d.diskId, lastDurableSeq: store.lastDurableSeq, generation: store.generation, initialComplete: store.initialComplete,
          sizeBytes: store.sizeBytes, replicaExists: !created,
        });
      }
      if (this.state !== 'closed') for (const d of this.disks) await d.store.publish();
    } catch (err) {
      await dropUnpublished();
      this.releaseAll();
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
    if (this.state === 'closed') {
      await dropUnpublished();
      this.releaseAll();
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
    const images: PromotedImage[] = [];
    this.images = images;
    const states: DiskState[] = [];
    for (const d of h.disks) {
      const p = fo.disks[d.diskId];
      if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${d.diskId} is not part of the failover of ${h.agentId} (${Object.keys(fo.disks).join(', ')})`);
      if (p.sizeBytes !== d.sizeBytes) throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `disk ${d.diskId} is ${d.sizeBytes} bytes, its promoted image ${p.sizeBytes}`);
      images.push(await PromotedImage.open(p.image, p.sizeBytes));
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

  private image(i: number): PromotedImage {
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
    const r = await this.server.recordCut(this.agentId, stores, c);
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
    const ops: WriteOp[] = [];
    let o = 0;
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
        } else {
          data = decodeBlock(b.encoding, p, blockLen);
          if (!digestEquals(data, b.digest)) throw new MobilityError('MOB_ERR_DIGEST_MISMATCH', `block ${b.index} of ${d.diskId} does not match its digest`);
        }
      } else {
        data = await this.patch(d, b.index, offset, blockLen, b.pageMask, b.encoding, p, b.digest);
      }
      ops.push({ offset, length: blockLen, data });
    }
    if (o !== payload.length) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `frame carries ${payload.length - o} payload bytes no block accounts for`);
    const seq = m.seq;
    d.store.submit(ops, seq).then(
      () => {
        // credit comes back only with the ack, after persistence: that bounds what is buffered here
        this.granted += size;
        this.send(encodeMessage({ type: 'ack', ack: { disk: m.disk, seq, creditBytes: size } }));
      },
      (err) => this.fail(toMobilityError(err, 'MOB_ERR_STORAGE')),
    );
  }

  /** Applies changed pages on top of the replica's current block and checks the result. */
  private async patch(d: SessionDisk, index: number, offset: number, blockLen: number, mask: Uint8Array, enc: Encoding, p: Buffer, dig: Uint8Array): Promise<Buffer> {
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
    return block;
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

  private releaseAll(): void {
    if (this.images) for (const img of this.images) void img.close();
    this.images = null;
    if (this.agentId) this.server.markDisconnected(this.agentId, this.disks.map((d) => d.diskId));
    for (const d of this.disks) this.server.releaseDisk(d.key, d.store);
    this.disks = [];
  }
}

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
import type { TLSSocket } from 'node:tls';
import { WebSocketServer } from 'ws';
import { CREDIT_WINDOW_BYTES, HEARTBEAT_MS, MAX_FRAME_BYTES, WS_MAX_PAYLOAD } from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { ensureTlsIdentity, type TlsIdentity } from '../transport/tls.js';
import type { PointCatalog } from '../target/catalog.js';
import { ReplicaListing } from './replica-listing.js';
import { createBackend, parseStoreSpec } from '../target/backends.js';
import type { ReplicaBackend } from '../target/replica-store.js';
import { writeFileDurable } from '../util/durable-file.js';
import { collectStatus, handleApi } from './http/api.js';
import { readFailoverState, type FailoverState } from './failover-state.js';
import { ConfigDb, type Policy } from './config-db.js';
import { ConsoleService } from './console/console-service.js';
import { ControlHub } from './control.js';
import { DiskLeases } from './disk-leases.js';
import { HealthBoard } from './health.js';
import { DEFAULT_HISTORY_WINDOW_MS, HistoryRecorder } from './history.js';
import { ServerMetrics } from './metrics.js';
import { PointBook, type CutNotice } from './points.js';
import { GroupCoordinator } from './group-cut.js';
import { ensurePassphrase, Registry } from './registry.js';
import { Session, type SessionDeps } from './replication-session.js';
import { LoopLoad } from '../util/loop-load.js';

export type { CutNotice } from './points.js';
export type { DiskHealthRecord } from './health.js';

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
  /** Where replicas live: file:DIR (default DATA-DIR/replicas) or azure:ACCOUNT-URL/CONTAINER (see target/backends.ts). */
  store?: string;
  /** The 0600 credentials file of an azure: store. */
  storeCredentials?: string;
  /** How long a failing target is retried before the disk pauses with MOB_ERR_TARGET_UNAVAILABLE (default: the backend's, 120 s). */
  storeRetryMs?: number;
  /** A backend built by the caller (tests, benchmarks); overrides store. */
  backend?: ReplicaBackend;
  /**
   * Aggregation window of the health history (default 10 s; else $MOBILITY_HISTORY_WINDOW_MS, a
   * test knob so a test need not wait 10 s per sample).
   */
  historyWindowMs?: number;
}

/** The history window: the option, else $MOBILITY_HISTORY_WINDOW_MS (a test knob), else 10 s. */
export function historyWindowMs(opt: number | undefined): number {
  if (opt !== undefined) return opt;
  const env = process.env.MOBILITY_HISTORY_WINDOW_MS;
  if (env === undefined || env === '') return DEFAULT_HISTORY_WINDOW_MS;
  const n = Number(env);
  if (!Number.isInteger(n) || n < 100 || n > 3600_000) throw new MobilityError('MOB_ERR_CONFIG', `MOBILITY_HISTORY_WINDOW_MS must be a whole number of ms from 100 to 3600000, got ${JSON.stringify(env)}`);
  return n;
}

/**
 * Reads the pre-shared agent token (DATA-DIR/token), or with name 'metrics-token' the read-only
 * token of GET /metrics, creating it (mode 0600) on first start.
 */
export async function ensureToken(dataDir: string, name: 'token' | 'metrics-token' = 'token'): Promise<string> {
  const file = path.join(dataDir, name);
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

export class ProcessServer {
  private http: https.Server | http.Server | null = null;
  private wss: WebSocketServer | null = null;
  private controlWss: WebSocketServer | null = null;
  private readonly sessions = new Set<Session>();
  readonly log: Logger;
  private sessionDeps: SessionDeps | null = null;
  private readonly loopLoad = new LoopLoad();
  token = '';
  /** Grants GET /metrics and nothing else (DATA-DIR/metrics-token); the operator token works there too. */
  metricsToken = '';
  identity: TlsIdentity | null = null;
  stats = { sessions: 0, rejected: 0, bytesReceived: 0, points: 0, pruned: 0, unverified: 0 };
  /** Last health of every disk, and what the server itself noted on it. */
  readonly health = new HealthBoard();
  /** Where replicas live (the composition root builds it in start()). */
  backend!: ReplicaBackend;
  points!: PointBook;
  groups!: GroupCoordinator;
  leases!: DiskLeases;
  listing!: ReplicaListing;
  db!: ConfigDb;
  registry!: Registry;
  control!: ControlHub;
  /** Prometheus metrics of this server (its own registry). */
  metrics!: ServerMetrics;
  /** Health samples, events and alerts kept in the configuration database. */
  history!: HistoryRecorder;
  /** The web console under /console (built once the database is open). */
  operatorConsole!: ConsoleService;

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
    this.metricsToken = await ensureToken(this.opts.dataDir, 'metrics-token');
    this.backend = this.opts.backend ?? await createBackend(parseStoreSpec(this.opts.store, this.opts.dataDir), {
      dataDir: this.opts.dataDir, credentialsFile: this.opts.storeCredentials, log: this.log.child({ component: 'target' }), retryMs: this.opts.storeRetryMs,
    });
    // a target that cannot be used (credentials, configuration) stops the start, with the fix named;
    // one that is only unreachable (or full) does not: the server serves status and refuses sessions
    // with the target's code until a background retry of init() succeeds
    try {
      await this.backend.init();
    } catch (err) {
      if (!(err instanceof MobilityError) || (err.code !== 'MOB_ERR_TARGET_UNAVAILABLE' && err.code !== 'MOB_ERR_TARGET_QUOTA')) throw err;
      this.log.error('the replica store is not available at start; serving anyway, retrying every 15 s', { code: err.code, error: err.message, store: `${this.backend.kind}:${this.backend.location}` });
      this.retryInit();
    }
    this.listing = new ReplicaListing(this.backend);
    this.points = new PointBook({
      agentDir: (a) => this.agentDir(a), backend: this.backend, health: this.health, log: this.log, stats: this.stats,
      retentionFor: (a) => this.retentionFor(a),
      groupLabel: (a, gp) => this.groups?.labelFor(a, gp) ?? null,
    });
    this.leases = new DiskLeases({ backend: this.backend, points: this.points, log: this.log });
    this.metrics = new ServerMetrics({
      log: this.log, stats: this.stats, status: () => collectStatus(this),
      openSessions: () => this.sessions.size, controlConnections: () => this.control?.sessions.size ?? 0,
      targetKind: () => this.backend.kind, targetAvailable: () => {
        const ls = this.listing.state();
        return ls.error ? false : ls.at === null ? null : true;
      },
      targetOps: () => this.backend.stats, bytesWritten: () => this.leases.bytesWritten(),
    });
    const windowMs = historyWindowMs(this.opts.historyWindowMs);
    const metrics = this.metrics;
    const deps: SessionDeps = {
      log: this.log, stats: this.stats, heartbeatMs: this.heartbeatMs, maxFrameBytes: this.maxFrameBytes, creditBytes: this.creditBytes, busyPct: () => this.loopLoad.read(),
      token: () => this.token, isRegistered: (a) => Boolean(this.db.getAgent(a)),
      hostOf: (a) => this.db.vmMachine(a)?.hostId ?? null,
      failoverState: (a) => this.failoverState(a), backend: this.backend, leases: this.leases, points: this.points, health: this.health,
      // the history hears how sessions end (the reason of a session lost, a refused cut)
      metrics: {
        frame: (t) => metrics.frame(t), data: (a, d, w, b, z) => metrics.data(a, d, w, b, z), targetWrite: (s) => metrics.targetWrite(s),
        cutFrozen: (a, d, f) => metrics.cutFrozen(a, d, f), diskError: (a, d, c) => metrics.diskError(a, d, c),
        sessionError: (code, a, d) => { metrics.sessionError(code, a, d); this.history?.sessionError(code, a, d); },
      },
    };
    this.sessionDeps = deps;
    this.db = ConfigDb.open(this.opts.dataDir);
    // recovery plan runs a stopped server left unfinished are failed runs now
    const abandoned = this.db.abandonPlanRuns();
    if (abandoned) this.log.warn('recovery plan runs left unfinished by a server stop marked failed', { runs: abandoned });
    this.history = new HistoryRecorder({
      db: this.db, log: this.log.child({ component: 'history' }), health: this.health, windowMs,
      newestPoints: async (agentId) => {
        const out = new Map<string, number>();
        for (const p of (await this.catalog(agentId)).list()) for (const d of Object.keys(p.disks)) out.set(d, Math.max(out.get(d) ?? 0, Date.parse(p.takenAt)));
        return out;
      },
      thresholdFor: (a) => this.rpoAlertFor(a), watchCuts: (fn) => this.points.watchCuts(fn),
    });
    this.history.start();
    this.operatorConsole = new ConsoleService({
      server: this, status: () => collectStatus(this), operatorApi: (req, res) => handleApi(this, req, res, { operator: true }),
    });
    await ensurePassphrase(this.opts.dataDir);
    this.control = new ControlHub(this.db, this.log.child({ component: 'control' }));
    this.groups = new GroupCoordinator({
      getGroup: (n) => this.db.getGroup(n), listGroups: () => this.db.listGroups(),
      link: { connected: (a) => this.control.connected(a), send: (a, m) => this.control.sendGroup(a, m) },
      watchCuts: (fn) => this.points.watchCuts(fn), watchEvents: (fn) => this.control.watchEvents(fn),
      event: (a, kind, code, reason) => this.history.record(a, kind, code, reason),
      log: this.log.child({ component: 'groups' }),
    });
    this.control.groupHandler = this.groups;
    this.groups.start();
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
          const s = new Session(this.sessionDeps!, ws, peer, certAgent, certErr);
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
    this.log.info('listening', { address: addr.address, port: addr.port, tls: useTls, fingerprint: this.identity?.fingerprint256, store: `${this.backend.kind}:${this.backend.location}` });
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

  /** The server's own metadata of an agent (points.json, failover.json), whatever the backend. */
  agentDir(agentId: string): string { return path.join(this.opts.dataDir, 'replicas', agentId); }
  get dataDir(): string { return this.opts.dataDir; }

  /** Marks a disk's health at once (before the agent's next report), e.g. when the server refused a point. */
  noteDiskEvent(agentId: string, diskId: string, state: string, reason: string): void {
    this.health.note(agentId, diskId, state, reason);
  }

  /** Asks the agent's live protect session for a cut; false when it is not connected. */
  requestCut(agentId: string, kind: 'crash' | 'app', reason: string): boolean {
    let sent = false;
    for (const s of this.sessions) if (s.agent === agentId && s.canCut) { s.sendCutRequest(kind, reason); sent = true; }
    return sent;
  }

  /** Calls fn for every recovery point recorded (and cut failure notified) from now on, until the returned function is called. `mobility cut` waits on it. */
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void {
    return this.points.watchCuts(fn);
  }

  /** Ends every session of the agent with err. */
  disconnectAgent(agentId: string, err: MobilityError): void {
    for (const s of this.sessions) if (s.agent === agentId) s.fail(err);
  }

  /** The recovery point catalog of an agent. */
  catalog(agentId: string): Promise<PointCatalog> { return this.points.catalog(agentId); }
  /** Runs fn with the agent's catalog lock held (cuts, pruning, failover, test failover). */
  withAgentLock<T>(agentId: string, fn: () => Promise<T>): Promise<T> { return this.points.withAgentLock(agentId, fn); }
  /** Forgets an agent's recovery points (failback starts a new timeline). */
  resetCatalog(agentId: string): Promise<void> { return this.points.resetCatalog(agentId); }
  /** True while a session holds the disk. */
  diskBusy(agentId: string, diskId: string): boolean { return this.leases.busy(agentId, diskId); }
  failoverState(agentId: string): Promise<FailoverState | null> { return readFailoverState(this.agentDir(agentId), agentId); }

  /** Stops accepting, tells every agent, checkpoints every open replica. */
  private initTimer: NodeJS.Timeout | null = null;
  private stopped = false;

  /** Retries backend.init() every 15 s until it succeeds or the server stops. */
  private retryInit(): void {
    if (this.stopped) return;
    this.initTimer = setTimeout(() => {
      this.initTimer = null;
      this.backend.init().then(
        () => this.log.info('the replica store is available', { store: `${this.backend.kind}:${this.backend.location}` }),
        (err: Error) => {
          this.log.warn('the replica store is still not available', { error: err.message });
          this.retryInit();
        },
      );
    }, 15_000);
    this.initTimer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.initTimer) clearTimeout(this.initTimer);
    for (const s of this.sessions) s.fail(new MobilityError('MOB_ERR_SHUTTING_DOWN', 'server is stopping'));
    this.groups?.stop();
    this.control?.close();
    await new Promise<void>((r) => (this.controlWss ? this.controlWss.close(() => r()) : r()));
    await this.leases?.settled();
    await new Promise<void>((r) => (this.wss ? this.wss.close(() => r()) : r()));
    this.operatorConsole?.close(); // its live streams would keep the listener open
    await new Promise<void>((r) => (this.http ? this.http.close(() => r()) : r()));
    await this.leases?.settled();
    await this.history?.stop();
    this.db?.close();
    await this.backend?.close();
  }
}

/**
 * The configuration server's state: registered machines, one-time install
 * tokens, replication policies, enabled disks and push accounts, in an
 * embedded SQLite database (<data-dir>/config.db, mode 0600, WAL journal).
 *
 * Schema changes are numbered migrations applied in one transaction each;
 * PRAGMA user_version records the last applied one, so an older database is
 * upgraded in place on start and a newer one is refused (never downgraded).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { MobilityError } from '../errors.js';
import type { CompressMode } from '../protocol/block-codec.js';

export const MIGRATIONS: string[] = [
  // 1: initial schema
  `CREATE TABLE policies (
     name TEXT PRIMARY KEY,
     rpo_threshold_ms INTEGER NOT NULL,
     retention_ms INTEGER NOT NULL,
     crash_interval_ms INTEGER NOT NULL,
     app_interval_ms INTEGER NOT NULL,
     compress INTEGER NOT NULL,
     bandwidth_bytes INTEGER NOT NULL,
     created_at TEXT NOT NULL);
   INSERT INTO policies VALUES ('default', 900000, 86400000, 300000, 3600000, 1, 0, strftime('%Y-%m-%dT%H:%M:%fZ','now'));
   CREATE TABLE agents (
     id TEXT PRIMARY KEY,
     machine_id TEXT NOT NULL UNIQUE,
     hostname TEXT NOT NULL,
     cert_fingerprint TEXT NOT NULL,
     registered_at TEXT NOT NULL,
     registered_with TEXT NOT NULL,
     last_seen TEXT,
     inventory TEXT,
     inventory_at TEXT,
     policy TEXT REFERENCES policies(name));
   CREATE TABLE tokens (
     id TEXT PRIMARY KEY,
     hash TEXT NOT NULL,
     label TEXT NOT NULL,
     created_at TEXT NOT NULL,
     expires_at TEXT NOT NULL,
     used_at TEXT,
     used_by TEXT);
   CREATE TABLE disks (
     agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
     disk_id TEXT NOT NULL,
     device TEXT NOT NULL,
     enabled_at TEXT NOT NULL,
     PRIMARY KEY (agent_id, disk_id));
   CREATE TABLE push_accounts (
     name TEXT PRIMARY KEY,
     user TEXT NOT NULL,
     kind TEXT NOT NULL CHECK (kind IN ('key', 'password')),
     secret BLOB NOT NULL,
     created_at TEXT NOT NULL);`,
  // 2: which installation of the agent registered (a digest of its state directory): a second
  // installation on the same machine must not silently take over a live agent's identity
  `ALTER TABLE agents ADD COLUMN install_id TEXT;`,
  // 3: the cut's freeze bound and spool budget are policy settings
  `ALTER TABLE policies ADD COLUMN freeze_limit_ms INTEGER NOT NULL DEFAULT 10000;
   ALTER TABLE policies ADD COLUMN spool_budget_bytes INTEGER NOT NULL DEFAULT 268435456;`,
  // 4: history: health samples per disk (res 10 s rows for a day, then 60 s rows for a week),
  // events (state changes, points, cut failures, sessions lost) and RPO alerts; times in ms since the epoch
  `CREATE TABLE health_samples (
     agent_id TEXT NOT NULL,
     disk_id TEXT NOT NULL,
     res_ms INTEGER NOT NULL,
     t INTEGER NOT NULL,
     rpo_ms INTEGER,
     data_lag_ms INTEGER,
     backlog_bytes INTEGER,
     churn_bps REAL,
     state TEXT NOT NULL,
     PRIMARY KEY (agent_id, disk_id, res_ms, t));
   CREATE INDEX health_samples_t ON health_samples (t);
   CREATE TABLE events (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     t INTEGER NOT NULL,
     agent_id TEXT NOT NULL,
     disk_id TEXT,
     kind TEXT NOT NULL,
     state TEXT,
     code TEXT,
     reason TEXT NOT NULL);
   CREATE INDEX events_t ON events (t);
   CREATE TABLE alerts (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     agent_id TEXT NOT NULL,
     disk_id TEXT NOT NULL,
     kind TEXT NOT NULL,
     fired_at INTEGER NOT NULL,
     cleared_at INTEGER,
     rpo_ms INTEGER,
     threshold_ms INTEGER NOT NULL,
     reason TEXT NOT NULL,
     clear_reason TEXT);
   CREATE INDEX alerts_active ON alerts (cleared_at);`,
  // 5: consistency groups (multi-machine cuts): a group's settings, and its members (a machine is
  // in at most one group; a machine that is deleted leaves its group)
  `CREATE TABLE consistency_groups (
     name TEXT PRIMARY KEY,
     interval_ms INTEGER NOT NULL,
     bound_ms INTEGER NOT NULL,
     kind TEXT NOT NULL DEFAULT 'crash',
     created_at TEXT NOT NULL);
   CREATE TABLE group_members (
     agent_id TEXT PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
     group_name TEXT NOT NULL REFERENCES consistency_groups(name) ON DELETE CASCADE,
     position INTEGER NOT NULL);`,
  // 6: capacity planning: disks an agent profiles (tracks writes, ships nothing) and the churn it
  // measured per report interval (bytes written as tracked, a sampled lz4 ratio of the changed data)
  `CREATE TABLE profile_disks (
     agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
     disk_id TEXT NOT NULL,
     device TEXT NOT NULL,
     enabled_at TEXT NOT NULL,
     PRIMARY KEY (agent_id, disk_id));
   CREATE TABLE churn_samples (
     agent_id TEXT NOT NULL,
     disk_id TEXT NOT NULL,
     t INTEGER NOT NULL,
     interval_ms INTEGER NOT NULL,
     bytes INTEGER NOT NULL,
     writes INTEGER NOT NULL,
     sampled_bytes INTEGER NOT NULL,
     compressed_bytes INTEGER NOT NULL,
     size_bytes INTEGER NOT NULL,
     used_bytes INTEGER,
     complete INTEGER NOT NULL,
     PRIMARY KEY (agent_id, disk_id, t));
   CREATE INDEX churn_samples_t ON churn_samples (t);`,
  // 7: the operator console: operators (salted scrypt hashes, see server/console/passwords.ts), their sessions
  // (the sha256 of the session id, never the id itself; the CSRF token of the session) and the
  // audit log of every console action; times in ms since the epoch
  `CREATE TABLE console_operators (
     name TEXT PRIMARY KEY,
     password_hash TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     last_login_at INTEGER);
   CREATE TABLE console_sessions (
     id_hash TEXT PRIMARY KEY,
     operator TEXT NOT NULL,
     csrf TEXT NOT NULL,
     source TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL);
   CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
   CREATE TABLE console_audit (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     t INTEGER NOT NULL,
     operator TEXT NOT NULL,
     source TEXT NOT NULL,
     action TEXT NOT NULL,
     target TEXT NOT NULL,
     result TEXT NOT NULL,
     detail TEXT NOT NULL);
   CREATE INDEX console_audit_t ON console_audit (t);`,
  // 8: recovery plans (the plan as JSON, see server/recovery/plan.ts) and their runs (test
  // failover, failover, cleanup: the report as JSON once the run ended)
  `CREATE TABLE recovery_plans (
     name TEXT PRIMARY KEY,
     spec TEXT NOT NULL,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL);
   CREATE TABLE recovery_plan_runs (
     id TEXT PRIMARY KEY,
     plan TEXT NOT NULL,
     kind TEXT NOT NULL,
     started_at TEXT NOT NULL,
     ended_at TEXT,
     ok INTEGER,
     report TEXT);
   CREATE INDEX recovery_plan_runs_plan ON recovery_plan_runs (plan, started_at);`,
  // 9: host mode: a VM of a KVM host is a machine of its own (a row of agents with no certificate:
  // machine_id 'vm:<id>', cert_fingerprint ''), linked here to the host whose agent acts for it
  `CREATE TABLE vm_machines (
     agent_id TEXT PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
     host_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
     vm_name TEXT NOT NULL,
     qmp_socket TEXT NOT NULL,
     guest_agent_socket TEXT,
     created_at TEXT NOT NULL,
     UNIQUE (host_id, vm_name));
   CREATE INDEX vm_machines_host ON vm_machines (host_id);`,
];

/** A VM of a host agent as the configuration server records it (the VM's own row is in agents, id = agentId). */
export interface VmMachineRow {
  agentId: string; hostId: string; name: string;
  /** Where the host reaches the VM (as its inventory reported at enable; a later enable updates them). */
  qmpSocket: string; guestAgentSocket: string | null;
  createdAt: string;
}

function rowToVm(r: Record<string, unknown>): VmMachineRow {
  return {
    agentId: r.agent_id as string, hostId: r.host_id as string, name: r.vm_name as string, qmpSocket: r.qmp_socket as string,
    guestAgentSocket: (r.guest_agent_socket as string | null) ?? null, createdAt: r.created_at as string,
  };
}

/**
 * A consistency group: machines cut together by the configuration server (see group-cut.ts).
 * intervalMs 0 = group cuts only on demand; boundMs = how long the server waits for every
 * machine to answer each step of a group cut before it aborts it.
 */
export interface ConsistencyGroup { name: string; members: string[]; intervalMs: number; boundMs: number; kind: 'crash' | 'app'; createdAt: string }

/** How long churn samples are kept (a capacity plan looks at up to this much measurement). */
export const CHURN_KEEP_MS = 31 * 24 * 3600_000;

/**
 * One profiling report interval of a disk: t = the end of the interval (server clock, ms),
 * bytes = bytes written as tracked (extents of completed writes, merged per drain), writes =
 * extents, sampledBytes / compressedBytes = changed blocks read back and their lz4 size as the
 * data path would send them (all-zero blocks as 0), complete = no trace event was lost.
 */
export interface ChurnSample {
  agentId: string; diskId: string; t: number; intervalMs: number; bytes: number; writes: number;
  sampledBytes: number; compressedBytes: number; sizeBytes: number; usedBytes: number | null; complete: boolean;
}

/** History retention: 10 s samples for a day, 1-minute samples (and events, cleared alerts) for a week. */
export const HISTORY_FINE_MS = 24 * 3600_000;
export const HISTORY_KEEP_MS = 7 * 24 * 3600_000;
export const HISTORY_COARSE_RES_MS = 60_000;

/** One health sample of a disk: the aggregate of what arrived in its window (t = window start, ms). */
export interface HealthSample {
  agentId: string; diskId: string; resMs: number; t: number;
  rpoMs: number | null; dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; state: string;
}

export interface HistoryEvent {
  id: number; t: number; agentId: string; diskId: string | null;
  /** state (a disk's state changed), point (recorded), point-refused, cut-failed, session-lost, alert-fired, alert-cleared, group-point, group-cut-failed */
  kind: string; state: string | null; code: string | null; reason: string;
}

export interface AlertRow {
  id: number; agentId: string; diskId: string; kind: string; firedAt: number; clearedAt: number | null;
  rpoMs: number | null; thresholdMs: number; reason: string; clearReason: string | null;
}

function rowToSample(r: Record<string, unknown>): HealthSample {
  return {
    agentId: r.agent_id as string, diskId: r.disk_id as string, resMs: r.res_ms as number, t: r.t as number,
    rpoMs: r.rpo_ms as number | null, dataLagMs: r.data_lag_ms as number | null, backlogBytes: r.backlog_bytes as number | null,
    churnBytesPerSec: r.churn_bps as number | null, state: r.state as string,
  };
}

function rowToEvent(r: Record<string, unknown>): HistoryEvent {
  return {
    id: r.id as number, t: r.t as number, agentId: r.agent_id as string, diskId: r.disk_id as string | null, kind: r.kind as string,
    state: r.state as string | null, code: r.code as string | null, reason: r.reason as string,
  };
}

function rowToAlert(r: Record<string, unknown>): AlertRow {
  return {
    id: r.id as number, agentId: r.agent_id as string, diskId: r.disk_id as string, kind: r.kind as string, firedAt: r.fired_at as number,
    clearedAt: r.cleared_at as number | null, rpoMs: r.rpo_ms as number | null, thresholdMs: r.threshold_ms as number,
    reason: r.reason as string, clearReason: r.clear_reason as string | null,
  };
}

export interface Policy {
  name: string; rpoThresholdMs: number; retentionMs: number; crashIntervalMs: number; appIntervalMs: number;
  /** Whether the agent may compress (compressMode is not 'never'); kept for older agents and clients. */
  compress: boolean;
  /** The agent's --compress mode: stored as 0 never, 1 auto (what "compress" meant before modes), 2 always. */
  compressMode: CompressMode;
  bandwidthBytes: number;
  /** Longest freeze of a cut (ms). */
  freezeLimitMs: number;
  /** Most a cut reads into its spool while frozen (bytes). */
  spoolBudgetBytes: number;
  createdAt: string;
}

export interface AgentRow {
  id: string; machineId: string; hostname: string; certFingerprint: string; registeredAt: string; registeredWith: string;
  lastSeen: string | null; inventory: unknown; inventoryAt: string | null; policy: string | null;
  /** The registering installation (digest of the agent's state directory); null for agents registered before it was recorded. */
  installId: string | null;
}

export interface DiskRow { agentId: string; diskId: string; device: string; enabledAt: string }

export interface TokenRow { id: string; hash: string; label: string; createdAt: string; expiresAt: string; usedAt: string | null; usedBy: string | null }

/** A console operator: the password hash is a self-describing scrypt string (console/passwords.ts). */
export interface OperatorRow { name: string; passwordHash: string; createdAt: number; lastLoginAt: number | null }

/** A console session as stored: idHash = sha256(session id) in hex. */
export interface SessionRow { idHash: string; operator: string; csrf: string; source: string; createdAt: number; expiresAt: number }

/** One audited console action (or login, logout). result: ok, or the error code. */
export interface AuditRow { id: number; t: number; operator: string; source: string; action: string; target: string; result: string; detail: string }

export interface PushAccount { name: string; user: string; kind: 'key' | 'password'; secret: string; createdAt: string }

const now = () => new Date().toISOString();

/** The policies table's compress column, by value. */
const COMPRESS_MODES: CompressMode[] = ['never', 'auto', 'always'];

/** Thrown inside a transaction to roll it back as a registration conflict. */
class ConflictAbort extends Error {}

function rowToPolicy(r: Record<string, unknown>): Policy {
  return {
    name: r.name as string, rpoThresholdMs: r.rpo_threshold_ms as number, retentionMs: r.retention_ms as number,
    crashIntervalMs: r.crash_interval_ms as number, appIntervalMs: r.app_interval_ms as number,
    compress: r.compress !== 0, compressMode: COMPRESS_MODES[r.compress as number] ?? 'auto',
    bandwidthBytes: r.bandwidth_bytes as number, freezeLimitMs: r.freeze_limit_ms as number, spoolBudgetBytes: r.spool_budget_bytes as number,
    createdAt: r.created_at as string,
  };
}

function rowToAgent(r: Record<string, unknown>): AgentRow {
  let inventory: unknown = null;
  if (typeof r.inventory === 'string') {
    try { inventory = JSON.parse(r.inventory); } catch { inventory = null; }
  }
  return {
    id: r.id as string, machineId: r.machine_id as string, hostname: r.hostname as string, certFingerprint: r.cert_fingerprint as string,
    registeredAt: r.registered_at as string, registeredWith: r.registered_with as string, lastSeen: (r.last_seen as string | null) ?? null,
    inventory, inventoryAt: (r.inventory_at as string | null) ?? null, policy: (r.policy as string | null) ?? null,
    installId: (r.install_id as string | null | undefined) ?? null,
  };
}

/** AES-256-GCM with a key kept in <data-dir>/secrets.key (0600): push-account secrets at rest. */
class SecretBox {
  constructor(private readonly key: Buffer) {}
  static load(dataDir: string): SecretBox {
    const file = path.join(dataDir, 'secrets.key');
    let key: Buffer;
    try {
      key = fs.readFileSync(file);
      if (key.length !== 32) throw new MobilityError('MOB_ERR_STATE_CORRUPT', `${file} is not a 32-byte key`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      key = crypto.randomBytes(32);
      // durable before first use: a key lost after a crash would orphan every sealed secret
      const fd = fs.openSync(file, 'wx', 0o600);
      try { fs.writeSync(fd, key); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
      const dfd = fs.openSync(dataDir, 'r');
      try { fs.fsyncSync(dfd); } finally { fs.closeSync(dfd); }
    }
    return new SecretBox(key);
  }
  seal(plain: string, aad: string): Buffer {
    const iv = crypto.randomBytes(12);
    const c = crypto.createCipheriv('aes-256-gcm', this.key, iv);
    c.setAAD(Buffer.from(aad));
    const body = Buffer.concat([c.update(plain, 'utf8'), c.final()]);
    return Buffer.concat([Buffer.from([1]), iv, c.getAuthTag(), body]);
  }
  open(sealed: Buffer, aad: string): string {
    if (sealed.length < 29 || sealed[0] !== 1) throw new MobilityError('MOB_ERR_STATE_CORRUPT', 'a stored secret has an unknown format');
    const d = crypto.createDecipheriv('aes-256-gcm', this.key, sealed.subarray(1, 13));
    d.setAAD(Buffer.from(aad));
    d.setAuthTag(sealed.subarray(13, 29));
    try {
      return Buffer.concat([d.update(sealed.subarray(29)), d.final()]).toString('utf8');
    } catch {
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', 'a stored secret does not decrypt with secrets.key (was the key replaced?)');
    }
  }
}

export class ConfigDb {
  private readonly db: Database.Database;
  private readonly box: SecretBox;
  readonly schemaVersion: number;

  private constructor(readonly file: string, dataDir: string) {
    const existed = fs.existsSync(file);
    this.db = new Database(file);
    try {
      if (!existed) fs.chmodSync(file, 0o600);
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('synchronous = FULL');
      this.db.pragma('foreign_keys = ON');
      this.db.pragma('busy_timeout = 5000');
      this.schemaVersion = this.migrate();
      this.box = SecretBox.load(dataDir);
    } catch (err) {
      this.db.close();
      throw err;
    }
  }

  static open(dataDir: string): ConfigDb {
    fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    try {
      return new ConfigDb(path.join(dataDir, 'config.db'), dataDir);
    } catch (err) {
      if (err instanceof MobilityError) throw err;
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', `cannot open the configuration database: ${(err as Error).message}`, { cause: err });
    }
  }

  private migrate(): number {
    const current = this.db.pragma('user_version', { simple: true }) as number;
    if (current > MIGRATIONS.length) {
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', `config.db has schema version ${current}, newer than this server (${MIGRATIONS.length}); upgrade the server`);
    }
    for (let v = current; v < MIGRATIONS.length; v++) {
      this.db.transaction(() => {
        this.db.exec(MIGRATIONS[v]);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
    return MIGRATIONS.length;
  }

  close(): void { this.db.close(); }

  // ---- policies
  listPolicies(): Policy[] {
    return (this.db.prepare('SELECT * FROM policies ORDER BY name').all() as Record<string, unknown>[]).map(rowToPolicy);
  }
  getPolicy(name: string): Policy {
    const r = this.db.prepare('SELECT * FROM policies WHERE name = ?').get(name) as Record<string, unknown> | undefined;
    if (!r) throw new MobilityError('MOB_ERR_UNKNOWN_POLICY', `no policy named ${JSON.stringify(name)} (see mobility policy list)`);
    return rowToPolicy(r);
  }
  /** Creates or replaces a policy. */
  putPolicy(p: Omit<Policy, 'createdAt' | 'compress'>): Policy {
    this.db.prepare(`INSERT INTO policies (name, rpo_threshold_ms, retention_ms, crash_interval_ms, app_interval_ms, compress, bandwidth_bytes, freeze_limit_ms, spool_budget_bytes, created_at)
      VALUES (@name, @rpo, @ret, @crash, @app, @compress, @bw, @freeze, @spool, @at)
      ON CONFLICT(name) DO UPDATE SET rpo_threshold_ms = @rpo, retention_ms = @ret, crash_interval_ms = @crash, app_interval_ms = @app, compress = @compress, bandwidth_bytes = @bw,
        freeze_limit_ms = @freeze, spool_budget_bytes = @spool`)
      .run({
        name: p.name, rpo: p.rpoThresholdMs, ret: p.retentionMs, crash: p.crashIntervalMs, app: p.appIntervalMs, compress: COMPRESS_MODES.indexOf(p.compressMode), bw: p.bandwidthBytes,
        freeze: p.freezeLimitMs, spool: p.spoolBudgetBytes, at: now(),
      });
    return this.getPolicy(p.name);
  }

  // ---- consistency groups
  listGroups(): ConsistencyGroup[] {
    return (this.db.prepare('SELECT * FROM consistency_groups ORDER BY name').all() as Record<string, unknown>[]).map((r) => this.rowToGroup(r));
  }
  /** Throws MOB_ERR_UNKNOWN_GROUP. */
  getGroup(name: string): ConsistencyGroup {
    const r = this.db.prepare('SELECT * FROM consistency_groups WHERE name = ?').get(name) as Record<string, unknown> | undefined;
    if (!r) throw new MobilityError('MOB_ERR_UNKNOWN_GROUP', `no consistency group named ${JSON.stringify(name)} (see mobility group list)`);
    return this.rowToGroup(r);
  }
  /** The group a machine belongs to, or null. */
  groupOf(agentId: string): string | null {
    const r = this.db.prepare('SELECT group_name FROM group_members WHERE agent_id = ?').get(agentId) as { group_name: string } | undefined;
    return r?.group_name ?? null;
  }
  /** Creates or replaces a group and its member list (in one transaction). Members must exist and be in no other group (checked by the caller). */
  putGroup(g: Omit<ConsistencyGroup, 'createdAt'>): ConsistencyGroup {
    this.db.transaction(() => {
      this.db.prepare(`INSERT INTO consistency_groups (name, interval_ms, bound_ms, kind, created_at) VALUES (@name, @interval, @bound, @kind, @at)
        ON CONFLICT(name) DO UPDATE SET interval_ms = @interval, bound_ms = @bound, kind = @kind`)
        .run({ name: g.name, interval: g.intervalMs, bound: g.boundMs, kind: g.kind, at: now() });
      this.db.prepare('DELETE FROM group_members WHERE group_name = ?').run(g.name);
      const add = this.db.prepare('INSERT INTO group_members (agent_id, group_name, position) VALUES (?, ?, ?)');
      for (const [i, m] of g.members.entries()) add.run(m, g.name, i);
    })();
    return this.getGroup(g.name);
  }
  /** Removes a group (its machines leave it; their points keep their group labels). False when there was none. */
  deleteGroup(name: string): boolean {
    return this.db.prepare('DELETE FROM consistency_groups WHERE name = ?').run(name).changes > 0;
  }
  private rowToGroup(r: Record<string, unknown>): ConsistencyGroup {
    const members = (this.db.prepare('SELECT agent_id FROM group_members WHERE group_name = ? ORDER BY position').all(r.name) as { agent_id: string }[]).map((m) => m.agent_id);
    return { name: r.name as string, members, intervalMs: r.interval_ms as number, boundMs: r.bound_ms as number, kind: r.kind === 'app' ? 'app' : 'crash', createdAt: r.created_at as string };
  }

  // ---- agents
  getAgent(id: string): AgentRow | null {
    const r = this.db.prepare('SELECT * FROM agents WHERE id = ?').get(id) as Record<string, unknown> | undefined;
    return r ? rowToAgent(r) : null;
  }
  agentByMachine(machineId: string): AgentRow | null {
    const r = this.db.prepare('SELECT * FROM agents WHERE machine_id = ?').get(machineId) as Record<string, unknown> | undefined;
    return r ? rowToAgent(r) : null;
  }
  /** By id, then by hostname (unique match only). */
  findAgent(ref: string): AgentRow {
    const a = this.getAgent(ref);
    if (a) return a;
    const rows = (this.db.prepare('SELECT * FROM agents WHERE hostname = ?').all(ref) as Record<string, unknown>[]).map(rowToAgent);
    if (rows.length === 1) return rows[0];
    if (rows.length > 1) throw new MobilityError('MOB_ERR_UNKNOWN_MACHINE', `${rows.length} machines are named ${ref}: use the agent id (${rows.map((r) => r.id).join(', ')})`);
    throw new MobilityError('MOB_ERR_UNKNOWN_MACHINE', `no registered machine has id or hostname ${JSON.stringify(ref)} (see mobility machines)`);
  }
  listAgents(): AgentRow[] {
    return (this.db.prepare('SELECT * FROM agents ORDER BY id').all() as Record<string, unknown>[]).map(rowToAgent);
  }
  /** Creates or updates an agent; throws when the id or the machine id belongs to another machine. */
  upsertAgent(a: { id: string; machineId: string; hostname: string; certFingerprint: string; registeredWith: string }): void {
    if (this.registerAgent(a, null, '') !== 'ok') throw new MobilityError('MOB_ERR_CLONE', `agent ${a.id} or machine ${a.machineId} belongs to another machine`);
  }
  /**
   * Spends the token (if any) and writes the agent in one transaction. 'conflict' when the id
   * belongs to another machine or the machine to another id; 'token-used' when the token was spent.
   */
  registerAgent(a: { id: string; machineId: string; hostname: string; certFingerprint: string; registeredWith: string; installId?: string | null }, tokenId: string | null, usedBy: string): 'ok' | 'token-used' | 'conflict' {
    try {
      return this.registerTx(a, tokenId, usedBy);
    } catch (err) {
      if (err instanceof ConflictAbort) return 'conflict'; // rolled back: the token is not spent
      throw err;
    }
  }

  private registerTx(a: { id: string; machineId: string; hostname: string; certFingerprint: string; registeredWith: string; installId?: string | null }, tokenId: string | null, usedBy: string): 'ok' | 'token-used' {
    return this.db.transaction((): 'ok' | 'token-used' => {
      if (tokenId !== null && !this.consumeToken(tokenId, usedBy)) return 'token-used';
      const byMachine = this.agentByMachine(a.machineId);
      if (byMachine && byMachine.id !== a.id) throw new ConflictAbort();
      const r = this.db.prepare(`INSERT INTO agents (id, machine_id, hostname, cert_fingerprint, registered_at, registered_with, install_id)
        VALUES (@id, @machineId, @hostname, @certFingerprint, @at, @registeredWith, @installId)
        ON CONFLICT(id) DO UPDATE SET hostname = @hostname, cert_fingerprint = @certFingerprint, registered_at = @at, registered_with = @registeredWith,
          install_id = COALESCE(@installId, agents.install_id)
        WHERE agents.machine_id = @machineId`).run({ ...a, installId: a.installId ?? null, at: now() });
      if (r.changes !== 1) throw new ConflictAbort();
      return 'ok';
    })();
  }

  /**
   * Records the installation of an agent registered before installations were recorded (its
   * install_id is null), as its control connection reports it. False when one is recorded already
   * (it is never replaced here: only a registration changes it).
   */
  recordInstallId(id: string, installId: string): boolean {
    return this.db.prepare('UPDATE agents SET install_id = ? WHERE id = ? AND install_id IS NULL').run(installId, id).changes === 1;
  }

  // ---- VMs of host agents (host mode)
  /**
   * Creates (or finds) the machine of VM `name` of host `hostId` with id `agentId`: an agents row
   * with no certificate (it never authenticates: the host's agent acts for it) and its link to the
   * host, in one transaction. Throws MOB_ERR_CONFIG when the id belongs to another machine.
   */
  ensureVmMachine(hostId: string, agentId: string, vm: { name: string; qmpSocket: string; guestAgentSocket: string | null }): VmMachineRow {
    const name = vm.name;
    return this.db.transaction(() => {
      const link = this.vmMachine(agentId);
      if (link) {
        if (link.hostId !== hostId) throw new MobilityError('MOB_ERR_CONFIG', `machine ${agentId} is a VM of host ${link.hostId}, not of ${hostId}`);
        this.db.prepare('UPDATE vm_machines SET vm_name = ?, qmp_socket = ?, guest_agent_socket = ? WHERE agent_id = ?').run(name, vm.qmpSocket, vm.guestAgentSocket, agentId);
        return this.vmMachine(agentId)!;
      }
      if (this.getAgent(agentId)) throw new MobilityError('MOB_ERR_CONFIG', `machine id ${agentId} (VM ${name} of ${hostId}) belongs to a registered machine`);
      const at = now();
      this.db.prepare(`INSERT INTO agents (id, machine_id, hostname, cert_fingerprint, registered_at, registered_with) VALUES (?, ?, ?, '', ?, ?)`)
        .run(agentId, `vm:${agentId}`, name, at, `host ${hostId}`);
      this.db.prepare('INSERT INTO vm_machines (agent_id, host_id, vm_name, qmp_socket, guest_agent_socket, created_at) VALUES (?, ?, ?, ?, ?, ?)')
        .run(agentId, hostId, name, vm.qmpSocket, vm.guestAgentSocket, at);
      return this.vmMachine(agentId)!;
    })();
  }
  /** The VM link of a machine, or null when it is not a VM. */
  vmMachine(agentId: string): VmMachineRow | null {
    const r = this.db.prepare('SELECT * FROM vm_machines WHERE agent_id = ?').get(agentId) as Record<string, unknown> | undefined;
    return r ? rowToVm(r) : null;
  }
  /** The VM machines of a host (every host's when hostId is undefined), by name. */
  listVmMachines(hostId?: string): VmMachineRow[] {
    const rows = (hostId === undefined
      ? this.db.prepare('SELECT * FROM vm_machines ORDER BY host_id, vm_name').all()
      : this.db.prepare('SELECT * FROM vm_machines WHERE host_id = ? ORDER BY vm_name').all(hostId)) as Record<string, unknown>[];
    return rows.map(rowToVm);
  }

  touchAgent(id: string): void {
    this.db.prepare('UPDATE agents SET last_seen = ? WHERE id = ?').run(now(), id);
  }
  setInventory(id: string, inventory: unknown): void {
    this.db.prepare('UPDATE agents SET inventory = ?, inventory_at = ?, last_seen = ? WHERE id = ?').run(JSON.stringify(inventory), now(), now(), id);
  }
  setAgentPolicy(id: string, policy: string | null): void {
    if (policy !== null) this.getPolicy(policy);
    this.db.prepare('UPDATE agents SET policy = ? WHERE id = ?').run(policy, id);
  }

  // ---- one-time tokens: "<id>.<secret>"; only sha256(secret) is stored
  createToken(label: string, ttlMs: number): string {
    const id = crypto.randomBytes(6).toString('hex');
    const secret = crypto.randomBytes(24).toString('base64url');
    this.db.prepare('INSERT INTO tokens (id, hash, label, created_at, expires_at) VALUES (?, ?, ?, ?, ?)')
      .run(id, crypto.createHash('sha256').update(secret).digest('hex'), label, now(), new Date(Date.now() + ttlMs).toISOString());
    return `${id}.${secret}`;
  }
  getToken(id: string): TokenRow | null {
    const r = this.db.prepare('SELECT * FROM tokens WHERE id = ?').get(id) as Record<string, unknown> | undefined;
    if (!r) return null;
    return {
      id: r.id as string, hash: r.hash as string, label: r.label as string, createdAt: r.created_at as string, expiresAt: r.expires_at as string,
      usedAt: (r.used_at as string | null) ?? null, usedBy: (r.used_by as string | null) ?? null,
    };
  }
  /** Marks the token used; false when it was already used (the check and the mark are one statement). */
  consumeToken(id: string, usedBy: string): boolean {
    return this.db.prepare('UPDATE tokens SET used_at = ?, used_by = ? WHERE id = ? AND used_at IS NULL').run(now(), usedBy, id).changes === 1;
  }

  // ---- enabled disks
  listDisks(agentId?: string): DiskRow[] {
    const rows = (agentId === undefined
      ? this.db.prepare('SELECT * FROM disks ORDER BY agent_id, disk_id').all()
      : this.db.prepare('SELECT * FROM disks WHERE agent_id = ? ORDER BY disk_id').all(agentId)) as Record<string, unknown>[];
    return rows.map((r) => ({ agentId: r.agent_id as string, diskId: r.disk_id as string, device: r.device as string, enabledAt: r.enabled_at as string }));
  }
  enableDisk(agentId: string, diskId: string, device: string): void {
    this.db.prepare(`INSERT INTO disks (agent_id, disk_id, device, enabled_at) VALUES (?, ?, ?, ?)
      ON CONFLICT(agent_id, disk_id) DO UPDATE SET device = excluded.device`).run(agentId, diskId, device, now());
  }
  disableDisk(agentId: string, diskId: string): boolean {
    return this.db.prepare('DELETE FROM disks WHERE agent_id = ? AND disk_id = ?').run(agentId, diskId).changes === 1;
  }

  // ---- profiled disks (capacity planning: tracked, never replicated)
  listProfileDisks(agentId?: string): DiskRow[] {
    const rows = (agentId === undefined
      ? this.db.prepare('SELECT * FROM profile_disks ORDER BY agent_id, disk_id').all()
      : this.db.prepare('SELECT * FROM profile_disks WHERE agent_id = ? ORDER BY disk_id').all(agentId)) as Record<string, unknown>[];
    return rows.map((r) => ({ agentId: r.agent_id as string, diskId: r.disk_id as string, device: r.device as string, enabledAt: r.enabled_at as string }));
  }
  /** Profiles a disk (the API refuses a disk that is protected; enabling protection removes the profile). */
  enableProfile(agentId: string, diskId: string, device: string): void {
    this.db.prepare(`INSERT INTO profile_disks (agent_id, disk_id, device, enabled_at) VALUES (?, ?, ?, ?)
      ON CONFLICT(agent_id, disk_id) DO UPDATE SET device = excluded.device`).run(agentId, diskId, device, now());
  }
  disableProfile(agentId: string, diskId: string): boolean {
    return this.db.prepare('DELETE FROM profile_disks WHERE agent_id = ? AND disk_id = ?').run(agentId, diskId).changes === 1;
  }
  /** Writes churn samples (a sample for the same disk and time replaces the older one) and drops those past CHURN_KEEP_MS. */
  recordChurn(samples: ChurnSample[], nowMs = Date.now()): void {
    const ins = this.db.prepare(`INSERT OR REPLACE INTO churn_samples (agent_id, disk_id, t, interval_ms, bytes, writes, sampled_bytes, compressed_bytes, size_bytes, used_bytes, complete)
      VALUES (@agentId, @diskId, @t, @intervalMs, @bytes, @writes, @sampledBytes, @compressedBytes, @sizeBytes, @usedBytes, @complete)`);
    this.db.transaction(() => {
      for (const s of samples) ins.run({ ...s, complete: s.complete ? 1 : 0 });
      this.db.prepare('DELETE FROM churn_samples WHERE t < ?').run(nowMs - CHURN_KEEP_MS);
    })();
  }
  /** Churn samples from sinceMs on, of one agent when given, oldest first per disk. */
  churnSamples(o: { agentId?: string | null; sinceMs?: number } = {}): ChurnSample[] {
    return (this.db.prepare(`SELECT * FROM churn_samples WHERE t >= @since AND (@agent IS NULL OR agent_id = @agent) ORDER BY agent_id, disk_id, t`)
      .all({ since: o.sinceMs ?? 0, agent: o.agentId ?? null }) as Record<string, unknown>[]).map((r) => ({
      agentId: r.agent_id as string, diskId: r.disk_id as string, t: r.t as number, intervalMs: r.interval_ms as number, bytes: r.bytes as number,
      writes: r.writes as number, sampledBytes: r.sampled_bytes as number, compressedBytes: r.compressed_bytes as number, sizeBytes: r.size_bytes as number,
      usedBytes: (r.used_bytes as number | null) ?? null, complete: r.complete !== 0,
    }));
  }

  // ---- push accounts (secret sealed with secrets.key)
  putPushAccount(a: { name: string; user: string; kind: 'key' | 'password'; secret: string }): void {
    this.db.prepare(`INSERT INTO push_accounts (name, user, kind, secret, created_at) VALUES (?, ?, ?, ?, ?)
      ON CONFLICT(name) DO UPDATE SET user = excluded.user, kind = excluded.kind, secret = excluded.secret`)
      .run(a.name, a.user, a.kind, this.box.seal(a.secret, a.name), now());
  }
  getPushAccount(name: string): PushAccount {
    const r = this.db.prepare('SELECT * FROM push_accounts WHERE name = ?').get(name) as Record<string, unknown> | undefined;
    if (!r) throw new MobilityError('MOB_ERR_CONFIG', `no push account named ${JSON.stringify(name)} (see mobility push-account list)`);
    return { name: r.name as string, user: r.user as string, kind: r.kind as 'key' | 'password', secret: this.box.open(r.secret as Buffer, r.name as string), createdAt: r.created_at as string };
  }
  listPushAccounts(): Omit<PushAccount, 'secret'>[] {
    return (this.db.prepare('SELECT name, user, kind, created_at FROM push_accounts ORDER BY name').all() as Record<string, unknown>[])
      .map((r) => ({ name: r.name as string, user: r.user as string, kind: r.kind as 'key' | 'password', createdAt: r.created_at as string }));
  }
  removePushAccount(name: string): boolean {
    return this.db.prepare('DELETE FROM push_accounts WHERE name = ?').run(name).changes === 1;
  }

  // ---- history (written by server/history.ts in batches, one transaction per flush)
  /**
   * Writes a flush: samples (a row already there for the same disk and window is replaced), events,
   * alerts fired (their ids are set on the objects) and alerts cleared, in one transaction.
   */
  writeHistory(b: { samples: HealthSample[]; events: Omit<HistoryEvent, 'id'>[]; fired: Omit<AlertRow, 'id'>[]; cleared: { id: number; clearedAt: number; clearReason: string }[] }): number[] {
    const ins = this.db.prepare(`INSERT OR REPLACE INTO health_samples (agent_id, disk_id, res_ms, t, rpo_ms, data_lag_ms, backlog_bytes, churn_bps, state)
      VALUES (@agentId, @diskId, @resMs, @t, @rpoMs, @dataLagMs, @backlogBytes, @churnBytesPerSec, @state)`);
    const ev = this.db.prepare('INSERT INTO events (t, agent_id, disk_id, kind, state, code, reason) VALUES (@t, @agentId, @diskId, @kind, @state, @code, @reason)');
    const fire = this.db.prepare(`INSERT INTO alerts (agent_id, disk_id, kind, fired_at, cleared_at, rpo_ms, threshold_ms, reason, clear_reason)
      VALUES (@agentId, @diskId, @kind, @firedAt, @clearedAt, @rpoMs, @thresholdMs, @reason, @clearReason)`);
    const clear = this.db.prepare('UPDATE alerts SET cleared_at = @clearedAt, clear_reason = @clearReason WHERE id = @id AND cleared_at IS NULL');
    return this.db.transaction(() => {
      for (const s of b.samples) ins.run(s);
      for (const e of b.events) ev.run(e);
      const ids = b.fired.map((a) => Number(fire.run(a).lastInsertRowid));
      for (const c of b.cleared) clear.run(c);
      return ids;
    })();
  }

  /** Samples of the disks matching agent/disk (null: all) from sinceMs on, oldest first (both resolutions). */
  historySamples(o: { agentId?: string | null; diskId?: string | null; sinceMs: number }): HealthSample[] {
    return (this.db.prepare(`SELECT * FROM health_samples WHERE t >= @since AND (@agent IS NULL OR agent_id = @agent) AND (@disk IS NULL OR disk_id = @disk)
      ORDER BY agent_id, disk_id, t`).all({ since: o.sinceMs, agent: o.agentId ?? null, disk: o.diskId ?? null }) as Record<string, unknown>[]).map(rowToSample);
  }

  /** Events newest first: from sinceMs on (inclusive), at most limit, of one agent/disk when given. */
  listEvents(o: { sinceMs?: number; limit?: number; agentId?: string | null; diskId?: string | null } = {}): HistoryEvent[] {
    return (this.db.prepare(`SELECT * FROM events WHERE t >= @since AND (@agent IS NULL OR agent_id = @agent) AND (@disk IS NULL OR disk_id = @disk)
      ORDER BY t DESC, id DESC LIMIT @limit`).all({ since: o.sinceMs ?? 0, limit: o.limit ?? 100, agent: o.agentId ?? null, disk: o.diskId ?? null }) as Record<string, unknown>[]).map(rowToEvent);
  }

  /** Alerts newest first (by firing time); only those not cleared with active. */
  listAlerts(o: { active?: boolean; limit?: number; agentId?: string | null } = {}): AlertRow[] {
    return (this.db.prepare(`SELECT * FROM alerts WHERE (@active = 0 OR cleared_at IS NULL) AND (@agent IS NULL OR agent_id = @agent)
      ORDER BY fired_at DESC, id DESC LIMIT @limit`).all({ active: o.active ? 1 : 0, limit: o.limit ?? 1000, agent: o.agentId ?? null }) as Record<string, unknown>[]).map(rowToAlert);
  }

  /** The last recorded state of every disk (the newest 'state' event), to tell a change after a restart. */
  lastStates(): { agentId: string; diskId: string; state: string }[] {
    return (this.db.prepare(`SELECT e.agent_id, e.disk_id, e.state FROM events e
      JOIN (SELECT agent_id, disk_id, MAX(id) AS id FROM events WHERE kind = 'state' GROUP BY agent_id, disk_id) m ON e.id = m.id`).all() as Record<string, unknown>[])
      .map((r) => ({ agentId: r.agent_id as string, diskId: r.disk_id as string, state: r.state as string }));
  }

  /**
   * Retention of the history at nowMs: 10 s rows older than fineMs become one row per disk and
   * minute (max RPO, lag and backlog, mean churn, the last state), then rows, events and cleared
   * alerts older than keepMs are deleted. One transaction; returns what it did.
   */
  compactHistory(nowMs: number, fineMs = HISTORY_FINE_MS, keepMs = HISTORY_KEEP_MS): { downsampled: number; written: number; deleted: number } {
    const res = HISTORY_COARSE_RES_MS;
    return this.db.transaction(() => {
      const fineBefore = nowMs - fineMs;
      const keepFrom = nowMs - keepMs;
      // rows past the week are not folded: they are deleted below
      const old = this.db.prepare('SELECT * FROM health_samples WHERE res_ms < ? AND t < ? AND t >= ? ORDER BY agent_id, disk_id, t').all(res, fineBefore, keepFrom) as Record<string, unknown>[];
      const buckets = new Map<string, { s: HealthSample; churnSum: number; churnN: number }>();
      for (const r of old.map(rowToSample)) {
        const t = Math.floor(r.t / res) * res;
        const key = `${r.agentId}\0${r.diskId}\0${t}`;
        const b = buckets.get(key);
        const mx = (a: number | null, x: number | null) => (a === null ? x : x === null ? a : Math.max(a, x));
        if (!b) {
          buckets.set(key, { s: { ...r, resMs: res, t }, churnSum: r.churnBytesPerSec ?? 0, churnN: r.churnBytesPerSec === null ? 0 : 1 });
        } else {
          b.s.rpoMs = mx(b.s.rpoMs, r.rpoMs);
          b.s.dataLagMs = mx(b.s.dataLagMs, r.dataLagMs);
          b.s.backlogBytes = mx(b.s.backlogBytes, r.backlogBytes);
          if (r.churnBytesPerSec !== null) { b.churnSum += r.churnBytesPerSec; b.churnN++; }
          b.s.state = r.state; // rows come oldest first: the last one's state wins
        }
      }
      // a minute row already written (a minute split by an earlier run) is merged in
      const prev = this.db.prepare('SELECT * FROM health_samples WHERE agent_id = ? AND disk_id = ? AND res_ms = ? AND t = ?');
      const ins = this.db.prepare(`INSERT OR REPLACE INTO health_samples (agent_id, disk_id, res_ms, t, rpo_ms, data_lag_ms, backlog_bytes, churn_bps, state)
        VALUES (@agentId, @diskId, @resMs, @t, @rpoMs, @dataLagMs, @backlogBytes, @churnBytesPerSec, @state)`);
      for (const b of buckets.values()) {
        const p = prev.get(b.s.agentId, b.s.diskId, res, b.s.t) as Record<string, unknown> | undefined;
        const s = b.s;
        s.churnBytesPerSec = b.churnN ? b.churnSum / b.churnN : null;
        if (p) {
          const q = rowToSample(p);
          const mx = (a: number | null, x: number | null) => (a === null ? x : x === null ? a : Math.max(a, x));
          s.rpoMs = mx(s.rpoMs, q.rpoMs); s.dataLagMs = mx(s.dataLagMs, q.dataLagMs); s.backlogBytes = mx(s.backlogBytes, q.backlogBytes);
          if (q.churnBytesPerSec !== null) s.churnBytesPerSec = s.churnBytesPerSec === null ? q.churnBytesPerSec : (s.churnBytesPerSec + q.churnBytesPerSec) / 2;
        }
        ins.run(s);
      }
      this.db.prepare('DELETE FROM health_samples WHERE res_ms < ? AND t < ?').run(res, fineBefore);
      let deleted = this.db.prepare('DELETE FROM health_samples WHERE t < ?').run(keepFrom).changes;
      deleted += this.db.prepare('DELETE FROM events WHERE t < ?').run(keepFrom).changes;
      deleted += this.db.prepare('DELETE FROM alerts WHERE cleared_at IS NOT NULL AND cleared_at < ?').run(keepFrom).changes;
      return { downsampled: old.length, written: buckets.size, deleted };
    })();
  }

  // ---- console operators, sessions and audit (server/console/)
  putOperator(name: string, passwordHash: string): 'created' | 'updated' {
    const had = this.getOperator(name) !== null;
    this.db.prepare(`INSERT INTO console_operators (name, password_hash, created_at) VALUES (?, ?, ?)
      ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash`).run(name, passwordHash, Date.now());
    // a new password ends the operator's sessions
    if (had) this.db.prepare('DELETE FROM console_sessions WHERE operator = ?').run(name);
    return had ? 'updated' : 'created';
  }
  getOperator(name: string): OperatorRow | null {
    const r = this.db.prepare('SELECT * FROM console_operators WHERE name = ?').get(name) as Record<string, unknown> | undefined;
    return r ? { name: r.name as string, passwordHash: r.password_hash as string, createdAt: r.created_at as number, lastLoginAt: r.last_login_at as number | null } : null;
  }
  listOperators(): Omit<OperatorRow, 'passwordHash'>[] {
    return (this.db.prepare('SELECT name, created_at, last_login_at FROM console_operators ORDER BY name').all() as Record<string, unknown>[])
      .map((r) => ({ name: r.name as string, createdAt: r.created_at as number, lastLoginAt: r.last_login_at as number | null }));
  }
  /** Removes the operator and ends its sessions; false when there was none. */
  removeOperator(name: string): boolean {
    return this.db.transaction(() => {
      this.db.prepare('DELETE FROM console_sessions WHERE operator = ?').run(name);
      return this.db.prepare('DELETE FROM console_operators WHERE name = ?').run(name).changes === 1;
    })();
  }
  touchOperatorLogin(name: string, t: number): void {
    this.db.prepare('UPDATE console_operators SET last_login_at = ? WHERE name = ?').run(t, name);
  }
  putSession(s: SessionRow): void {
    this.db.prepare('INSERT INTO console_sessions (id_hash, operator, csrf, source, created_at, expires_at) VALUES (@idHash, @operator, @csrf, @source, @createdAt, @expiresAt)').run(s);
  }
  getSession(idHash: string): SessionRow | null {
    const r = this.db.prepare('SELECT * FROM console_sessions WHERE id_hash = ?').get(idHash) as Record<string, unknown> | undefined;
    return r ? { idHash: r.id_hash as string, operator: r.operator as string, csrf: r.csrf as string, source: r.source as string, createdAt: r.created_at as number, expiresAt: r.expires_at as number } : null;
  }
  extendSession(idHash: string, expiresAt: number): void {
    this.db.prepare('UPDATE console_sessions SET expires_at = ? WHERE id_hash = ?').run(expiresAt, idHash);
  }
  deleteSession(idHash: string): boolean {
    return this.db.prepare('DELETE FROM console_sessions WHERE id_hash = ?').run(idHash).changes === 1;
  }
  /** Deletes sessions expired at nowMs; returns how many. */
  purgeSessions(nowMs: number): number {
    return this.db.prepare('DELETE FROM console_sessions WHERE expires_at <= ?').run(nowMs).changes;
  }
  addAudit(a: Omit<AuditRow, 'id'>): number {
    return Number(this.db.prepare('INSERT INTO console_audit (t, operator, source, action, target, result, detail) VALUES (@t, @operator, @source, @action, @target, @result, @detail)').run(a).lastInsertRowid);
  }
  /** Audit entries newest first. */
  listAudit(o: { limit?: number } = {}): AuditRow[] {
    return (this.db.prepare('SELECT * FROM console_audit ORDER BY t DESC, id DESC LIMIT ?').all(o.limit ?? 200) as Record<string, unknown>[]).map((r) => ({
      id: r.id as number, t: r.t as number, operator: r.operator as string, source: r.source as string, action: r.action as string,
      target: r.target as string, result: r.result as string, detail: r.detail as string,
    }));
  }

  // ---- recovery plans (server/recovery/plan.ts)
  putPlan(name: string, spec: object): { createdAt: string; updatedAt: string } {
    const now = new Date().toISOString();
    this.db.prepare(`INSERT INTO recovery_plans (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)
      ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at`).run(name, JSON.stringify(spec), now, now);
    const r = this.db.prepare('SELECT created_at, updated_at FROM recovery_plans WHERE name = ?').get(name) as { created_at: string; updated_at: string };
    return { createdAt: r.created_at, updatedAt: r.updated_at };
  }
  /** The stored plans: their JSON and times. */
  listPlans(): { name: string; spec: unknown; createdAt: string; updatedAt: string }[] {
    return (this.db.prepare('SELECT * FROM recovery_plans ORDER BY name').all() as Record<string, unknown>[])
      .map((r) => ({ name: r.name as string, spec: JSON.parse(r.spec as string) as unknown, createdAt: r.created_at as string, updatedAt: r.updated_at as string }));
  }
  getPlan(name: string): { name: string; spec: unknown; createdAt: string; updatedAt: string } {
    const p = this.listPlans().find((x) => x.name === name);
    if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_PLAN', `no recovery plan named ${JSON.stringify(name)} (see mobility recovery-plan list)`);
    return p;
  }
  /** Removes a plan and its run history (a new plan of the same name starts with none). */
  deletePlan(name: string): boolean {
    return this.db.transaction(() => {
      this.db.prepare('DELETE FROM recovery_plan_runs WHERE plan = ?').run(name);
      return this.db.prepare('DELETE FROM recovery_plans WHERE name = ?').run(name).changes > 0;
    })();
  }
  /** Runs a stopped server left unfinished: recorded as failed (called once at server start). */
  abandonPlanRuns(): number {
    return this.db.prepare("UPDATE recovery_plan_runs SET ended_at = ?, ok = 0, report = COALESCE(report, json_object('failure', 'the server stopped during the run', 'steps', json_array())) WHERE ended_at IS NULL")
      .run(new Date().toISOString()).changes;
  }
  startPlanRun(id: string, plan: string, kind: string): void {
    this.db.prepare('INSERT INTO recovery_plan_runs (id, plan, kind, started_at) VALUES (?, ?, ?, ?)').run(id, plan, kind, new Date().toISOString());
  }
  endPlanRun(id: string, ok: boolean, report: object): void {
    this.db.prepare('UPDATE recovery_plan_runs SET ended_at = ?, ok = ?, report = ? WHERE id = ?').run(new Date().toISOString(), ok ? 1 : 0, JSON.stringify(report), id);
  }
  /** A plan's runs, newest first (a run still going has endedAt, ok and report null). */
  listPlanRuns(plan: string, limit = 20): { id: string; plan: string; kind: string; startedAt: string; endedAt: string | null; ok: boolean | null; report: unknown }[] {
    return (this.db.prepare('SELECT * FROM recovery_plan_runs WHERE plan = ? ORDER BY started_at DESC, rowid DESC LIMIT ?').all(plan, limit) as Record<string, unknown>[]).map((r) => ({
      id: r.id as string, plan: r.plan as string, kind: r.kind as string, startedAt: r.started_at as string, endedAt: (r.ended_at as string | null) ?? null,
      ok: r.ok === null || r.ok === undefined ? null : r.ok === 1, report: typeof r.report === 'string' ? JSON.parse(r.report) as unknown : null,
    }));
  }
}

/**
 * The control connection: one WebSocket per registered agent (/v1/control,
 * authenticated by the agent's client certificate), JSON text messages. The
 * server pushes the agent's assignments (disks to protect and the policy that
 * governs them) whenever they change, asks it to run preflight checks and
 * on-demand cuts, and receives its inventory and protection events. See
 * docs/protocol.md, "Control channel".
 */
import crypto from 'node:crypto';
import type { WebSocket } from 'ws';
import { MobilityError, isErrorCode, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ConfigDb, Policy } from './config-db.js';
import type { GroupAgentMessage, GroupServerMessage } from './group-cut.js';

export const CONTROL_PING_MS = 15_000;
const PREFLIGHT_TIMEOUT_MS = 60_000;
/** The agent answers a cut request at once (accepted or refused); the cut itself is waited for elsewhere. */
const CUT_REPLY_TIMEOUT_MS = 30_000;
const HELLO_TIMEOUT_MS = 10_000;
/** An installation id as registration accepts it (installIdOf: 16 hex). */
const INSTALL_ID = /^[0-9a-f]{8,64}$/;

export interface Assignment { diskId: string; device: string }
/**
 * A VM a host agent protects for its machine (host mode): machineId is the VM's machine id (its
 * replication sessions and recovery points are keyed by it), disks its block nodes, policy the
 * VM machine's own.
 */
export interface VmAssignment {
  machineId: string; name: string; qmpSocket: string; guestAgentSocket: string | null; policy: Policy;
  disks: { diskId: string; node: string }[];
}
/** disks: to protect; profile: to profile only (track and report churn, never replicate); vms: a host agent's VMs to protect. */
export interface AssignmentsMessage { type: 'assignments'; agentId: string; policy: Policy; disks: Assignment[]; profile: Assignment[]; vms: VmAssignment[] }

/** How a VM's disk is stored in the disks table: its block node, prefixed (never a device path). */
export const QEMU_DEVICE_PREFIX = 'qemu:';

/** Most disks one churn message may carry. */
const MAX_CHURN_DISKS = 256;
const CHURN_FIELDS = ['intervalMs', 'bytes', 'writes', 'sampledBytes', 'compressedBytes', 'sizeBytes'] as const;

/**
 * A churn message's disks, checked: every figure a non-negative safe integer (intervalMs >= 1,
 * compressedBytes <= a bound of lz4 on sampledBytes), usedBytes one too or null. Throws
 * MOB_ERR_FRAME_MALFORMED naming the first bad field.
 */
export function parseChurn(m: Record<string, unknown>): ChurnReportIn[] {
  if (!Array.isArray(m.disks) || m.disks.length > MAX_CHURN_DISKS) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `a churn message carries a list of at most ${MAX_CHURN_DISKS} disks`);
  return (m.disks as unknown[]).map((x, i) => {
    if (typeof x !== 'object' || x === null) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn disk ${i} is not an object`);
    const d = x as Record<string, unknown>;
    if (typeof d.diskId !== 'string' || !d.diskId) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn disk ${i} has no diskId`);
    const n: Record<string, number> = {};
    for (const f of CHURN_FIELDS) {
      const v = d[f];
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < (f === 'intervalMs' ? 1 : 0)) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn of ${d.diskId}: ${f} must be a whole number >= ${f === 'intervalMs' ? 1 : 0}, not ${JSON.stringify(v)}`);
      n[f] = v;
    }
    const used = d.usedBytes;
    if (used !== null && used !== undefined && (typeof used !== 'number' || !Number.isSafeInteger(used) || used < 0)) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn of ${d.diskId}: usedBytes must be a whole number >= 0 or null`);
    if (typeof d.complete !== 'boolean') throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn of ${d.diskId}: complete must be a boolean`);
    // lz4's worst case is a little over the input; the data path sends such a block raw
    if (n.compressedBytes! > n.sampledBytes!) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `churn of ${d.diskId}: compressedBytes (${n.compressedBytes}) is over sampledBytes (${n.sampledBytes})`);
    return {
      diskId: d.diskId, intervalMs: n.intervalMs!, bytes: n.bytes!, writes: n.writes!, sampledBytes: n.sampledBytes!, compressedBytes: n.compressedBytes!,
      sizeBytes: n.sizeBytes!, usedBytes: typeof used === 'number' ? used : null, complete: d.complete,
    };
  });
}

export interface ChurnReportIn {
  diskId: string; intervalMs: number; bytes: number; writes: number; sampledBytes: number; compressedBytes: number;
  sizeBytes: number; usedBytes: number | null; complete: boolean;
}

export interface PreflightReply { ok: boolean; checks: { id: string; ok: boolean; code?: string; message: string; fix?: string }[] }

/** A protection event the agent forwarded ({event: 'cut' | 'cut-failed' | 'state' | ...}). */
export type AgentEvent = Record<string, unknown> & { event?: unknown };

interface Pending { type: string; resolve: (m: Record<string, unknown>) => void; reject: (e: MobilityError) => void; timer: NodeJS.Timeout }

class ControlSession {
  private readonly pending = new Map<string, Pending>();
  private alive = true;
  private readonly ping: NodeJS.Timeout;
  ready = false;

  private readonly helloTimer: NodeJS.Timeout;

  constructor(readonly hub: ControlHub, readonly agentId: string, readonly ws: WebSocket, readonly log: Logger, readonly certFingerprint: string) {
    hub.all.add(this);
    ws.on('message', (data, isBinary) => this.onMessage(data as Buffer, isBinary));
    this.helloTimer = setTimeout(() => {
      if (!this.ready) this.fail(new MobilityError('MOB_ERR_HANDSHAKE', `no hello within ${HELLO_TIMEOUT_MS / 1000} s`));
    }, HELLO_TIMEOUT_MS);
    this.helloTimer.unref();
    ws.on('pong', () => { this.alive = true; });
    ws.on('close', () => this.closed());
    ws.on('error', () => this.closed());
    this.ping = setInterval(() => {
      if (!this.alive) { ws.terminate(); return; }
      this.alive = false;
      ws.ping();
    }, CONTROL_PING_MS);
    this.ping.unref();
  }

  send(msg: object): void {
    if (this.ws.readyState === this.ws.OPEN) this.ws.send(JSON.stringify(msg));
  }

  fail(err: MobilityError): void {
    this.send({ type: 'error', code: err.code, message: err.message });
    this.ws.close(1008, err.code);
    setTimeout(() => this.ws.terminate(), 5000).unref();
  }

  private onMessage(data: Buffer, isBinary: boolean): void {
    try {
      if (isBinary) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'control messages are JSON text');
      let m: Record<string, unknown>;
      try {
        m = JSON.parse(data.toString('utf8')) as Record<string, unknown>;
      } catch {
        throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a control message is not JSON');
      }
      if (typeof m !== 'object' || m === null) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a control message is not an object');
      if (!this.ready && m.type !== 'hello') throw new MobilityError('MOB_ERR_HANDSHAKE', 'the first control message must be a hello');
      switch (m.type) {
        case 'hello': return this.onHello(m);
        case 'inventory':
          this.hub.db.setInventory(this.agentId, m.inventory ?? null);
          this.log.info('inventory received', { agent: this.agentId });
          return;
        case 'preflight-result': {
          const p = this.take(m, 'preflight');
          if (!p) return;
          const valid = Array.isArray(m.checks) && m.checks.length > 0
            && (m.checks as unknown[]).every((c) => typeof c === 'object' && c !== null && typeof (c as { ok?: unknown }).ok === 'boolean' && typeof (c as { id?: unknown }).id === 'string');
          if (!valid) {
            const e = new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a preflight result must be a non-empty list of checks');
            p.reject(e);
            throw e;
          }
          p.resolve(m);
          return;
        }
        case 'cut-reply': {
          const p = this.take(m, 'cut');
          if (!p) return;
          const valid = m.accepted === true ? typeof m.requestedAtMs === 'number' && Number.isFinite(m.requestedAtMs)
            : m.accepted === false && typeof m.code === 'string' && typeof m.message === 'string';
          if (!valid) {
            const e = new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a cut reply is {accepted: true, requestedAtMs} or {accepted: false, code, message}');
            p.reject(e);
            throw e;
          }
          // resolved synchronously: events that follow the reply on this connection belong to the request
          p.resolve(m);
          return;
        }
        case 'group-converged': case 'group-ready': case 'group-failed': {
          if (typeof m.point !== 'string' || !m.point) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `a ${m.type} message needs the group point it answers`);
          if (m.type === 'group-failed' && (typeof m.code !== 'string' || typeof m.message !== 'string')) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a group-failed message needs a code and a message');
          if (m.type === 'group-ready' && (typeof m.frozenAtMs !== 'number' || !Number.isFinite(m.frozenAtMs))) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a group-ready message needs frozenAtMs');
          const who = this.subject(m);
          if (who) this.hub.groupHandler?.onMessage(who, m as unknown as GroupAgentMessage);
          return;
        }
        case 'churn': {
          // profile-only disks' measurements: kept for the disks still profiled (a late report of a
          // disk disabled meanwhile is dropped), timed by the server's clock
          const reports = parseChurn(m);
          const profiled = new Set(this.hub.db.listProfileDisks(this.agentId).map((d) => d.diskId));
          const age = m.ageMs ?? 0;
          if (typeof age !== 'number' || !Number.isSafeInteger(age) || age < 0) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'a churn message\'s ageMs must be a whole number >= 0');
          const t = Date.now() - age;
          const samples = reports.filter((r) => profiled.has(r.diskId)).map((r) => ({ agentId: this.agentId, ...r, t }));
          if (samples.length) this.hub.db.recordChurn(samples, t);
          this.hub.db.touchAgent(this.agentId);
          return;
        }
        case 'event': {
          this.hub.db.touchAgent(this.agentId);
          const ev = typeof m.event === 'object' && m.event !== null && !Array.isArray(m.event) ? m.event as AgentEvent : null;
          const who = this.subject(m);
          if (!who) return;
          this.log.info('agent event', { agent: who, ...(who !== this.agentId ? { host: this.agentId } : {}), event: ev });
          if (ev) this.hub.emitEvent(who, ev);
          return;
        }
        default:
          throw new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', `unknown control message type ${JSON.stringify(m.type)}`);
      }
    } catch (err) {
      this.fail(toMobilityError(err));
    }
  }

  private onHello(m: Record<string, unknown>): void {
    if (this.ready) throw new MobilityError('MOB_ERR_HANDSHAKE', 'hello sent twice');
    const row = this.hub.db.getAgent(this.agentId);
    if (!row) throw new MobilityError('MOB_ERR_NOT_REGISTERED', `agent ${this.agentId} is not registered`);
    // checked again here: the certificate may have been superseded since the connection opened
    if (row.certFingerprint !== this.certFingerprint) throw new MobilityError('MOB_ERR_NOT_REGISTERED', `this certificate of agent ${this.agentId} was superseded by a later registration; register again`);
    const machineId = typeof m.machineId === 'string' ? m.machineId.toLowerCase() : '';
    if (machineId !== row.machineId) {
      this.log.warn('clone refused', { agent: this.agentId, registeredMachine: row.machineId, machineId });
      throw new MobilityError('MOB_ERR_CLONE', `agent ${this.agentId} is registered for machine ${row.machineId}, but this machine's id is ${machineId || '(none)'}: a cloned machine or copied agent state; remove the agent state and register the clone as a new machine`);
    }
    // agents registered before installations were recorded: the first hello that names its
    // installation records it, so that a second installation cannot take the identity over
    // silently (Registry refuses it while this one is connected)
    if (row.installId === null && typeof m.installId === 'string' && INSTALL_ID.test(m.installId) && this.hub.db.recordInstallId(this.agentId, m.installId)) {
      this.log.info('agent installation recorded', { agent: this.agentId, installId: m.installId });
    }
    this.ready = true;
    const prev = this.hub.sessions.get(this.agentId);
    if (prev && prev !== this) prev.fail(new MobilityError('MOB_ERR_SHUTTING_DOWN', 'superseded by a newer control connection of the same agent'));
    this.hub.sessions.set(this.agentId, this);
    this.hub.db.touchAgent(this.agentId);
    this.log.info('agent control connected', { agent: this.agentId, version: m.agentVersion });
    this.send(this.hub.assignments(this.agentId));
  }

  /**
   * The machine a message of a host agent speaks for: `machineId` when it names one of this
   * host's VMs, this agent when it names none. A message for a machine that is not (or no longer)
   * a VM of this host is dropped (null, logged): a VM disabled a moment ago may still report.
   */
  private subject(m: Record<string, unknown>): string | null {
    if (m.machineId === undefined || m.machineId === null || m.machineId === this.agentId) return this.agentId;
    if (typeof m.machineId !== 'string') throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'machineId must be a string');
    if (this.hub.db.vmMachine(m.machineId)?.hostId === this.agentId) return m.machineId;
    this.log.warn('message for a machine that is not a VM of this host dropped', { agent: this.agentId, machineId: m.machineId, type: m.type });
    return null;
  }

  /** The pending request a reply answers (removed), or undefined for an unknown id or a reply of another kind. */
  private take(m: Record<string, unknown>, type: string): Pending | undefined {
    const p = this.pending.get(String(m.id));
    if (!p || p.type !== type) return undefined;
    this.pending.delete(String(m.id));
    clearTimeout(p.timer);
    return p;
  }

  /**
   * Sends {type, id, ...body} and resolves with the agent's reply. onReply runs synchronously
   * when the reply arrives (before any later message of this connection is handled).
   */
  request(type: string, body: object, timeoutMs: number, onReply?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
    const id = crypto.randomBytes(8).toString('hex');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new MobilityError('MOB_ERR_AGENT_OFFLINE', `agent ${this.agentId} did not answer the ${type} request within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { type, resolve: (m) => { onReply?.(m); resolve(m); }, reject, timer });
      this.send({ type, id, ...body });
    });
  }

  async preflight(disks: string[], qemu?: { qmpSocket: string; nodes: string[] }): Promise<PreflightReply> {
    const m = await this.request('preflight', qemu ? { disks, qemu } : { disks }, PREFLIGHT_TIMEOUT_MS);
    const checks = m.checks as PreflightReply['checks'];
    return { ok: checks.every((c) => c.ok), checks };
  }

  private closed(): void {
    clearInterval(this.ping);
    clearTimeout(this.helloTimer);
    this.hub.all.delete(this);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new MobilityError('MOB_ERR_AGENT_OFFLINE', `agent ${this.agentId} disconnected`));
    }
    this.pending.clear();
    if (this.hub.sessions.get(this.agentId) === this) {
      this.hub.sessions.delete(this.agentId);
      this.log.info('agent control disconnected', { agent: this.agentId });
      // a group cut waiting for this machine (or one of its VMs) aborts now (not at its bound)
      this.hub.groupHandler?.onDisconnect(this.agentId);
      for (const vm of this.hub.db.listVmMachines(this.agentId)) this.hub.groupHandler?.onDisconnect(vm.agentId);
    }
  }
}

export class ControlHub {
  /** Sessions that completed their hello, by agent. */
  readonly sessions = new Map<string, ControlSession>();
  /** Every open session, with or without a hello. */
  readonly all = new Set<ControlSession>();
  private readonly eventWatchers = new Set<(agentId: string, e: AgentEvent) => void>();
  /** Where the group messages of agents go (the group coordinator), set by the server. */
  groupHandler: { onMessage(agentId: string, m: GroupAgentMessage): void; onDisconnect(agentId: string): void } | null = null;
  constructor(readonly db: ConfigDb, readonly log: Logger) {}

  /** The host agent that acts for a VM machine, or null when the machine is not a VM. */
  hostOf(agentId: string): string | null {
    return this.db.vmMachine(agentId)?.hostId ?? null;
  }

  /** The control session that speaks for a machine: its own, or its host's for a VM; and what to add to messages for it. */
  private route(agentId: string): { s: ControlSession; extra: { machineId?: string } } | null {
    const own = this.sessions.get(agentId);
    if (own) return { s: own, extra: {} };
    const host = this.hostOf(agentId);
    const s = host ? this.sessions.get(host) : undefined;
    return s ? { s, extra: { machineId: agentId } } : null;
  }

  /** Sends a group cut message to a connected agent (a VM's through its host); false when it is not connected. */
  sendGroup(agentId: string, m: GroupServerMessage): boolean {
    const r = this.route(agentId);
    if (!r) return false;
    r.s.send({ ...m, ...r.extra });
    return true;
  }

  /** Calls fn with every protection event an agent forwards from now on, until the returned function is called. */
  watchEvents(fn: (agentId: string, e: AgentEvent) => void): () => void {
    this.eventWatchers.add(fn);
    return () => { this.eventWatchers.delete(fn); };
  }

  emitEvent(agentId: string, e: AgentEvent): void {
    for (const fn of [...this.eventWatchers]) {
      try { fn(agentId, e); } catch (err) { this.log.error('event watcher failed', { error: (err as Error).message }); }
    }
  }

  attach(ws: WebSocket, agentId: string, peer: string, certFingerprint: string): void {
    new ControlSession(this, agentId, ws, this.log.child({ peer }), certFingerprint);
  }

  /** Whether the agent that acts for the machine (its own, or its host's for a VM) is connected. */
  connected(agentId: string): boolean { return this.route(agentId) !== null; }

  assignments(agentId: string): AssignmentsMessage {
    const row = this.db.getAgent(agentId);
    const policy = this.db.getPolicy(row?.policy ?? 'default');
    const vms: VmAssignment[] = [];
    for (const vm of this.db.listVmMachines(agentId)) {
      const disks = this.db.listDisks(vm.agentId).filter((d) => d.device.startsWith(QEMU_DEVICE_PREFIX));
      if (!disks.length) continue;
      vms.push({
        machineId: vm.agentId, name: vm.name, qmpSocket: vm.qmpSocket, guestAgentSocket: vm.guestAgentSocket,
        policy: this.db.getPolicy(this.db.getAgent(vm.agentId)?.policy ?? 'default'),
        disks: disks.map((d) => ({ diskId: d.diskId, node: d.device.slice(QEMU_DEVICE_PREFIX.length) })),
      });
    }
    return {
      type: 'assignments', agentId, policy, disks: this.db.listDisks(agentId).map((d) => ({ diskId: d.diskId, device: d.device })),
      profile: this.db.listProfileDisks(agentId).map((d) => ({ diskId: d.diskId, device: d.device })), vms,
    };
  }

  /**
   * Sends the agent its current assignments (a VM's change goes to its host, whose assignments
   * carry its VMs); false when it is not connected (it gets them when it connects).
   */
  push(agentId: string): boolean {
    const target = this.sessions.has(agentId) ? agentId : this.hostOf(agentId) ?? agentId;
    const s = this.sessions.get(target);
    if (!s) return false;
    s.send(this.assignments(target));
    return true;
  }

  /** The agent's preflight checks; with qemu, a host agent's checks of a VM (install/host-preflight.ts). */
  async preflight(agentId: string, disks: string[], qemu?: { qmpSocket: string; nodes: string[] }): Promise<PreflightReply> {
    const s = this.sessions.get(agentId);
    if (!s) throw new MobilityError('MOB_ERR_AGENT_OFFLINE', `agent ${agentId} is not connected, so its preflight checks cannot run; start it (systemctl start mobility-agent) and retry`);
    return s.preflight(disks, qemu);
  }

  /**
   * Asks the agent for a cut now. Resolves when the agent accepted it, with the time of the
   * request on the agent's clock (recovery points carry the agent's freeze time, so the point
   * that answers the request is the first one taken at or after it); onAccepted runs
   * synchronously with the reply, before any event the agent sent after it is handled.
   * An agent with no running protection refuses (MOB_ERR_NOT_PROTECTING).
   */
  async cut(agentId: string, kind: 'crash' | 'app', waitMs: number, onAccepted: (requestedAtMs: number) => void): Promise<{ requestedAtMs: number }> {
    const r = this.route(agentId);
    if (!r) {
      const host = this.hostOf(agentId);
      throw new MobilityError('MOB_ERR_AGENT_OFFLINE', `${host ? `host agent ${host} of VM ${agentId}` : `agent ${agentId}`} is not connected, so it cannot be asked for a cut; start it (systemctl start mobility-agent) and retry`);
    }
    const m = await r.s.request('cut', { kind, waitMs, ...r.extra }, CUT_REPLY_TIMEOUT_MS, (x) => { if (x.accepted === true) onAccepted(x.requestedAtMs as number); });
    if (m.accepted === true) return { requestedAtMs: m.requestedAtMs as number };
    const code = String(m.code);
    throw new MobilityError(isErrorCode(code) ? code : 'MOB_ERR_NOT_PROTECTING', `agent ${agentId}: ${String(m.message)}`);
  }

  disconnect(agentId: string, err: MobilityError): void {
    for (const s of this.all) if (s.agentId === agentId) s.fail(err);
  }

  close(): void {
    for (const s of this.all) {
      s.fail(new MobilityError('MOB_ERR_SHUTTING_DOWN', 'server is stopping'));
      s.ws.terminate();
    }
  }
}

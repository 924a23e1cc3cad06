/**
 * `mobility agent`: the Mobility service on a protected machine, run by the
 * service manager. It keeps a control connection to the server (client
 * certificate, pinned server), reports its inventory, answers preflight
 * requests, and protects exactly the disks the server assigns, under the
 * assigned policy. Assignments are pushed by the server; a change restarts
 * protection with the new disk set (state is persisted first, so nothing is
 * rescanned that need not be).
 *
 * Signals: SIGTERM/SIGINT drain and persist, then exit 0; SIGHUP reloads the
 * configuration file (log level, inventory interval, vmSockets; a changed server means
 * reconnecting) and sends the inventory at once; SIGUSR1 asks for an app-consistent cut now, SIGUSR2 for a
 * crash-consistent one (as for `mobility protect`; logged and ignored when
 * nothing is protected). The server asks for cuts the same way (`mobility cut`,
 * a `cut` control message).
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TLSSocket } from 'node:tls';
import { WebSocket } from 'ws';
import { AGENT_VERSION, ID_PATTERN } from '../constants.js';
import { MobilityError, isErrorCode, toMobilityError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { isCertificateError, normalizeFingerprint } from '../transport/tls.js';
import { loadAgentConfig, loadCredentials, type AgentConfig, type Credentials } from './config.js';
import { collectInventory, readMachineId } from './inventory.js';
import type { CutKind, Protector, ProtectEvent } from './protector.js';
import { runPreflight } from '../install/preflight.js';
import { installIdOf } from '../util/installation.js';
import { TracefsTracker, traceInstanceName } from '../source/tracker/tracefs.js';
import { GroupCutMember } from './group-member.js';
import { Profiler, type ChurnReport } from './profiler.js';
import { policyCompressMode, type AgentPolicy } from './policy.js';
import { VmProtections, type VmAssignment } from './vm-protection.js';
import { discoverVms, type InventoryVm } from '../source/qemu/vm-discovery.js';
import { runHostPreflight } from '../install/host-preflight.js';

const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 30_000;
/** A clone or a revoked agent retries slowly: an operator has to act. */
const REFUSED_RETRY_MS = 60_000;
const PROTECT_RESTART_MS = 15_000;
const DEFAULT_INVENTORY_MS = 15 * 60_000;
/** How long an on-demand cut is asked for again after lost tracking, a reconnect or a protection restart. */
const DEFAULT_CUT_WAIT_MS = 120_000;
const MAX_CUT_WAIT_MS = 3_600_000;
/** In <stateDir>/protect/<agent>/: the name of the agent's trace instance (written by the protector). */
const TRACE_INSTANCE_FILE = 'trace-instance';

type Policy = AgentPolicy;
export { policyCompressMode };

interface Assignments {
  agentId: string; policy: Policy; disks: { diskId: string; device: string }[];
  /** A host agent's VMs to protect (host mode); absent from older servers. */
  vms?: VmAssignment[];
  /** Disks to profile only (capacity planning: track and report churn, ship nothing); absent from older servers. */
  profile?: { diskId: string; device: string }[];
}

/** Churn reports kept while the control connection is down (a day of 10 s intervals of one machine); the oldest go first. */
const MAX_QUEUED_CHURN = 8640;

export class AgentDaemon {
  private cfg!: AgentConfig;
  private creds!: Credentials;
  private log: Logger;
  private logReady = false;
  private ws: WebSocket | null = null;
  private stopping = false;
  private protector: Protector | null = null;
  private protectorDone: Promise<void> | null = null;
  private applied = '';
  private desired: Assignments | null = null;
  private applying: Promise<void> = Promise.resolve();
  private invTimer: NodeJS.Timeout | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private wakeReconnect: (() => void) | null = null;
  private machineId = '';
  private status: { connected: boolean; disks: string[] } = { connected: false, disks: [] };
  /** An on-demand cut not answered yet by a point (or a failure): asked for again when protection could have dropped it. */
  private wantedCut: { kind: CutKind; until: number } | null = null;
  /** Group cuts this machine takes part in, by group point (see group-member.ts). */
  private readonly groupCuts = new Map<string, GroupCutMember>();
  private profiler: Profiler | null = null;
  private profilerDone: Promise<void> | null = null;
  private profiled = '';
  /** Host mode: the protection of this host's VMs (created once the configuration is loaded). */
  private vms: VmProtections | null = null;
  /** Host mode: the last probe of each VM socket (reported again while a protection holds the socket). */
  private lastProbes = new Map<string, InventoryVm>();
  /** Churn reports not sent yet (the control connection was down). */
  private churnQueue: { type: 'churn'; atMs: number; disks: ChurnReport[] }[] = [];

  constructor(private readonly configFile: string, private readonly opts: { pidFile?: string; json?: boolean } = {}) {
    this.log = createLogger({ component: 'agent', json: opts.json });
  }

  private async load(): Promise<void> {
    this.cfg = await loadAgentConfig(this.configFile);
    this.creds = await loadCredentials(this.cfg.stateDir);
    this.machineId = await readMachineId(this.cfg.machineIdFile);
    // one logger for the life of the process (the running protector holds a child of it); a reload
    // changes its level; a new logFile takes effect at the next start
    if (!this.logReady) {
      this.log = createLogger({ component: 'agent', json: this.opts.json, file: this.cfg.logFile, level: this.cfg.logLevel });
      this.logReady = true;
    } else {
      this.log.level = this.cfg.logLevel ?? process.env.MOBILITY_LOG_LEVEL ?? 'info';
    }
  }

  async run(): Promise<void> {
    await this.load();
    if (this.opts.pidFile) await fsp.writeFile(this.opts.pidFile, `${process.pid}\n`, { mode: 0o644 });
    this.log.info('agent starting', { agent: this.creds.identity.agentId, server: this.cfg.server, version: AGENT_VERSION, pid: process.pid });
    const stop = (sig: string) => { this.log.info('stopping', { signal: sig }); void this.stop(); };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
    process.on('SIGHUP', () => { void this.reload(); });
    process.on('SIGUSR1', () => { this.requestCut('app', 'SIGUSR1'); });
    process.on('SIGUSR2', () => { this.requestCut('crash', 'SIGUSR2'); });
    this.vms = this.newVmProtections();
    try {
      await this.controlLoop();
    } finally {
      await this.vms.stop();
      await this.stopProtector();
      await this.stopProfiler();
      if (this.invTimer) clearInterval(this.invTimer);
      if (this.opts.pidFile) await fsp.rm(this.opts.pidFile, { force: true });
      this.log.info('agent stopped', { agent: this.creds.identity.agentId });
      await new Promise<void>((r) => { this.log.on('finish', r); this.log.end(); setTimeout(r, 500).unref(); });
    }
  }

  /** The VM protections of a host agent: each VM's protector runs as the VM's machine, with this host's credentials. */
  private newVmProtections(): VmProtections {
    return new VmProtections({
      connection: () => {
        const u = new URL(this.cfg.server);
        u.pathname = '/v1/replicate';
        return { serverUrl: u.toString(), token: '', ca: this.creds.ca, pin: this.creds.identity.serverFingerprint, cert: this.creds.cert, key: this.creds.key };
      },
      stateDir: () => path.join(this.cfg.stateDir, 'protect'),
      hooksDir: () => this.cfg.hooksDir,
      log: this.log,
      send: (m) => this.send(m),
      create: async (o) => {
        const { Protector } = await import('./protector.js');
        return new Protector(o);
      },
    });
  }

  async stop(): Promise<void> {
    this.stopping = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.wakeReconnect?.();
    this.ws?.close(1000, 'agent stopping');
    this.protector?.stop();
    this.profiler?.stop();
  }

  private async reload(): Promise<void> {
    const before = this.cfg;
    try {
      await this.load();
    } catch (err) {
      this.log.error('reload failed; keeping the running configuration', { code: toMobilityError(err).code, error: (err as Error).message });
      this.cfg = before;
      return;
    }
    this.log.info('configuration reloaded', { file: this.configFile });
    if (before.server !== this.cfg.server) this.ws?.close(1000, 'server changed');
    this.scheduleInventory();
    // a reload also reports the inventory now: a host's new VMs can be enabled without waiting
    void this.sendInventory();
  }

  private scheduleInventory(): void {
    if (this.invTimer) clearInterval(this.invTimer);
    this.invTimer = setInterval(() => void this.sendInventory(), this.cfg.inventoryIntervalMs ?? DEFAULT_INVENTORY_MS);
    this.invTimer.unref();
  }

  private async sendInventory(): Promise<void> {
    try {
      const [inventory, vms] = await Promise.all([collectInventory({ machineIdFile: this.cfg.machineIdFile }), this.collectVms()]);
      this.send({ type: 'inventory', inventory: vms ? { ...inventory, vms } : inventory });
    } catch (err) {
      this.log.warn('inventory failed', { error: (err as Error).message });
    }
  }

  /**
   * Host mode: the VMs behind vmSockets (null when this is not a host agent). A socket a VM's
   * protection holds is reported from its last probe (QEMU serves one client per monitor).
   */
  private async collectVms(): Promise<InventoryVm[] | null> {
    if (!this.cfg.vmSockets) return null;
    try {
      const vms = await discoverVms(this.cfg.vmSockets, this.creds.identity.agentId, { held: this.vms?.heldSockets(), previous: this.lastProbes });
      for (const v of vms) if (!v.error && !v.probedAt) this.lastProbes.set(v.qmpSocket, { ...v, probedAt: new Date().toISOString() });
      return vms;
    } catch (err) {
      this.log.warn('VM discovery failed', { vmSockets: this.cfg.vmSockets, code: toMobilityError(err).code, error: (err as Error).message });
      return [];
    }
  }

  private send(m: object): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(m));
  }

  private async controlLoop(): Promise<void> {
    let backoff = RECONNECT_MIN_MS;
    while (!this.stopping) {
      let wait = backoff;
      try {
        await this.controlSession(() => { backoff = RECONNECT_MIN_MS; });
        backoff = RECONNECT_MIN_MS;
      } catch (err) {
        const e = toMobilityError(err);
        if (e.code === 'MOB_ERR_CLONE' || e.code === 'MOB_ERR_NOT_REGISTERED' || e.code === 'MOB_ERR_AUTH') {
          // never replicate as someone else
          this.log.error('the server refused this agent; protection stopped until an operator acts', { code: e.code, error: e.message });
          // stop, but keep the tracking state: only the server's assignments remove it
          await this.applying;
          await this.stopProtector();
          await this.stopProfiler();
          // a host's VMs too: their protectors use this agent's certificate
          await this.vms?.pause();
          this.applied = '';
          this.profiled = '';
          wait = REFUSED_RETRY_MS;
        } else if (!this.stopping) {
          this.log.warn('control connection lost', { code: e.code, error: e.message, retryInMs: backoff });
        }
        backoff = Math.min(RECONNECT_MAX_MS, backoff * 2);
      }
      this.status.connected = false;
      if (this.stopping) break;
      await new Promise<void>((r) => { this.wakeReconnect = r; this.retryTimer = setTimeout(r, wait); });
    }
  }

  private controlSession(onWelcome: () => void): Promise<void> {
    const u = new URL(this.cfg.server);
    u.pathname = '/v1/control';
    const pin = normalizeFingerprint(this.creds.identity.serverFingerprint);
    return new Promise<void>((resolve, reject) => {
      const ws = new WebSocket(u.toString(), { ca: this.creds.ca, cert: this.creds.cert, key: this.creds.key, handshakeTimeout: 10_000, perMessageDeflate: false });
      this.ws = ws;
      let refused: MobilityError | null = null;
      let alive = true;
      const ping = setInterval(() => {
        if (!alive) { ws.terminate(); return; }
        alive = false;
        ws.ping();
      }, 20_000);
      ws.on('pong', () => { alive = true; });
      ws.on('ping', () => { alive = true; });
      ws.on('upgrade', (res) => {
        const fp = (res.socket as TLSSocket).getPeerCertificate?.()?.fingerprint256 ?? '';
        if (fp !== pin) {
          refused = new MobilityError('MOB_ERR_TLS_PIN', `the server certificate ${fp} is not the one pinned at registration (${pin})`);
          ws.terminate();
        }
      });
      ws.on('open', () => {
        // installId: which installation this is (an agent registered before the server recorded it gets it recorded now)
        this.send({ type: 'hello', machineId: this.machineId, hostname: os.hostname(), agentVersion: AGENT_VERSION, installId: installIdOf(this.cfg.stateDir) });
      });
      ws.on('message', (data, isBinary) => {
        alive = true;
        if (isBinary) return;
        let m: Record<string, unknown>;
        try { m = JSON.parse(String(data)) as Record<string, unknown>; } catch { return; }
        if (m.type === 'error') {
          const code = typeof m.code === 'string' && isErrorCode(m.code) ? m.code : 'MOB_ERR_INTERNAL';
          refused = new MobilityError(code, `server: ${String(m.message)}`);
          return;
        }
        if (m.type === 'assignments') {
          if (!this.status.connected) {
            this.status.connected = true;
            onWelcome();
            this.log.info('control connected', { server: this.cfg.server });
            void this.sendInventory();
            this.scheduleInventory();
            this.flushChurn();
          }
          void this.apply(m as unknown as Assignments);
          return;
        }
        if (m.type === 'preflight') {
          const q = m.qemu as { qmpSocket?: unknown; nodes?: unknown } | undefined;
          if (q && typeof q === 'object' && typeof q.qmpSocket === 'string' && Array.isArray(q.nodes)) void this.vmPreflight(String(m.id), q.qmpSocket, q.nodes.map(String));
          else void this.preflight(String(m.id), Array.isArray(m.disks) ? m.disks.map(String) : []);
          return;
        }
        if (m.type === 'cut') {
          this.onCutMessage(m);
          return;
        }
        if (m.type === 'group-prepare') {
          this.onGroupPrepare(m);
          return;
        }
        if (m.type === 'group-freeze' || m.type === 'group-commit' || m.type === 'group-abort') {
          this.groupCuts.get(groupKey(m))?.onMessage(m);
        }
      });
      ws.on('error', (err) => {
        refused ??= isCertificateError(err)
          ? new MobilityError('MOB_ERR_TLS_PIN', `server certificate refused: ${err.message}`)
          : new MobilityError('MOB_ERR_UNREACHABLE', `control connection to ${u.host} failed: ${err.message}`);
      });
      ws.on('close', (code) => {
        clearInterval(ping);
        this.ws = null;
        // no commit can come over this connection any more: a frozen group cut thaws now
        for (const g of [...this.groupCuts.values()]) g.connectionLost();
        if (refused) reject(refused);
        else if (this.stopping || code === 1000) resolve();
        else reject(new MobilityError('MOB_ERR_UNREACHABLE', `control connection closed (${code})`));
      });
    });
  }

  /** Host mode: the checks before a VM is protected: the host's own (no tracefs) and QEMU's (install/host-preflight.ts). */
  private async vmPreflight(id: string, qmpSocket: string, nodes: string[]): Promise<void> {
    const failed = (err: Error) => [{ id: 'preflight', ok: false, code: 'MOB_ERR_INTERNAL' as const, message: err.message, ms: 0 }];
    // where the protections' views will live (created by the first protection otherwise)
    await fsp.mkdir(path.join(this.cfg.stateDir, 'protect'), { recursive: true, mode: 0o700 }).catch(() => undefined);
    const [host, qemu] = await Promise.all([
      runPreflight({ serverUrl: this.cfg.server, stateDir: this.cfg.stateDir, disks: [], only: ['root', 'os', 'disk-space', 'server-port', 'clock'] }).catch(failed),
      // the point views live under the protections' state directory, not next to the QMP socket
      runHostPreflight({ qmpSocket, nodes, runDir: path.join(this.cfg.stateDir, 'protect') }).catch(failed),
    ]);
    const checks = [...host, ...qemu];
    this.log.info('preflight of a VM', { id, qmpSocket, nodes, ok: checks.every((c) => c.ok), failed: checks.filter((c) => !c.ok).map((c) => c.code) });
    this.send({ type: 'preflight-result', id, checks });
  }

  private async preflight(id: string, disks: string[]): Promise<void> {
    const checks = await runPreflight({
      serverUrl: this.cfg.server, stateDir: this.cfg.stateDir, disks, tracefsRoot: this.cfg.tracefsRoot,
      only: ['root', 'os', 'disk-space', 'tracefs', 'server-port', 'clock', ...disks.map((d) => `disk:${d}`)],
    })
      .catch((err: Error) => [{ id: 'preflight', ok: false, code: 'MOB_ERR_INTERNAL' as const, message: err.message, ms: 0 }]);
    this.log.info('preflight', { id, ok: checks.every((c) => c.ok), failed: checks.filter((c) => !c.ok).map((c) => c.code) });
    this.send({ type: 'preflight-result', id, checks });
  }

  /**
   * An on-demand cut: SIGUSR1/SIGUSR2, or the server (`mobility cut`). False, and logged, when no
   * protection is running (nothing assigned, or protection is restarting after a failure).
   */
  private requestCut(kind: CutKind, source: string, waitMs = DEFAULT_CUT_WAIT_MS): boolean {
    const p = this.protector;
    if (!p) {
      this.log.warn('cut requested, but no protection is running', { kind, source, assignedDisks: this.desired?.disks.map((d) => d.diskId) ?? [] });
      return false;
    }
    const w = this.wantedCut && Date.now() < this.wantedCut.until ? this.wantedCut : null;
    this.wantedCut = { kind: w?.kind === 'app' ? 'app' : kind, until: Math.max(w?.until ?? 0, Date.now() + waitMs) };
    this.log.info('cut requested', { kind, source });
    p.requestCut(kind);
    return true;
  }

  /** {type: 'cut', id, kind, waitMs}: answered at once with cut-reply; the point reaches the server on the replication session. */
  private onCutMessage(m: Record<string, unknown>): void {
    const id = String(m.id);
    if (m.kind !== 'app' && m.kind !== 'crash') {
      this.send({ type: 'cut-reply', id, accepted: false, code: 'MOB_ERR_USAGE', message: `unknown cut kind ${JSON.stringify(m.kind)}` });
      return;
    }
    const waitMs = typeof m.waitMs === 'number' && m.waitMs > 0 ? Math.min(m.waitMs, MAX_CUT_WAIT_MS) : DEFAULT_CUT_WAIT_MS;
    // taken before the protector hears of it: every cut that freezes after this answers the request
    const requestedAtMs = Date.now();
    if (typeof m.machineId === 'string' && m.machineId !== this.creds.identity.agentId) {
      // a cut of one of this host's VMs
      const r = this.vms?.requestCut(m.machineId, m.kind, waitMs) ?? 'unknown';
      this.log.info('cut of a VM requested', { machine: m.machineId, kind: m.kind, running: r });
      if (r === true) this.send({ type: 'cut-reply', id, accepted: true, requestedAtMs });
      else {
        this.send({
          type: 'cut-reply', id, accepted: false, code: 'MOB_ERR_NOT_PROTECTING',
          message: r === 'unknown' ? `${m.machineId} is not a VM this host protects` : `protection of VM ${m.machineId} is not running (starting, or restarting after a failure: see the agent log); the cut is taken when it runs again`,
        });
      }
      return;
    }
    if (this.requestCut(m.kind, 'server', waitMs)) {
      this.send({ type: 'cut-reply', id, accepted: true, requestedAtMs });
    } else {
      const assigned = this.desired?.disks.length ?? 0;
      this.send({
        type: 'cut-reply', id, accepted: false, code: 'MOB_ERR_NOT_PROTECTING',
        message: assigned ? `protection of ${assigned} assigned disk(s) is not running (starting, or restarting after a failure: see the agent log)` : 'no disk is assigned to this agent',
      });
    }
  }

  /**
   * {type: 'group-prepare', point, group, kind, boundMs, convergeMs}: this machine's part in a
   * group cut. The protector takes it next (converge, report, freeze on group-freeze, report
   * ready, complete on group-commit); refused at once (group-failed) when nothing is protected.
   */
  private onGroupPrepare(m: Record<string, unknown>): void {
    const point = typeof m.point === 'string' ? m.point : '';
    const bad = !point ? 'no group point'
      : m.kind !== 'crash' && m.kind !== 'app' ? `unknown cut kind ${JSON.stringify(m.kind)}`
        : typeof m.boundMs !== 'number' || !(m.boundMs > 0) || typeof m.convergeMs !== 'number' || !(m.convergeMs > 0) ? 'boundMs and convergeMs must be positive numbers' : '';
    if (bad) {
      this.send({ type: 'group-failed', point, code: 'MOB_ERR_FRAME_MALFORMED', message: `group-prepare: ${bad}` });
      return;
    }
    const group = String(m.group ?? '');
    const key = groupKey(m);
    const vm = typeof m.machineId === 'string' && m.machineId !== this.creds.identity.agentId ? m.machineId : null;
    const member = new GroupCutMember(point, group, m.kind as CutKind, {
      boundMs: Math.min(m.boundMs as number, MAX_CUT_WAIT_MS), convergeMs: Math.min(m.convergeMs as number, MAX_CUT_WAIT_MS),
      // a VM's answers name it: the server takes them for the VM's machine
      send: (x) => this.send(vm ? { ...x, machineId: vm } : x), onSettled: () => { if (this.groupCuts.get(key) === member) this.groupCuts.delete(key); },
    });
    this.groupCuts.set(key, member);
    if (vm) {
      this.log.info('group cut of a VM requested', { group, point, machine: vm, kind: m.kind });
      try {
        if (!this.vms) throw new MobilityError('MOB_ERR_NOT_PROTECTING', `${vm} is not a VM this host protects`);
        this.vms.requestGroupCut(vm, member);
      } catch (err) {
        member.failed(toMobilityError(err));
      }
      return;
    }
    const p = this.protector;
    this.log.info('group cut requested', { group, point, kind: m.kind, boundMs: m.boundMs });
    if (!p) {
      const assigned = this.desired?.disks.length ?? 0;
      member.failed(new MobilityError('MOB_ERR_NOT_PROTECTING', assigned ? `protection of ${assigned} assigned disk(s) is not running` : 'no disk is assigned to this agent'));
      return;
    }
    p.requestGroupCut(member);
  }

  /** Serialised: protection and profiling follow the latest assignments (null = protect nothing). */
  private apply(a: Assignments | null): Promise<void> {
    this.desired = a;
    if (a && this.vms) void this.vms.apply(Array.isArray(a.vms) ? a.vms.filter(validVm) : []);
    this.applying = this.applying.then(() => this.reconcile()).catch((err) => {
      this.log.error('cannot apply assignments', { error: (err as Error).message });
    }).then(() => this.reconcileProfile()).catch((err) => {
      this.log.error('cannot apply the profiling assignments', { code: toMobilityError(err).code, error: (err as Error).message });
    });
    return this.applying;
  }

  /**
   * Profile-only disks: one Profiler for all of them (its own trace instance, under
   * <stateDir>/profile), restarted when the set changes, torn down when it is empty. A disk the
   * server also assigns for protection is protected only.
   */
  private async reconcileProfile(): Promise<void> {
    const a = this.desired;
    const protectedIds = new Set(a?.disks.map((d) => d.diskId) ?? []);
    const disks = (Array.isArray(a?.profile) ? a.profile : []).filter((d) => !protectedIds.has(d.diskId))
      .map((d) => ({ id: String(d.diskId), path: String(d.device) })).sort((x, y) => x.id.localeCompare(y.id));
    const k = JSON.stringify(disks);
    if (k === this.profiled && (this.profiler || disks.length === 0)) return;
    const had = this.profiled !== '' && this.profiled !== '[]';
    await this.stopProfiler();
    this.profiled = k;
    const agentId = this.creds.identity.agentId;
    const profileDir = path.join(this.cfg.stateDir, 'profile');
    if (!disks.length) {
      if (had || fs.existsSync(path.join(profileDir, agentId))) {
        try {
          await Profiler.remove(agentId, profileDir, this.cfg.tracefsRoot);
          this.log.info('profiling removed', { agent: agentId });
        } catch (err) {
          this.log.warn('cannot remove the profiling trace instance; the next profiling reuses it', { code: toMobilityError(err).code, error: (err as Error).message });
        }
      }
      return;
    }
    const p = new Profiler({
      agentId, disks, stateDir: profileDir, intervalMs: this.cfg.profileIntervalMs, tracefsRoot: this.cfg.tracefsRoot,
      logger: this.log.child({ component: 'profile' }),
      onReport: (reports, atMs) => this.queueChurn(reports, atMs),
    });
    this.profiler = p;
    this.log.info('profiling', { disks, intervalMs: this.cfg.profileIntervalMs });
    this.profilerDone = p.run().then(
      () => { this.log.info('profiling stopped'); },
      (err) => {
        const e = toMobilityError(err);
        this.log.error('profiling failed', { code: e.code, error: e.message, restartInMs: PROTECT_RESTART_MS });
        this.send({ type: 'event', event: { event: 'profile-failed', code: e.code, message: e.message } });
      },
    ).finally(() => {
      if (this.profiler !== p) return;
      this.profiler = null;
      this.profilerDone = null;
      if (!this.stopping) {
        const t = setTimeout(() => { if (!this.stopping && !this.profiler) { this.profiled = ''; void this.apply(this.desired); } }, PROTECT_RESTART_MS);
        t.unref();
      }
    });
  }

  private queueChurn(reports: ChurnReport[], atMs: number): void {
    this.churnQueue.push({ type: 'churn', atMs, disks: reports });
    if (this.churnQueue.length > MAX_QUEUED_CHURN) this.churnQueue.splice(0, this.churnQueue.length - MAX_QUEUED_CHURN);
    this.flushChurn();
  }

  /** Sends the queued churn reports while the control connection is up (sent ones leave the queue). */
  private flushChurn(): void {
    while (this.churnQueue.length && this.status.connected && this.ws?.readyState === WebSocket.OPEN) {
      const m = this.churnQueue.shift()!;
      // ageMs: how long ago the interval ended, so the server dates it on its own clock
      this.ws.send(JSON.stringify({ ...m, ageMs: Math.max(0, Date.now() - m.atMs) }));
    }
  }

  private async stopProfiler(): Promise<void> {
    const p = this.profiler;
    if (!p) return;
    this.profiler = null;
    p.stop();
    await this.profilerDone;
    this.profilerDone = null;
  }

  private key(a: Assignments | null): string {
    if (!a || a.disks.length === 0) return '';
    const p = a.policy;
    return JSON.stringify([a.disks.map((d) => [d.diskId, d.device]).sort(), p.crashIntervalMs, p.appIntervalMs, policyCompressMode(p), p.bandwidthBytes, p.freezeLimitMs ?? null, p.spoolBudgetBytes ?? null]);
  }

  private async reconcile(): Promise<void> {
    const a = this.desired;
    const k = this.key(a);
    if (k === this.applied && (this.protector || k === '')) return;
    const before = this.status.disks;
    await this.stopProtector();
    const now = a?.disks.map((d) => d.diskId) ?? [];
    const agentId = this.creds.identity.agentId;
    const protectDir = path.join(this.cfg.stateDir, 'protect');
    // disks no longer assigned: forget their tracking state
    for (const gone of before.filter((d) => !now.includes(d))) {
      await fsp.rm(path.join(protectDir, agentId, `${gone}.map`), { force: true });
      this.log.info('protection removed', { disk: gone });
    }
    this.applied = k;
    this.status.disks = now;
    if (!a || now.length === 0) {
      let instanceRemoved = true;
      try {
        TracefsTracker.remove(traceInstanceName(agentId, protectDir), this.cfg.tracefsRoot);
      } catch (err) {
        instanceRemoved = false;
        this.log.warn('cannot remove the trace instance; the next protection reuses it', { code: toMobilityError(err).code, error: (err as Error).message });
      }
      if (before.length) {
        const dir = path.join(protectDir, agentId);
        if (instanceRemoved) {
          await fsp.rm(dir, { recursive: true, force: true });
        } else {
          // the instance is still there: keep the file that names it (uninstall finds it there), drop the rest
          const entries = await fsp.readdir(dir).catch(() => [] as string[]);
          for (const e of entries) if (e !== TRACE_INSTANCE_FILE) await fsp.rm(path.join(dir, e), { recursive: true, force: true });
        }
      }
      return;
    }
    this.log.info('protecting', { disks: a.disks, policy: a.policy.name, compress: policyCompressMode(a.policy), freezeLimitMs: a.policy.freezeLimitMs, spoolBudgetBytes: a.policy.spoolBudgetBytes });
    const { Protector } = await import('./protector.js');
    const replicateUrl = new URL(this.cfg.server);
    replicateUrl.pathname = '/v1/replicate';
    const p = new Protector({
      serverUrl: replicateUrl.toString(), token: '', ca: this.creds.ca, pin: this.creds.identity.serverFingerprint, cert: this.creds.cert, key: this.creds.key,
      agentId, disks: a.disks.map((d) => ({ path: d.device, id: d.diskId })), stateDir: protectDir,
      compress: policyCompressMode(a.policy), maxRateBytes: a.policy.bandwidthBytes || undefined, crashIntervalMs: a.policy.crashIntervalMs,
      appIntervalMs: a.policy.appIntervalMs, hooksDir: this.cfg.hooksDir, tracefsRoot: this.cfg.tracefsRoot,
      freezeLimitMs: a.policy.freezeLimitMs, spoolBudgetBytes: a.policy.spoolBudgetBytes,
      logger: this.log.child({ component: 'protect' }),
      onEvent: (e: ProtectEvent) => this.onProtectEvent(e),
    });
    this.protector = p;
    // a cut asked for while protection restarted is asked of the new protector
    if (this.wantedCut && Date.now() < this.wantedCut.until) p.requestCut(this.wantedCut.kind);
    this.protectorDone = p.run().then(
      () => { this.log.info('protection stopped'); },
      (err) => {
        const e = toMobilityError(err);
        this.log.error('protection failed', { code: e.code, error: e.message, restartInMs: PROTECT_RESTART_MS });
        this.send({ type: 'event', event: { event: 'protect-failed', code: e.code, message: e.message } });
      },
    ).finally(() => {
      if (this.protector !== p) return;
      this.protector = null;
      this.protectorDone = null;
      // a failed run is retried with the same assignments (unless they changed or we stop)
      if (!this.stopping) {
        const t = setTimeout(() => { if (!this.stopping && !this.protector) void this.apply(this.desired); }, PROTECT_RESTART_MS);
        t.unref();
      }
    });
  }

  private onProtectEvent(e: ProtectEvent): void {
    if (e.event === 'state' || e.event === 'pass-done' || e.event === 'cut' || e.event === 'cut-failed' || e.event === 'pass') this.send({ type: 'event', event: e });
    // a group cut is the group's: it neither answers nor cancels a cut asked of this machine
    if ((e.event === 'cut' || e.event === 'cut-failed') && e.groupPoint) return;
    const w = this.wantedCut;
    if (!w) return;
    if (Date.now() > w.until) {
      this.wantedCut = null;
    } else if (e.event === 'cut-failed' || (e.event === 'cut' && (e.kind === 'app' || w.kind === 'crash' || /pre-freeze hook failed/.test(e.note)))) {
      this.wantedCut = null;
    } else if ((e.event === 'state' && e.state === 'continuous') || e.event === 'connected') {
      // the protector drops a requested cut when tracking is lost or the session ends while it converges
      this.protector?.requestCut(w.kind);
    }
  }

  private async stopProtector(): Promise<void> {
    const p = this.protector;
    if (!p) return;
    this.protector = null;
    p.stop();
    await this.protectorDone;
    this.protectorDone = null;
  }
}

/** Group cut messages are the machine's: a host's VMs may take part in the same group point. */
function groupKey(m: Record<string, unknown>): string {
  return `${typeof m.machineId === 'string' ? m.machineId : ''}\0${String(m.point)}`;
}

/** A VM assignment with the fields the protection needs (a newer or broken server's others are ignored). */
function validVm(v: unknown): v is VmAssignment {
  const x = v as Partial<VmAssignment> | null;
  // ids become paths under the state directory (removed recursively when a VM goes): never '..' or '/'
  return typeof x === 'object' && x !== null && typeof x.machineId === 'string' && ID_PATTERN.test(x.machineId) && x.machineId !== '.' && x.machineId !== '..'
    && typeof x.qmpSocket === 'string' && typeof x.name === 'string'
    && typeof x.policy === 'object' && x.policy !== null && Array.isArray(x.disks) && x.disks.length > 0
    && x.disks.every((d) => typeof d?.diskId === 'string' && ID_PATTERN.test(d.diskId) && typeof d.node === 'string' && d.node !== '');
}

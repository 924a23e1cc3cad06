/**
 * Host mode: the protection of a host agent's VMs, one Protector per VM.
 *
 * Who calls: the daemon (src/agent/daemon.ts), with the `vms` of every assignments message
 * (apply, serialised here), the cuts and group cuts the server asks of a VM (routed by the
 * message's machineId), and stop() when it stops. Each VM's protector runs as its VM's machine
 * (agentId = the VM's machine id: its replication sessions, points and health are the VM's),
 * with the host's credentials and state directory, and QEMU as its tracker (qemu: the VM's QMP
 * and guest agent sockets, the protector freezing the guest through the latter for app-consistent
 * cuts; disks: its block nodes).
 *
 * Isolation: a VM's protector that fails (the VM stopped: its QMP socket is gone) is restarted
 * after a backoff (RESTART_MIN_MS doubling to RESTART_MAX_MS, back to the minimum once it
 * connected again) and never touches the others; an assignments message restarts only the VMs
 * whose assignment changed (disks, sockets, policy), starts new ones and stops (and forgets the
 * state of) those no longer assigned.
 */
import fsp from 'node:fs/promises';
import { unmountUnder } from '../source/qemu/fuse-source.js';
import { QemuTracker, qemuTrackerName } from '../source/tracker/qemu.js';
import path from 'node:path';
import { MobilityError, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { CutKind } from './cut-kind.js';
import type { GroupCutLink } from './group-member.js';
import { policyCompressMode, policyKey, type AgentPolicy } from './policy.js';
import type { ProtectEvent, ProtectOptions } from './protector.js';

export const RESTART_MIN_MS = 15_000;
export const RESTART_MAX_MS = 300_000;
/** How long an on-demand cut of a VM is asked for again when its protection restarts meanwhile. */
const CUT_WAIT_MAX_MS = 3_600_000;

/** A VM to protect, as the server assigns it (control channel `assignments`, `vms`). */
export interface VmAssignment {
  machineId: string; name: string; qmpSocket: string; guestAgentSocket: string | null; policy: AgentPolicy;
  disks: { diskId: string; node: string }[];
}

/** What this module needs of a protector (src/agent/protector.ts). */
export interface VmProtector {
  run(): Promise<void>;
  stop(): void;
  requestCut(kind: CutKind): void;
  requestGroupCut(link: GroupCutLink): void;
}

const removeQemuTracking = (o: { name: string; qmpSocket: string; disks: { node: string }[] }): Promise<void> => QemuTracker.remove(o);

export interface VmProtectionDeps {
  /** Removes a VM's tracking from QEMU for disks no longer protected (default: QemuTracker.remove); tests replace it. */
  removeTracking?: (o: { name: string; qmpSocket: string; disks: { node: string }[] }) => Promise<void>;
  /** Connection and credentials of the host (serverUrl of /v1/replicate, CA, pin, client cert and key). */
  connection(): Pick<ProtectOptions, 'serverUrl' | 'token' | 'ca' | 'pin' | 'cert' | 'key'>;
  /** The protect state directory (<stateDir>/protect): each VM keeps its state under <dir>/<machine id>/. */
  stateDir(): string;
  hooksDir(): string | undefined;
  log: Logger;
  /** Sends a control message (the host adds nothing: messages carry machineId already). */
  send(m: object): void;
  /** Builds a protector (the daemon: new Protector(o)); a seam for tests. */
  create(o: ProtectOptions): Promise<VmProtector>;
  restartMinMs?: number;
  restartMaxMs?: number;
}

interface VmRun {
  a: VmAssignment;
  key: string;
  protector: VmProtector | null;
  done: Promise<void> | null;
  timer: NodeJS.Timeout | null;
  failures: number;
  wantedCut: { kind: CutKind; until: number } | null;
  stopped: boolean;
}

function keyOf(a: VmAssignment): string {
  return JSON.stringify([a.qmpSocket, a.guestAgentSocket, a.disks.map((d) => [d.diskId, d.node]).sort(), policyKey(a.policy)]);
}

export class VmProtections {
  private readonly runs = new Map<string, VmRun>();
  private applying: Promise<void> = Promise.resolve();
  private stopping = false;
  /** How many protectors were started, per VM (tests and logs). */
  readonly starts = new Map<string, number>();

  constructor(private readonly d: VmProtectionDeps) {}

  /** The QMP sockets the running protections hold (inventory must not probe them: QEMU serves one client per monitor). */
  heldSockets(): Set<string> {
    return new Set([...this.runs.values()].filter((r) => r.protector).map((r) => r.a.qmpSocket));
  }

  /** Machine ids of the VMs assigned now. */
  assigned(): string[] { return [...this.runs.keys()]; }

  /** Whether the VM's protector is running now. */
  running(machineId: string): boolean { return Boolean(this.runs.get(machineId)?.protector); }

  /** Follows the VMs of an assignments message (serialised; resolves when applied). */
  apply(vms: VmAssignment[]): Promise<void> {
    this.applying = this.applying.then(() => this.reconcile(vms)).catch((err) => {
      this.d.log.error('cannot apply the VM assignments', { code: toMobilityError(err).code, error: (err as Error).message });
    });
    return this.applying;
  }

  private async reconcile(vms: VmAssignment[]): Promise<void> {
    if (this.stopping) return;
    const want = new Map(vms.map((v) => [v.machineId, v]));
    for (const [id, run] of [...this.runs]) {
      const next = want.get(id);
      if (next && keyOf(next) === run.key) { run.a = next; continue; }
      await this.stopRun(run);
      this.runs.delete(id);
      // disks no longer protected: QEMU stops recording their writes (bitmaps go, in the image too)
      const kept = new Set(next && next.qmpSocket === run.a.qmpSocket ? next.disks.map((x) => x.node) : []);
      const dropped = run.a.disks.filter((x) => !kept.has(x.node));
      if (dropped.length) {
        await (this.d.removeTracking ?? removeQemuTracking)({ name: qemuTrackerName(id, this.d.stateDir()), qmpSocket: run.a.qmpSocket, disks: dropped.map((x) => ({ node: x.node })) })
          .catch((err: Error) => this.d.log.warn('cannot remove the dirty bitmaps of disks no longer protected (QEMU keeps recording them until it is told)', { machine: id, error: err.message }));
      }
      if (!next) {
        // no longer protected: its tracking state goes (the server removes the replica on disable)
        const dir = path.join(this.d.stateDir(), id);
        // a dead export of a killed QEMU would keep it busy; one VM's leftovers never block the others
        unmountUnder(dir);
        await fsp.rm(dir, { recursive: true, force: true }).catch((err: Error) => this.d.log.warn('cannot remove the state of a VM no longer protected', { machine: id, error: err.message }));
        this.d.log.info('protection of a VM removed', { vm: run.a.name, machine: id });
      }
    }
    for (const [id, a] of want) {
      if (this.runs.has(id)) continue;
      const run: VmRun = { a, key: keyOf(a), protector: null, done: null, timer: null, failures: 0, wantedCut: null, stopped: false };
      this.runs.set(id, run);
      await this.start(run);
    }
  }

  private async start(run: VmRun): Promise<void> {
    if (run.stopped || this.stopping) return;
    const a = run.a;
    const log = this.d.log.child({ component: 'protect', vm: a.name, machine: a.machineId });
    log.info('protecting a VM', { disks: a.disks, qmpSocket: a.qmpSocket, guestAgentSocket: a.guestAgentSocket, policy: a.policy.name });
    let p: VmProtector;
    try {
      p = await this.d.create({
        ...this.d.connection(),
        agentId: a.machineId, disks: a.disks.map((x) => ({ path: x.node, id: x.diskId })), stateDir: this.d.stateDir(),
        qemu: { qmpSocket: a.qmpSocket, ...(a.guestAgentSocket ? { guestAgentSocket: a.guestAgentSocket } : {}) },
        compress: policyCompressMode(a.policy), maxRateBytes: a.policy.bandwidthBytes || undefined, crashIntervalMs: a.policy.crashIntervalMs,
        appIntervalMs: a.policy.appIntervalMs, hooksDir: this.d.hooksDir(),
        freezeLimitMs: a.policy.freezeLimitMs, spoolBudgetBytes: a.policy.spoolBudgetBytes,
        logger: log, onEvent: (e) => this.onEvent(run, e),
      });
    } catch (err) {
      this.failed(run, err);
      return;
    }
    if (run.stopped || this.stopping) return;
    run.protector = p;
    this.starts.set(a.machineId, (this.starts.get(a.machineId) ?? 0) + 1);
    if (run.wantedCut && Date.now() < run.wantedCut.until) p.requestCut(run.wantedCut.kind);
    run.done = p.run().then(
      () => { log.info('protection of a VM stopped'); },
      (err) => { this.failed(run, err); },
    ).finally(() => {
      if (run.protector === p) { run.protector = null; run.done = null; }
    });
  }

  /** A protector that could not start or failed: reported, restarted after the backoff (unless stopped or reassigned). */
  private failed(run: VmRun, err: unknown): void {
    const e = toMobilityError(err);
    const min = this.d.restartMinMs ?? RESTART_MIN_MS;
    const wait = Math.min(min * 2 ** run.failures, this.d.restartMaxMs ?? RESTART_MAX_MS);
    run.failures++;
    this.d.log.error('protection of a VM failed', { vm: run.a.name, machine: run.a.machineId, code: e.code, error: e.message, restartInMs: wait });
    this.d.send({ type: 'event', machineId: run.a.machineId, event: { event: 'protect-failed', code: e.code, message: e.message } });
    run.protector = null;
    if (run.stopped || this.stopping) return;
    run.timer = setTimeout(() => {
      run.timer = null;
      if (!run.stopped && !this.stopping && this.runs.get(run.a.machineId) === run && !run.protector) void this.start(run);
    }, wait);
    run.timer.unref();
  }

  private onEvent(run: VmRun, e: ProtectEvent): void {
    if (e.event === 'connected') run.failures = 0;
    if (e.event === 'state' || e.event === 'pass-done' || e.event === 'cut' || e.event === 'cut-failed' || e.event === 'pass') {
      this.d.send({ type: 'event', machineId: run.a.machineId, event: e });
    }
    if ((e.event === 'cut' || e.event === 'cut-failed') && !e.groupPoint) run.wantedCut = null;
  }

  /**
   * An on-demand cut of a VM. 'unknown' when the VM is not assigned to this host, false when its
   * protection is not running now (it is asked of the next protector within waitMs).
   */
  requestCut(machineId: string, kind: CutKind, waitMs: number): boolean | 'unknown' {
    const run = this.runs.get(machineId);
    if (!run) return 'unknown';
    run.wantedCut = { kind: run.wantedCut?.kind === 'app' ? 'app' : kind, until: Date.now() + Math.min(waitMs, CUT_WAIT_MAX_MS) };
    if (!run.protector) return false;
    run.protector.requestCut(kind);
    return true;
  }

  /** A VM's part in a group cut; throws MOB_ERR_NOT_PROTECTING when its protection is not running. */
  requestGroupCut(machineId: string, link: GroupCutLink): void {
    const run = this.runs.get(machineId);
    if (!run?.protector) {
      throw new MobilityError('MOB_ERR_NOT_PROTECTING', run ? `protection of VM ${run.a.name} is not running (starting, or restarting after a failure)` : `${machineId} is not a VM this host protects`);
    }
    run.protector.requestGroupCut(link);
  }

  private async stopRun(run: VmRun): Promise<void> {
    run.stopped = true;
    if (run.timer) clearTimeout(run.timer);
    run.timer = null;
    const p = run.protector;
    if (!p) return;
    p.stop();
    await run.done;
  }

  /**
   * The server refused this host (a clone, revoked, unknown): every VM's protection stops and its
   * assignment is forgotten, while its tracking state and QEMU's bitmaps stay, so the next
   * assignments (once an operator has acted) start them again where they were. Never replicate
   * as someone else.
   */
  pause(): Promise<void> {
    this.applying = this.applying.then(async () => {
      for (const [id, run] of [...this.runs]) {
        await this.stopRun(run);
        this.runs.delete(id);
      }
    }).catch((err) => {
      this.d.log.error('cannot stop the VM protections', { code: toMobilityError(err).code, error: (err as Error).message });
    });
    return this.applying;
  }

  /** Stops every VM's protection (state kept for the next start). */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.applying;
    await Promise.all([...this.runs.values()].map((r) => this.stopRun(r)));
  }
}

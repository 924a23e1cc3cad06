/**
 * The agent's part in a group cut (server side and message flow: server/group-cut.ts,
 * docs/protocol.md "Group cuts"). The daemon makes one GroupCutMember per group-prepare and
 * routes the server's group-freeze / group-commit / group-abort to it; the protector's cut
 * calls converged() when it has converged (not frozen) and ready() once frozen with the
 * remainder spooled. Each wait is bounded on this side too: a member never stays frozen
 * waiting for a commit longer than the group's bound (or what is left of its freeze limit),
 * whatever happened to the server or the connection.
 */
import { MobilityError, isErrorCode } from '../errors.js';
import type { CutKind } from './cut-kind.js';

/** What the protector's cut sees of a group cut. */
export interface GroupCutLink {
  readonly point: string;
  readonly group: string;
  readonly kind: CutKind;
  /** Committed or aborted: nothing more to do for this group cut. */
  readonly settled: boolean;
  /** Converged, not frozen: reports it, resolves when the group freezes; rejects (MOB_ERR_GROUP_CUT) on abort or when no freeze comes in time. */
  converged(): Promise<void>;
  /** Frozen, remainder spooled: reports it, resolves on the commit; rejects on abort or when no commit comes within min(bound, maxWaitMs). */
  ready(frozenAtMs: number, maxWaitMs: number): Promise<void>;
  /** This machine cannot take its part (not continuous, freeze failed, ...): tells the server (once; nothing after an abort). */
  failed(err: MobilityError): void;
}

export interface MemberTimers { set(fn: () => void, ms: number): unknown; clear(h: unknown): void }

const realTimers: MemberTimers = {
  set: (fn, ms) => { const t = setTimeout(fn, ms); t.unref(); return t; },
  clear: (h) => clearTimeout(h as NodeJS.Timeout),
};

type State = 'converging' | 'converged' | 'freezing' | 'ready' | 'committed' | 'aborted';

export class GroupCutMember implements GroupCutLink {
  private state: State = 'converging';
  private waiter: { resolve: () => void; reject: (e: MobilityError) => void; timer: unknown } | null = null;
  private abortReason: string | null = null;
  private reported = false;

  constructor(
    readonly point: string, readonly group: string, readonly kind: CutKind,
    private readonly o: { boundMs: number; convergeMs: number; send: (m: object) => void; onSettled?: () => void; timers?: MemberTimers },
  ) {}

  private get timers(): MemberTimers { return this.o.timers ?? realTimers; }
  get settled(): boolean { return this.state === 'committed' || this.state === 'aborted'; }

  /** group-freeze, group-commit or group-abort for this point. */
  onMessage(m: Record<string, unknown>): void {
    if (m.type === 'group-abort') {
      this.abort(`the server aborted the group cut: ${String(m.reason ?? '')}`);
    } else if (m.type === 'group-freeze' && this.state === 'converged') {
      this.state = 'freezing';
      this.wake();
    } else if (m.type === 'group-commit' && this.state === 'ready') {
      this.state = 'committed';
      this.wake();
      this.o.onSettled?.();
    }
    // anything else: a duplicate or a message for a step already past; ignored
  }

  /** The control connection closed: the server cannot commit over it any more. */
  connectionLost(): void {
    if (!this.settled) this.abort('the control connection to the server closed');
  }

  converged(): Promise<void> {
    if (this.state === 'aborted') return Promise.reject(this.err());
    if (this.state !== 'converging') return Promise.reject(new MobilityError('MOB_ERR_GROUP_CUT', `group cut ${this.point}: converged twice`));
    this.state = 'converged';
    this.o.send({ type: 'group-converged', point: this.point });
    // the others may still be converging: up to the server's converge bound, then the freeze bound
    return this.wait(this.o.convergeMs + this.o.boundMs, 'no freeze from the server');
  }

  ready(frozenAtMs: number, maxWaitMs: number): Promise<void> {
    if (this.state === 'aborted') return Promise.reject(this.err());
    if (this.state !== 'freezing') return Promise.reject(new MobilityError('MOB_ERR_GROUP_CUT', `group cut ${this.point}: ready before the freeze`));
    this.state = 'ready';
    this.o.send({ type: 'group-ready', point: this.point, frozenAtMs });
    const ms = Math.max(0, Math.min(this.o.boundMs, maxWaitMs));
    return this.wait(ms, `no commit from the server within ${ms} ms of being ready (the group's bound or the rest of the freeze limit): thawed on its own`);
  }

  failed(err: MobilityError): void {
    if (this.reported || this.state === 'committed') return;
    this.reported = true;
    const wasAborted = this.state === 'aborted';
    if (!wasAborted) {
      this.o.send({ type: 'group-failed', point: this.point, code: isErrorCode(err.code) ? err.code : 'MOB_ERR_CUT', message: err.message });
      this.abort(err.message);
    }
  }

  private wait(ms: number, why: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = this.timers.set(() => {
        this.waiter = null;
        // said to the server at once: it must not commit a group point this machine has left
        // (its other members are frozen, waiting), and the operator learns why
        if (!this.reported) {
          this.reported = true;
          this.o.send({ type: 'group-failed', point: this.point, code: 'MOB_ERR_GROUP_CUT', message: why });
        }
        this.abort(why);
        reject(this.err());
      }, ms);
      this.waiter = { resolve, reject, timer };
    });
  }

  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    this.waiter = null;
    this.timers.clear(w.timer);
    w.resolve();
  }

  private abort(reason: string): void {
    if (this.settled) return;
    this.state = 'aborted';
    this.abortReason = reason;
    const w = this.waiter;
    this.waiter = null;
    if (w) {
      this.timers.clear(w.timer);
      w.reject(this.err());
    }
    this.o.onSettled?.();
  }

  private err(): MobilityError {
    return new MobilityError('MOB_ERR_GROUP_CUT', `group cut ${this.point} of group ${this.group}: ${this.abortReason ?? 'aborted'}`);
  }
}

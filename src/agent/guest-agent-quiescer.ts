/**
 * Host mode's quiescer for app-consistent points: the VM's QEMU guest agent freezes the guest's
 * own filesystems (guest-fsfreeze-freeze) and thaws them (guest-fsfreeze-thaw). The cut around
 * it is the same as in-guest: pre-freeze hooks, freeze, frozen hooks, point, thaw, post-thaw
 * hooks, the freeze bounded by the same time limit.
 *
 * Each operation opens its own short connection to the agent (the agent serves one client at a
 * time: holding it would lock out the hypervisor's own tools) and resynchronises it.
 *
 *   freeze(timeoutMs)  within timeoutMs: connect, guest-fsfreeze-status (a guest already frozen by
 *                      another client is refused, and left as it is: not ours to thaw), refresh the
 *                      list of the guest's filesystems (guest-get-fsinfo, when enabled: targets()),
 *                      then guest-fsfreeze-freeze (or guest-fsfreeze-freeze-list with the given
 *                      mount points). When the bound passes or the agent refuses, a thaw is sent
 *                      on the same connection (the agent runs it right after the freeze it is
 *                      still busy with) and freeze() rejects with MOB_ERR_GUEST_AGENT saying what
 *                      the agent answered and whether the thaw was confirmed.
 *                      So a failed freeze rejects within timeoutMs plus the thaw's bound (as a
 *                      failed fsfreeze does: freezeAll thaws with its own bound too).
 *   thaw()             after a freeze of ours: guest-fsfreeze-thaw; failures are answered, never
 *                      thrown, and the next thaw() tries again. Without a freeze of ours: nothing.
 *   releaseStale()     at start-up: a guest the agent reports `frozen` (an agent killed inside a
 *                      freeze left it so) is thawed (thawStale() also answers whether it was).
 *                      When the agent cannot be reached then, the first freeze that reaches it
 *                      and finds the guest frozen thaws it first (presumed the same stale freeze).
 *
 * The mountpoints option freezes only those mount points of the guest (freeze-list): for tests
 * and for guests where some filesystems must not be frozen; the default is the whole guest.
 */
import type { Quiescer } from './quiesce.js';
import { GuestAgentClient, guestAgentError, QGA_DEFAULTS } from '../source/qemu/guest-agent.js';
import { MobilityError } from '../errors.js';

export interface GuestAgentQuiescerOptions {
  /** The host side of the VM's guest agent channel (a unix socket). */
  socket: string;
  /** Freeze only these guest mount points (guest-fsfreeze-freeze-list); default: every filesystem of the guest. */
  mountpoints?: string[];
  /** Bound of a thaw (its own connection included); a freeze's bound is the cut's. Default 30 s, as fsfreeze -u's. */
  thawTimeoutMs?: number;
}

export interface StaleRelease { wasFrozen: boolean; thawed: number }

const THAW_TIMEOUT_MS = 30_000;

export class GuestAgentQuiescer implements Quiescer {
  /** A freeze of ours may hold the guest (set before the freeze is sent: a timed-out one may still land). */
  private mayBeFrozen = false;
  /** releaseStale() failed (agent unreachable at start-up): the first freeze that finds the guest frozen thaws it first. */
  private staleUnresolved = false;
  private known: string[] | null = null;
  private readonly thawTimeoutMs: number;

  constructor(private readonly o: GuestAgentQuiescerOptions) {
    this.thawTimeoutMs = o.thawTimeoutMs ?? THAW_TIMEOUT_MS;
  }

  /**
   * The listed mount points, else the guest's filesystems as the agent reported them at the last
   * freeze (guest-get-fsinfo: the first cut's pre-freeze hooks, before any freeze, see the agent's
   * name instead), else the agent itself.
   */
  targets(): string[] {
    if (this.o.mountpoints) return [...this.o.mountpoints];
    // the guest names these: a bounded list (hook environment, logs and events carry it)
    if (this.known && this.known.length) return capList(this.known);
    return [`guest agent ${this.o.socket}`];
  }

  async freeze(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const left = () => Math.max(1, deadline - Date.now());
    let qga: GuestAgentClient;
    try {
      qga = await GuestAgentClient.connect(this.o.socket, { timeoutMs: left(), commandTimeoutMs: left() });
    } catch (err) {
      throw this.wrap('cannot freeze the guest: ', err);
    }
    try {
      let status: string;
      try {
        status = await qga.freezeStatus({ timeoutMs: left() });
      } catch (err) {
        throw this.wrap('cannot freeze the guest: ', err);
      }
      if (status === 'frozen' && (this.staleUnresolved || this.mayBeFrozen)) {
        // ours: releaseStale() could not reach the agent at start-up, or an earlier thaw of ours was
        // not confirmed; left frozen, every app cut would refuse it and the guest would stay frozen
        try {
          await qga.thaw({ timeoutMs: left() });
        } catch (err) {
          throw this.wrap('cannot thaw the guest\'s stale freeze before freezing it: ', err);
        }
        status = 'thawed';
        this.mayBeFrozen = false;
      }
      this.staleUnresolved = false;
      if (status === 'frozen') {
        throw guestAgentError(`cannot freeze the guest through ${this.o.socket}: its agent says it is already frozen (by another client of the agent, or by an agent of ours that was killed: releaseStale() thaws that one at start-up); left as it is`);
      }
      if (!this.o.mountpoints) await this.refreshTargets(qga, left());
      this.mayBeFrozen = true;
      try {
        const n = await qga.freeze(this.o.mountpoints, { timeoutMs: left() });
        // an unknown mount point is skipped by the agent, and a guest with nothing freezable answers 0:
        // either way the point would not be what it claims
        const want = this.o.mountpoints?.length ?? 1;
        if (n < want) {
          throw guestAgentError(this.o.mountpoints
            ? `the agent froze ${n} of the ${want} listed mount points (${this.o.mountpoints.join(', ')}): a mount point it does not know is skipped`
            : 'the agent froze no filesystem (nothing freezable in the guest)');
        }
      } catch (err) {
        const why = err instanceof MobilityError ? err.message : String(err);
        // same connection: queued behind the freeze the agent may still be running
        let thawNote: string;
        try {
          const thawed = await qga.thaw({ timeoutMs: this.thawTimeoutMs });
          this.mayBeFrozen = false;
          thawNote = `thawed (${thawed} filesystem${thawed === 1 ? '' : 's'})`;
        } catch (e) {
          thawNote = `the thaw was NOT confirmed (${(e as Error).message}); the next thaw or releaseStale() retries it`;
        }
        throw guestAgentError(`the guest agent on ${this.o.socket} could not freeze the guest (bound ${timeoutMs} ms): ${why}; ${thawNote}`, { cause: err });
      }
    } finally {
      qga.close();
    }
  }

  async thaw(): Promise<string[]> {
    if (!this.mayBeFrozen) return [];
    try {
      await this.thawOnce();
      this.mayBeFrozen = false;
      return [];
    } catch (err) {
      return [`guest agent ${this.o.socket}: ${(err as Error).message}`];
    }
  }

  /** The Quiescer's start-up step: thawStale(), its report left out. Rejects with MOB_ERR_GUEST_AGENT. */
  async releaseStale(): Promise<void> {
    await this.thawStale();
  }

  /**
   * At start-up: thaws a guest its agent reports frozen (left so by an agent killed inside a
   * freeze), and says whether it was. Rejects with MOB_ERR_GUEST_AGENT when the agent cannot be
   * asked or refuses the thaw.
   */
  async thawStale(timeoutMs = this.thawTimeoutMs): Promise<StaleRelease> {
    let qga: GuestAgentClient;
    this.staleUnresolved = true;
    try {
      qga = await GuestAgentClient.connect(this.o.socket, { timeoutMs, commandTimeoutMs: timeoutMs });
    } catch (err) {
      throw this.wrap('cannot check the guest for a stale freeze (the first freeze that reaches the agent thaws it first): ', err);
    }
    try {
      const status = await qga.freezeStatus();
      if (status !== 'frozen') {
        this.staleUnresolved = false;
        return { wasFrozen: false, thawed: 0 };
      }
      const thawed = await qga.thaw();
      this.mayBeFrozen = false;
      this.staleUnresolved = false;
      return { wasFrozen: true, thawed };
    } catch (err) {
      throw this.wrap('cannot release the guest\'s stale freeze (the first freeze that reaches the agent thaws it first): ', err);
    } finally {
      qga.close();
    }
  }

  private async thawOnce(): Promise<number> {
    const qga = await GuestAgentClient.connect(this.o.socket, { timeoutMs: Math.min(this.thawTimeoutMs, QGA_DEFAULTS.connectTimeoutMs * 2), commandTimeoutMs: this.thawTimeoutMs });
    try {
      return await qga.thaw();
    } finally {
      qga.close();
    }
  }

  /** guest-get-fsinfo, when the agent has it enabled: the guest's mount points for targets(). Best effort. */
  private async refreshTargets(qga: GuestAgentClient, timeoutMs: number): Promise<void> {
    try {
      const fs = await qga.fsInfo({ timeoutMs });
      this.known = [...new Set(fs.map((f) => f.mountpoint))].sort();
    } catch {
      // disabled or missing in this agent: targets() names the agent instead; a broken
      // connection shows in the freeze that follows
    }
  }

  private wrap(prefix: string, err: unknown): MobilityError {
    const m = err instanceof Error ? err.message : String(err);
    return guestAgentError(prefix + m, { cause: err, retryable: err instanceof MobilityError ? err.retryable : true });
  }
}

/** At most 64 entries and 8 KiB in all (a guest could report thousands of long mount points). */
function capList(list: string[]): string[] {
  const out: string[] = [];
  let bytes = 0;
  for (const m of list) {
    if (out.length >= 64 || bytes + m.length + 1 > 8192) {
      out.push(`... ${list.length - out.length} more`);
      break;
    }
    out.push(m);
    bytes += m.length + 1;
  }
  return out;
}

/**
 * The quiescing seam: what a cut needs to make the writers of the protected disks stop for the
 * instant the point is taken, whatever they are.
 *
 *   - fsfreeze (FsfreezeQuiescer, below): in-guest, the filesystems mounted from the protected
 *     block devices (FIFREEZE/FITHAW), as cuts have always done;
 *   - guest agent (src/agent/guest-agent-quiescer.ts): host mode, the QEMU guest agent of a VM
 *     freezes the guest's own filesystems (guest-fsfreeze-freeze / -thaw) for app-consistent
 *     points. Crash-consistent points in host mode need no quiescing at all: QEMU starts a
 *     point-in-time view while the guest keeps writing.
 *
 * Contract: freeze() resolves once everything is frozen, or rejects with a coded MobilityError
 * (MOB_ERR_FREEZE, MOB_ERR_GUEST_AGENT) after having thawed whatever it froze; thaw() never
 * throws and answers what it could not thaw (empty when all is thawed). thaw() after a failed
 * or absent freeze is harmless. release() on start-up thaws what a killed agent left frozen.
 */
import { freezeAll, thawAll } from './freeze.js';

export interface Quiescer {
  /** What is frozen, for hooks (MOBILITY_MOUNTS), notes and logs: mount points, or the VM's guest agent. */
  targets(): string[];
  /** Freezes every target within timeoutMs, else thaws what it froze and rejects (coded). */
  freeze(timeoutMs: number): Promise<void>;
  /** Thaws every target; answers the ones it could not thaw (never throws). */
  thaw(): Promise<string[]>;
  /** At start-up: thaws what a killed agent left frozen (the guest agent's state survives the agent). */
  releaseStale?(): Promise<void>;
}

/** fsfreeze of the filesystems mounted from the protected disks (read again at every cut: mounts come and go). */
export class FsfreezeQuiescer implements Quiescer {
  private frozen: string[] = [];
  constructor(private readonly mounts: () => string[]) {}

  targets(): string[] {
    return this.mounts();
  }

  async freeze(timeoutMs: number): Promise<void> {
    const m = this.mounts();
    this.frozen = m;
    try {
      await freezeAll(m, timeoutMs);
    } catch (err) {
      // freezeAll thawed what it had frozen: nothing is left for thaw() to report
      this.frozen = [];
      throw err;
    }
  }

  async thaw(): Promise<string[]> {
    const m = this.frozen;
    this.frozen = [];
    return thawAll(m);
  }
}

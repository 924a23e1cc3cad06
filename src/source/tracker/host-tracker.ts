/**
 * The host-mode tracker seam: what host mode (an agent on a hypervisor host protecting a VM's
 * disks from outside the guest) needs from a tracker beyond the change-tracker seam: the disks'
 * data, and points (a crash-consistent view of every disk of the VM at one instant, taken
 * without stopping it, together with the extents written up to that instant).
 *
 * Implementations: QEMU (src/source/tracker/qemu.ts: dirty bitmaps, a copy-before-write view)
 * and Hyper-V (src/source/tracker/hyperv.ts: Resilient Change Tracking, a recovery checkpoint).
 */
import type { DiskSource } from '../disk-source.js';
import type { ChangeTracker, DirtyExtent, DrainJournal } from './change-tracker.js';

/**
 * crash: the disks as a power cut would leave them; application: the guest's applications were
 * told to flush first (VSS in a Windows guest, fsfreeze through the guest's integration
 * services or agent). A tracker that cannot give what is asked refuses the point.
 */
export type PointConsistency = 'crash' | 'application';

export interface HostPointOptions {
  /** Default crash. */
  consistency?: PointConsistency;
}

/** A point-in-time view of every disk of a host-mode tracker, from beginPoint(). */
export interface HostPoint {
  /** Everything written up to the point since the previous drain or point (as drain() returns it). */
  extents: DirtyExtent[];
  /** Per disk (the tracker's order), a read-only DiskSource of the disk as it was at the point. */
  sources: DiskSource[];
  /** Closes the sources and removes the view. Idempotent. Rejects with a coded error when the view could not be removed cleanly; nothing drained is lost by that. */
  end(): Promise<void>;
}

export interface HostModeTracker extends ChangeTracker {
  /**
   * 'live': openSource() reads the disks as they are now, between points (QEMU). 'points': the
   * disks can only be read inside a point (Hyper-V: the running VM holds its VHDX files), so
   * every round of shipping is a point, and openSource() refuses with a coded error.
   */
  readonly dataAccess: 'live' | 'points';
  /** A read-only DiskSource of disk i's current data; `dir` is where the tracker may put what it needs locally. */
  openSource(i: number, dir: string): Promise<DiskSource>;
  /** Takes a point: one operation both fixes the view and ends the drained interval, so the extents and the view agree. */
  beginPoint(dir: string, journal?: DrainJournal, o?: HostPointOptions): Promise<HostPoint>;
}

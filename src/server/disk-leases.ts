/**
 * One session at a time per disk: a lease names the session holding a disk's store, or
 * the promise of that store closing (a new session waits for it, so it never opens a
 * replica another store is still writing).
 */
import { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ReplicaBackend, ReplicaStore } from '../target/replica-store.js';
import type { PointBook } from './points.js';

export class DiskLeases {
  /** Disk key (agent/disk) -> the holder, or the promise of its store closing. */
  private readonly held = new Map<string, object | Promise<void>>();
  /** The open store of each leased disk, and what the stores of a disk closed so far had written (metrics). */
  private readonly stores = new Map<string, ReplicaStore>();
  private readonly writtenBefore = new Map<string, number>();

  constructor(private readonly o: { backend: ReplicaBackend; points: PointBook; log: Logger }) {}

  /** True while a session holds the disk (or its store is still closing). */
  busy(agentId: string, diskId: string): boolean {
    return this.held.has(`${agentId}/${diskId}`);
  }

  /**
   * Opens a disk's replica for a holder, or throws MOB_ERR_DISK_BUSY. With publish false a new
   * replica stays unpublished (store.publish() / store.discard()). Point data no point of the
   * catalog names (a prune or a cut cut short) is removed first.
   */
  async acquire(holder: object, agentId: string, diskId: string, sizeBytes: number, readOnly = false, publish = true): Promise<{ store: ReplicaStore; created: boolean; key: string }> {
    const key = `${agentId}/${diskId}`;
    const h = this.held.get(key);
    if (h instanceof Promise) await h;
    else if (h) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agentId} is being replicated by another session`);
    if (this.held.get(key)) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${diskId} of agent ${agentId} is being replicated by another session`);
    this.held.set(key, holder);
    try {
      const cat = await this.o.points.catalog(agentId);
      if (!readOnly) {
        const orphans = await this.o.backend.removeOrphans(agentId, diskId, cat.diskPoints(diskId));
        if (orphans.length) this.o.log.info('removed point data no recovery point names', { agent: agentId, disk: diskId, orphans });
      }
      const { store, created } = await this.o.backend.open(agentId, diskId, sizeBytes, { readOnly, publish, epoch: cat.latestFor(diskId)?.id ?? null });
      this.stores.set(key, store);
      return { store, created, key };
    } catch (err) {
      this.held.delete(key);
      throw err;
    }
  }

  /**
   * Closes the store; the disk stays leased until it is closed. With `remove` (a replica the
   * holder created and must not leave behind), the replica is then removed, still under the lease.
   */
  release(key: string, store: ReplicaStore, remove?: { agentId: string; diskId: string }): void {
    const closing: Promise<void> = store.close().catch((err) => { this.o.log.error('replica close failed', { disk: key, error: String(err) }); })
      .then(async () => {
        if (this.stores.get(key) === store) this.stores.delete(key);
        if (store.bytesWritten) this.writtenBefore.set(key, (this.writtenBefore.get(key) ?? 0) + store.bytesWritten);
        if (!remove) return;
        await this.o.backend.remove(remove.agentId, remove.diskId).then(
          () => this.o.log.info('removed a replica its refused session had created', { disk: key }),
          (err: Error) => this.o.log.error('cannot remove a replica its refused session created', { disk: key, error: err.message }),
        );
      })
      .finally(() => { if (this.held.get(key) === closing) this.held.delete(key); });
    this.held.set(key, closing);
  }

  /** Bytes written to each disk's replica (key agent/disk) by the stores opened since the server started. */
  bytesWritten(): Map<string, number> {
    const out = new Map(this.writtenBefore);
    for (const [key, store] of this.stores) if (store.bytesWritten) out.set(key, (out.get(key) ?? 0) + store.bytesWritten);
    return out;
  }

  /** Resolves when every store being closed now is closed. */
  async settled(): Promise<void> {
    await Promise.all([...this.held.values()].filter((v): v is Promise<void> => v instanceof Promise));
  }
}

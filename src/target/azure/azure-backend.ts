/**
 * ReplicaBackend (Azure page blobs): the replicas of a process server in one container of a
 * storage account.
 *
 *   replicas/<agent>/<disk>                    one page blob per disk (azure-store.ts): the
 *                                              replica, its state in metadata, one snapshot per
 *                                              recovery point
 *   test-failover/<agent>/<point>/<disk>       writable images of a point (materialize), made by
 *   failover/<agent>/<disk>                    a server-side copy of the point's snapshot
 *
 * Contract (see ../replica-store.ts for each method):
 *   - init() checks that the credentials work and creates the container when missing; an auth
 *     failure is MOB_ERR_TARGET_AUTH naming the account, the container and the credentials file;
 *   - a disk larger than a page blob can be (8 TiB) is refused by checkFits before anything is
 *     created (MOB_ERR_DISK_TOO_LARGE);
 *   - open() creates a blob of the disk's size rounded up to 512 B (state in its metadata), grows
 *     it when the source grew, refuses a smaller source (MOB_ERR_DISK_SIZE_CHANGED), a read-only
 *     open of a missing disk (MOB_ERR_UNKNOWN_DISK, nothing created) and a blob without Mobility
 *     metadata (MOB_ERR_STATE_CORRUPT). A blob still marked pending (an unpublished creation that
 *     was never discarded, e.g. after a crash) is treated as absent: invisible to agents(),
 *     disks() and stat(), and overwritten as new by the next open;
 *   - points are blob snapshots (PointRef { snapshot }), complete by themselves: `epoch` and the
 *     `epochs` callback of materialize are not needed and never called;
 *   - every call goes through one RetryingPageBlobOps (page-client.ts): retry and the coded
 *     target errors live in that layer only;
 *   - `stats` counts requests per operation, bytes up and down and retries (for API calls per GiB);
 *   - nothing here ever shows a secret: `location` and image locations are URLs without query.
 *
 * Why page blobs: random 512-byte-aligned writes of up to 4 MiB, sparse storage, Clear Pages for
 * zero ranges, and snapshots that are cheap and complete (no undo journal needed for points).
 */
import { ID_PATTERN } from '../../constants.js';
import { MobilityError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type {
  DiskPoint, ImagePurpose, ImageReader, OpenOptions, PointImage, PointRef, ProgressFn, ReplicaBackend, ReplicaStat, ReplicaStore,
} from '../replica-store.js';
import type { RetryPolicy } from '../retry.js';
import { blobPageDigests, copyBlobByPages, downloadBlobToFile, roundUpSector } from './blob-io.js';
import { AzureReplicaStore, decodeState, encodeState, newReplicaState, type AzureReplicaState } from './azure-store.js';
import type { AzureCredentials } from './credentials.js';
import {
  CopyFailedError, MAX_PAGE_BLOB_BYTES, RetryingPageBlobOps, TargetAnswerError, SdkPageBlobOps, cleanAccountUrl, newOpStats, totalCalls,
  type AzureOpStats, type BlobInfo, type BlobRef, type PageBlobOps,
} from './page-client.js';

export interface AzureBackendOptions {
  /** e.g. https://ACCOUNT.blob.core.windows.net (a query string, if any, is ignored). */
  accountUrl: string;
  container: string;
  credentials: AzureCredentials;
  retry?: Partial<RetryPolicy>;
  log?: Logger;
  /** Client-side bound of one request (default 60 s). */
  tryTimeoutMs?: number;
  /** The operations to use instead of the SDK's (tests wrap the real ones to inject faults). */
  ops?: (inner: PageBlobOps) => PageBlobOps;
}

const REPLICAS = 'replicas/';
/** How long stat() reuses a disk's count of stored bytes. */
const STORED_BYTES_TTL_MS = 60_000;
const CONTAINER_NAME = /^(?!-)(?!.*--)[a-z0-9-]{3,63}(?<!-)$/;

function replicaBlob(agentId: string, diskId: string): string {
  return `${REPLICAS}${agentId}/${diskId}`;
}

function imageBlob(purpose: ImagePurpose, agentId: string, pointId: string, diskId: string): string {
  return purpose === 'test-failover' ? `test-failover/${agentId}/${pointId}/${diskId}` : `failover/${agentId}/${diskId}`;
}

function checkId(kind: string, id: string): void {
  if (typeof id !== 'string' || !ID_PATTERN.test(id)) {
    throw new MobilityError('MOB_ERR_BAD_DISK_ID', `${kind} id ${JSON.stringify(id)} must be 1-64 characters of [A-Za-z0-9._-]`);
  }
}

export class AzureBackend implements ReplicaBackend {
  readonly kind = 'azure';
  readonly location: string;
  readonly container: string;
  /** Requests per operation, bytes up and down, retries: shared by every store of this backend. */
  readonly stats: AzureOpStats = newOpStats();
  private readonly ops: RetryingPageBlobOps;
  private readonly bestEffort: RetryingPageBlobOps;
  private readonly log?: Logger;
  private readonly credentials: AzureCredentials;
  /** storedBytes per replica blob, with when it was counted (see stat). */
  private readonly storedCache = new Map<string, { at: number; bytes: number }>();
  private readonly counting = new Set<string>();

  constructor(o: { accountUrl: string; container: string; credentials: AzureCredentials; retry?: Partial<RetryPolicy>; log?: Logger } & Partial<AzureBackendOptions>) {
    const accountUrl = cleanAccountUrl(o.accountUrl);
    this.container = o.container;
    this.location = `${accountUrl}/${o.container}`;
    this.log = o.log;
    this.credentials = o.credentials;
    const sdk: PageBlobOps = new SdkPageBlobOps({ accountUrl, container: o.container, credentials: o.credentials, tryTimeoutMs: o.tryTimeoutMs, stats: this.stats });
    const inner = o.ops ? o.ops(sdk) : sdk;
    this.ops = new RetryingPageBlobOps(inner, {
      policy: o.retry, stats: this.stats, log: o.log, target: this.location,
      authFix: `fix the credentials file (${o.credentials.source}): an account key or a SAS token of account ${o.credentials.accountName ?? '(named by the URL)'} allowing read, write, create, delete and list in container ${o.container}`,
    });
    this.bestEffort = this.ops.withPolicy({ maxAttempts: 1 });
  }

  /** The retrying operations every call of this backend goes through (tests inspect blobs with it). */
  get blobOps(): PageBlobOps { return this.ops; }

  /** Requests sent so far (all operations, every try). */
  get apiCalls(): number { return totalCalls(this.stats); }

  async init(): Promise<void> {
    if (!CONTAINER_NAME.test(this.container)) {
      throw new MobilityError('MOB_ERR_CONFIG', `Azure container name ${JSON.stringify(this.container)} is invalid: 3-63 lowercase letters, digits and single hyphens`);
    }
    try {
      const created = await this.ops.ensureContainer();
      this.log?.info('azure replica target ready', { location: this.location, createdContainer: created, credentials: this.credentials.describe() });
    } catch (err) {
      if (err instanceof MobilityError && err.code === 'MOB_ERR_TARGET_AUTH') {
        throw new MobilityError('MOB_ERR_TARGET_AUTH',
          `Azure storage account ${this.credentials.accountName ?? this.location} refused the server's credentials for container ${this.container} (${this.location}): ${err.message.replace(/^.*?refused the credentials /, '')}`);
      }
      throw err;
    }
  }

  async checkFits(agentId: string, diskId: string, sizeBytes: number): Promise<void> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `disk ${diskId} of agent ${agentId}: size ${sizeBytes} is not a positive number of bytes`);
    }
    if (roundUpSector(sizeBytes) > MAX_PAGE_BLOB_BYTES) {
      throw new MobilityError('MOB_ERR_DISK_TOO_LARGE',
        `disk ${diskId} of agent ${agentId} is ${sizeBytes} bytes; an Azure page blob holds at most ${MAX_PAGE_BLOB_BYTES} bytes (8 TiB); nothing was created`);
    }
  }

  private ctx(name: string) {
    return {
      ops: this.ops as PageBlobOps, bestEffortOps: this.bestEffort as PageBlobOps, blobName: name, log: this.log,
    };
  }

  async open(agentId: string, diskId: string, sizeBytes: number, opts: OpenOptions = {}): Promise<{ store: ReplicaStore; created: boolean }> {
    await this.checkFits(agentId, diskId, sizeBytes);
    const name = replicaBlob(agentId, diskId);
    const props = await this.ops.properties({ name });
    let state: AzureReplicaState | null = null;
    if (props) {
      state = decodeState(props.metadata, `${this.location}/${name}`);
      if (!state) {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `blob ${this.location}/${name} exists but carries no Mobility replica state; refusing to overwrite it (delete the blob to start over)`);
      }
      if (state.agentId !== agentId || state.diskId !== diskId) {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `blob ${this.location}/${name} records agent ${state.agentId} disk ${state.diskId}; refusing to use it (delete the blob to start over)`);
      }
      if (!state.pending && props.sizeBytes < roundUpSector(state.sizeBytes)) {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `blob ${this.location}/${name} is ${props.sizeBytes} bytes but its metadata records a ${state.sizeBytes}-byte disk (remove the replica to start over)`);
      }
      if (state.pending) state = null; // an unpublished creation nobody finished: new
    }
    if (!state && opts.readOnly) {
      throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${diskId} of agent ${agentId} has no replica on this server`);
    }
    if (!state) {
      const fresh = newReplicaState(agentId, diskId, sizeBytes, opts.publish === false);
      if (props) await this.ops.delete({ name }, true); // a stale pending blob (and any snapshot of it)
      await this.ops.create(name, roundUpSector(sizeBytes), encodeState(fresh));
      this.log?.info('azure replica created', { agent: agentId, disk: diskId, sizeBytes, blob: name, published: !fresh.pending });
      return { store: new AzureReplicaStore(this.ctx(name), fresh, false, true), created: true };
    }
    if (!opts.readOnly && sizeBytes < state.sizeBytes) {
      throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED',
        `source disk ${diskId} is ${sizeBytes} bytes but its replica is ${state.sizeBytes}; shrinking a protected disk is not supported (remove the replica blob ${name} to start over)`);
    }
    if (!opts.readOnly && sizeBytes > state.sizeBytes) {
      if (props!.sizeBytes < roundUpSector(sizeBytes)) await this.ops.resize(name, roundUpSector(sizeBytes));
      state.sizeBytes = sizeBytes;
      state.updatedAt = new Date().toISOString();
      await this.ops.setMetadata(name, encodeState(state));
      this.log?.info('azure replica grown', { agent: agentId, disk: diskId, sizeBytes, blob: name });
    }
    return { store: new AzureReplicaStore(this.ctx(name), state, opts.readOnly ?? false), created: false };
  }

  /** Published replicas under replicas/ (pending ones and snapshots left out). */
  private async replicaBlobs(prefix: string): Promise<{ agentId: string; diskId: string; info: BlobInfo }[]> {
    const out: { agentId: string; diskId: string; info: BlobInfo }[] = [];
    for (const b of await this.ops.list(prefix)) {
      const parts = b.name.slice(REPLICAS.length).split('/');
      if (parts.length !== 2 || b.snapshot) continue;
      if (b.metadata.mobversion === undefined || b.metadata.pending === '1') continue;
      out.push({ agentId: parts[0], diskId: parts[1], info: b });
    }
    return out;
  }

  async agents(): Promise<string[]> {
    return [...new Set((await this.replicaBlobs(REPLICAS)).map((r) => r.agentId))].sort();
  }

  async disks(agentId: string): Promise<string[]> {
    checkId('agent', agentId);
    return (await this.replicaBlobs(`${REPLICAS}${agentId}/`)).map((r) => r.diskId).sort();
  }

  /** Snapshots of a blob (exact name), oldest first. */
  private async snapshotsOf(name: string): Promise<BlobInfo[]> {
    return (await this.ops.list(name, { snapshots: true })).filter((b) => b.name === name && b.snapshot).sort((a, b) => (a.snapshot! < b.snapshot! ? -1 : 1));
  }

  /**
   * What the metadata records. storedBytes is a background count (null until the first one ends,
   * then up to a minute old) and approximate: the valid page ranges of the blob plus
   * those of each of its snapshots, counted in full although Azure bills a snapshot only for the
   * pages that differ from the base blob (an over-estimate, never an under-estimate).
   */
  async stat(agentId: string, diskId: string): Promise<ReplicaStat | null> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    const name = replicaBlob(agentId, diskId);
    const props = await this.ops.properties({ name });
    if (!props) return null;
    const st = decodeState(props.metadata, `${this.location}/${name}`);
    if (!st || st.pending) return null;
    // counting the pages of the blob and of every snapshot costs a request each (hundreds with a
    // day of points): status polls stat, so the count runs in the background at most once a
    // minute per disk and stat answers with the last count (null until the first one is done)
    const cached = this.storedCache.get(name);
    if (!cached || Date.now() - cached.at >= STORED_BYTES_TTL_MS) this.recount(name);
    const storedBytes = cached?.bytes ?? null;
    return {
      agentId, diskId, sizeBytes: st.sizeBytes, generation: st.generation, initialComplete: st.initialComplete,
      lastDurableSeq: st.lastDurableSeq, storedBytes, updatedAt: st.updatedAt,
    };
  }

  /** Counts the stored pages of a replica blob and its snapshots into storedCache (one count per blob at a time). */
  private recount(name: string): void {
    if (this.counting.has(name)) return;
    this.counting.add(name);
    void (async () => {
      let bytes = 0;
      const refs: BlobRef[] = [{ name }, ...(await this.snapshotsOf(name)).map((s) => ({ name, snapshot: s.snapshot }))];
      for (const ref of refs) for (const r of await this.ops.pageRanges(ref)) bytes += r.end - r.start;
      this.storedCache.set(name, { at: Date.now(), bytes });
    })().catch((err: Error) => this.log?.warn('cannot count the stored pages of a replica', { blob: name, error: err.message }))
      .finally(() => this.counting.delete(name));
  }

  async remove(agentId: string, diskId: string): Promise<void> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    const name = replicaBlob(agentId, diskId);
    await this.ops.delete({ name }, true);
    this.storedCache.delete(name);
    this.log?.info('azure replica removed', { agent: agentId, disk: diskId, blob: name });
  }

  async prunePoint(agentId: string, diskId: string, point: DiskPoint): Promise<void> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    const snapshot = point.ref?.snapshot;
    if (!snapshot) return;
    await this.ops.delete({ name: replicaBlob(agentId, diskId), snapshot });
  }

  async removeOrphans(agentId: string, diskId: string, keep: DiskPoint[]): Promise<string[]> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    const name = replicaBlob(agentId, diskId);
    const kept = new Set(keep.map((p) => p.ref?.snapshot).filter((s): s is string => !!s));
    const removed: string[] = [];
    for (const s of await this.snapshotsOf(name)) {
      if (kept.has(s.snapshot!)) continue;
      await this.ops.delete({ name, snapshot: s.snapshot });
      removed.push(s.snapshot!);
    }
    if (removed.length) this.log?.info('azure orphan snapshots removed', { agent: agentId, disk: diskId, snapshots: removed });
    return removed;
  }

  private pointSource(agentId: string, diskId: string, ref: PointRef | undefined, pointId: string): BlobRef {
    const snapshot = ref?.snapshot;
    if (!snapshot) {
      throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `point ${pointId} of disk ${diskId} (agent ${agentId}) has no snapshot in this Azure backend`);
    }
    return { name: replicaBlob(agentId, diskId), snapshot };
  }

  private image(info: BlobInfo): PointImage | null {
    const m = info.metadata;
    if (m.mobimage !== '1' || (m.purpose !== 'failover' && m.purpose !== 'test-failover')) return null;
    return {
      agentId: m.agent, diskId: m.disk, pointId: m.point, purpose: m.purpose, sizeBytes: Number(m.sizebytes),
      location: this.ops.blobUrl({ name: info.name }), localPath: null, method: m.method ?? 'snapshot-copy',
      ms: Number(m.ms ?? 0), undoRecords: 0,
    };
  }

  /**
   * Copies the point's snapshot to a writable page blob (the service's copy; a copy of the valid
   * page ranges when that copy cannot be used), sized to the point. `epochs` is not called: a
   * snapshot is complete.
   */
  async materialize(agentId: string, diskId: string, point: DiskPoint, _epochs: () => Promise<DiskPoint[]>, purpose: ImagePurpose): Promise<PointImage> {
    checkId('agent', agentId);
    checkId('disk', diskId);
    checkId('point', point.pointId);
    const t0 = Date.now();
    const source = this.pointSource(agentId, diskId, point.ref, point.pointId);
    if (!(await this.ops.exists(source))) {
      throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `the snapshot of point ${point.pointId} of disk ${diskId} (agent ${agentId}) is gone from ${this.location}`);
    }
    const dest = imageBlob(purpose, agentId, point.pointId, diskId);
    const meta: Record<string, string> = {
      mobimage: '1', agent: agentId, disk: diskId, point: point.pointId, purpose, sizebytes: String(point.sizeBytes),
      seq: String(point.seq), createdat: new Date().toISOString(), method: 'snapshot-copy',
    };
    let method = 'snapshot-copy';
    try {
      await this.ops.copyFrom(dest, source, meta);
    } catch (err) {
      if (err instanceof MobilityError && !(err instanceof TargetAnswerError)) throw err; // unavailable, auth, quota: no fallback helps
      const status = err instanceof TargetAnswerError ? err.statusCode : null;
      if (status === 404) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `the snapshot of point ${point.pointId} of disk ${diskId} vanished while it was copied`);
      this.log?.warn('server-side copy unusable; copying page ranges instead', { source: `${source.name}@${source.snapshot}`, dest, error: (err as Error).message });
      method = 'page-copy';
      await this.ops.delete({ name: dest }).catch(() => false);
      await copyBlobByPages(this.ops, source, dest, point.sizeBytes, { ...meta, method });
    }
    const props = await this.ops.properties({ name: dest });
    if (!props) throw new MobilityError('MOB_ERR_STORAGE', `image blob ${dest} vanished after the copy`);
    if (props.sizeBytes !== roundUpSector(point.sizeBytes)) await this.ops.resize(dest, roundUpSector(point.sizeBytes));
    const ms = Date.now() - t0;
    await this.ops.setMetadata(dest, { ...meta, method, ms: String(ms) });
    this.log?.info('azure point image made', { agent: agentId, disk: diskId, point: point.pointId, purpose, blob: dest, method, ms });
    return {
      agentId, diskId, pointId: point.pointId, purpose, sizeBytes: point.sizeBytes, location: this.ops.blobUrl({ name: dest }),
      localPath: null, method, ms, undoRecords: 0,
    };
  }

  /** Writes the image as a local sparse file: only its valid page ranges are downloaded. */
  async download(image: PointImage, outFile: string, progress?: ProgressFn): Promise<{ bytes: number; ms: number }> {
    const t0 = Date.now();
    const name = this.imageName(image);
    if (!(await this.ops.exists({ name }))) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `image ${name} does not exist in ${this.location}`);
    const bytes = await downloadBlobToFile(this.ops, { name }, image.sizeBytes, outFile, progress);
    return { bytes, ms: Date.now() - t0 };
  }

  private imageName(image: PointImage): string {
    checkId('agent', image.agentId);
    checkId('disk', image.diskId);
    checkId('point', image.pointId);
    return imageBlob(image.purpose, image.agentId, image.pointId, image.diskId);
  }

  async images(agentId: string, purpose?: ImagePurpose): Promise<PointImage[]> {
    checkId('agent', agentId);
    const purposes: ImagePurpose[] = purpose ? [purpose] : ['test-failover', 'failover'];
    const out: PointImage[] = [];
    for (const p of purposes) {
      for (const b of await this.ops.list(`${p}/${agentId}/`)) {
        if (b.snapshot) continue;
        const img = this.image(b);
        if (img && img.agentId === agentId && img.purpose === p) out.push(img);
      }
    }
    return out.sort((a, b) => a.purpose.localeCompare(b.purpose) || a.pointId.localeCompare(b.pointId) || a.diskId.localeCompare(b.diskId));
  }

  async removeImage(image: PointImage): Promise<void> {
    await this.ops.delete({ name: this.imageName(image) }, true);
  }

  async openImage(image: PointImage): Promise<ImageReader> {
    const name = this.imageName(image);
    const props = await this.ops.properties({ name });
    if (!props) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `image ${name} does not exist in ${this.location}`);
    const ops = this.ops;
    const sizeBytes = image.sizeBytes;
    const range = (firstPage: number, count: number, pageSize: number) => {
      const start = firstPage * pageSize;
      if (!Number.isSafeInteger(start) || firstPage < 0 || count < 0 || start > sizeBytes || (count > 0 && start >= sizeBytes)) {
        throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${sizeBytes}-byte image`);
      }
      return { start, end: Math.min(start + count * pageSize, sizeBytes) };
    };
    return {
      sizeBytes,
      async read(firstPage, count, pageSize) {
        const { start, end } = range(firstPage, count, pageSize);
        return end > start ? ops.download({ name }, start, end - start) : Buffer.alloc(0);
      },
      async pageDigests(firstPage, count, pageSize) {
        return blobPageDigests(ops, { name }, sizeBytes, firstPage, count, pageSize);
      },
      async close() { /* nothing held */ },
    };
  }

  /**
   * Failback: the image's content becomes the disk's replica under a new generation (initial
   * replication complete, durable sequence 0), by a server-side copy over the replica blob; then
   * the replica's old snapshots (the old timeline's points) and the image blob are deleted.
   * Idempotent: once the image is gone, adopt only makes sure the old snapshots are gone.
   */
  async adopt(image: PointImage): Promise<void> {
    const src = this.imageName(image);
    const dest = replicaBlob(image.agentId, image.diskId);
    const props = await this.ops.properties({ name: src });
    if (props) {
      const state = newReplicaState(image.agentId, image.diskId, image.sizeBytes, false);
      state.initialComplete = true;
      try {
        await this.ops.copyFrom(dest, { name: src }, encodeState(state));
      } catch (err) {
        if (err instanceof MobilityError && !(err instanceof TargetAnswerError)) throw err; // unavailable, auth, quota: no fallback helps
        if (!(err instanceof CopyFailedError) && !(err instanceof TargetAnswerError)) throw err;
        this.log?.warn('server-side copy unusable; copying page ranges instead', { source: src, dest, error: (err as Error).message });
        await copyBlobByPages(this.ops, { name: src }, dest, image.sizeBytes, encodeState(state));
      }
      const after = await this.ops.properties({ name: dest });
      if (after && after.sizeBytes !== roundUpSector(image.sizeBytes)) await this.ops.resize(dest, roundUpSector(image.sizeBytes));
      // the copy carried the new state; write it again in case a copy of page ranges was used
      await this.ops.setMetadata(dest, encodeState(state));
    } else if (!(await this.ops.exists({ name: dest }))) {
      throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `image ${src} does not exist in ${this.location}, and disk ${image.diskId} has no replica`);
    }
    for (const s of await this.snapshotsOf(dest)) await this.ops.delete({ name: dest, snapshot: s.snapshot });
    await this.ops.delete({ name: src }, true);
    this.log?.info('azure image adopted as replica', { agent: image.agentId, disk: image.diskId, point: image.pointId, blob: dest });
  }

  /** Nothing is held between calls (the SDK's idle keep-alive sockets do not keep the process alive). */
  async close(): Promise<void> {
    /* nothing to release */
  }
}

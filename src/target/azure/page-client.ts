/**
 * The Azure operations the page-blob backend needs, and nothing else: a narrow seam between the
 * replica logic (azure-store.ts, azure-backend.ts) and the SDK.
 *
 *   PageBlobOps          the interface: page blobs of one container, by name (and snapshot)
 *   SdkPageBlobOps       over @azure/storage-blob, with the SDK's own retries switched off
 *                        (maxTries 1) and a client-side timeout on every try (AbortSignal)
 *   RetryingPageBlobOps  a decorator that runs every call of another PageBlobOps under
 *                        ../retry.ts: retry, backoff, and the coded errors (TARGET_UNAVAILABLE /
 *                        TARGET_AUTH / TARGET_QUOTA). The backend uses only this one, so retry
 *                        lives in one layer, not in the callers
 *   AzureOpStats         calls per operation (every try counts), bytes up and down, retries
 *
 * Conventions: page ranges are half-open [start, end) (the REST API's ranges are inclusive; the
 * conversion happens here, once). Offsets and lengths given to putPages / clearPages / create /
 * resize must be multiples of 512 (the caller aligns); one putPages carries at most 4 MiB.
 * "Not found" is an answer, not an error: properties() gives null, delete() false. Every other
 * failure is thrown as the SDK raised it (SdkPageBlobOps) or as a coded MobilityError
 * (RetryingPageBlobOps).
 *
 * Secrets: URLs given out (containerUrl, blobUrl) never carry the SAS token; the token is only
 * appended to the URLs the SDK sends, and to a copy source (which the service must be able to read).
 */
import {
  AnonymousCredential, BlobServiceClient, StorageSharedKeyCredential, newPipeline,
  type ContainerClient, type PageBlobClient, type BlobBeginCopyFromURLResponse,
} from '@azure/storage-blob';
import type { Logger } from '../../log.js';
import { MobilityError } from '../../errors.js';
import { classifyTargetError, retryPolicy, withRetry, redactSecrets, systemClock, type ClassifiedError, type RetryClock, type RetryPolicy } from '../retry.js';
import type { AzureCredentials } from './credentials.js';

export const SECTOR = 512;
/** Largest Put Page body the service takes. */
export const MAX_PUT_PAGE_BYTES = 4 * 1024 * 1024;
/** Largest page blob the service takes (8 TiB). */
export const MAX_PAGE_BLOB_BYTES = 8 * 1024 ** 4;

/** A blob of the container, or one of its snapshots. */
export interface BlobRef { name: string; snapshot?: string | null }

/** Valid (written) bytes [start, end). */
export interface PageRange { start: number; end: number }

export interface BlobInfo {
  name: string;
  snapshot: string | null;
  sizeBytes: number;
  metadata: Record<string, string>;
  /** Copy state when the blob is (or was) a copy destination. */
  copyStatus: string | null;
  copyStatusDescription: string | null;
  /** "bytes copied/total" while (or after) the blob is a copy destination. */
  copyProgress?: string | null;
  /** The id of the copy into this blob (for Abort Copy Blob). */
  copyId?: string | null;
}

export interface AzureOpStats {
  /** Requests sent, per operation (a retried call counts each try). */
  calls: Record<string, number>;
  bytesUploaded: number;
  bytesDownloaded: number;
  /** Tries that failed transiently and were retried. */
  retries: number;
}

export function newOpStats(): AzureOpStats {
  return { calls: {}, bytesUploaded: 0, bytesDownloaded: 0, retries: 0 };
}

export function totalCalls(s: AzureOpStats): number {
  return Object.values(s.calls).reduce((a, b) => a + b, 0);
}

export interface PageBlobOps {
  /** The container's URL, without credentials. */
  readonly containerUrl: string;
  /** A blob's (or snapshot's) URL, without credentials. */
  blobUrl(ref: BlobRef): string;
  /** Creates the container when missing; true when it was created. */
  ensureContainer(): Promise<boolean>;
  /** True when the container exists. */
  containerExists(): Promise<boolean>;
  /** Creates (or overwrites) a page blob of `sizeBytes` (all zeros, nothing stored) with metadata. */
  create(name: string, sizeBytes: number, metadata: Record<string, string>): Promise<void>;
  resize(name: string, sizeBytes: number): Promise<void>;
  putPages(name: string, offset: number, data: Buffer): Promise<void>;
  clearPages(name: string, offset: number, length: number): Promise<void>;
  /** Valid ranges within [offset, offset+length) (whole blob when omitted), sorted. */
  pageRanges(ref: BlobRef, offset?: number, length?: number): Promise<PageRange[]>;
  /** Bytes [offset, offset+length) of a blob or snapshot. */
  download(ref: BlobRef, offset: number, length: number): Promise<Buffer>;
  /** Size, metadata and copy state, or null when there is no such blob (or snapshot). */
  properties(ref: BlobRef): Promise<BlobInfo | null>;
  exists(ref: BlobRef): Promise<boolean>;
  /** Replaces the blob's metadata. */
  setMetadata(name: string, metadata: Record<string, string>): Promise<void>;
  /** Snapshots the blob (the snapshot carries `metadata`); returns the snapshot id. */
  snapshot(name: string, metadata: Record<string, string>): Promise<string>;
  /** Deletes a blob (with its snapshots when asked) or one snapshot; false when it was not there. */
  delete(ref: BlobRef, withSnapshots?: boolean): Promise<boolean>;
  /** Blobs whose name starts with prefix, with metadata (and their snapshots when asked). */
  list(prefix: string, opts?: { snapshots?: boolean }): Promise<BlobInfo[]>;
  /** Starts a server-side copy of `source` over blob `dest` (created or replaced), with metadata. */
  startCopy(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<{ status: string }>;
  /** startCopy, then waits until the copy is no longer pending; throws when it failed or was aborted. */
  copyFrom(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<void>;
  /** Aborts a pending copy into `dest` (Abort Copy Blob; the destination is left empty). */
  abortCopy(dest: string, copyId: string): Promise<void>;
}

/**
 * The service answered a call with an error that is neither an outage, nor credentials, nor
 * quota (404, 409, 412, 400...): MOB_ERR_STORAGE, with the HTTP status and the service's error
 * code kept for the backend's own decisions (e.g. a missing snapshot). Its message is safe to show.
 */
export class TargetAnswerError extends MobilityError {
  constructor(message: string, readonly statusCode: number | null, readonly serviceCode: string | null) {
    super('MOB_ERR_STORAGE', message);
  }
}

/** A copy that ended in 'failed' or 'aborted' (not retried: the source is the problem). */
export class CopyFailedError extends Error {
  constructor(readonly status: string, description: string) {
    super(`server-side copy ${status}${description ? `: ${redactSecrets(description)}` : ''}`);
    this.name = 'CopyFailedError';
  }
}

/** Bytes promised and bytes received differ (a cut connection): transient. */
class ShortReadError extends Error {
  readonly code = 'ESHORTREAD';
  constructor(want: number, got: number) { super(`download returned ${got} of ${want} bytes`); }
}

function errorStatus(err: unknown): number | null {
  const s = (err as { statusCode?: unknown })?.statusCode;
  return typeof s === 'number' ? s : null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface SdkPageBlobOpsOptions {
  accountUrl: string;
  container: string;
  credentials: AzureCredentials;
  /** Client-side bound of one try (default 60 s): a try that takes longer is aborted (transient). */
  tryTimeoutMs?: number;
  stats?: AzureOpStats;
}

/** Strips a query string and trailing slashes: an account URL as it may be shown. */
export function cleanAccountUrl(url: string): string {
  return url.replace(/[?#].*$/, '').replace(/\/+$/, '');
}

/** PageBlobOps over the Azure SDK: one request per call (no SDK retry), each bounded by tryTimeoutMs. */
export class SdkPageBlobOps implements PageBlobOps {
  readonly containerUrl: string;
  readonly stats: AzureOpStats;
  private readonly cc: ContainerClient;
  private readonly tryTimeoutMs: number;

  constructor(o: SdkPageBlobOpsOptions) {
    const accountUrl = cleanAccountUrl(o.accountUrl);
    this.containerUrl = `${accountUrl}/${encodeURIComponent(o.container)}`;
    this.stats = o.stats ?? newOpStats();
    this.tryTimeoutMs = o.tryTimeoutMs ?? 60_000;
    const key = o.credentials.sharedKey();
    const sas = o.credentials.sasQuery();
    const credential = key ? new StorageSharedKeyCredential(key.accountName, key.accountKey) : new AnonymousCredential();
    // retries are ../retry.ts's job (one layer, one budget): the SDK tries once. Each request carries
    // the service-side `timeout` parameter, half the client's bound: a try the client gave up on
    // (and retried) is abandoned by the service too, never applied late over a newer write
    const serverTimeoutMs = Math.max(1000, Math.floor(this.tryTimeoutMs / 2));
    const pipeline = newPipeline(credential, { retryOptions: { maxTries: 1, tryTimeoutInMs: serverTimeoutMs }, keepAliveOptions: { enable: true } });
    const svc = new BlobServiceClient(sas ? `${accountUrl}?${sas}` : accountUrl, pipeline);
    this.cc = svc.getContainerClient(o.container);
  }

  private count(op: string): AbortSignal {
    this.stats.calls[op] = (this.stats.calls[op] ?? 0) + 1;
    return AbortSignal.timeout(this.tryTimeoutMs);
  }

  private pb(ref: BlobRef): PageBlobClient {
    const c = this.cc.getPageBlobClient(ref.name);
    return ref.snapshot ? c.withSnapshot(ref.snapshot) : c;
  }

  blobUrl(ref: BlobRef): string {
    const base = `${this.containerUrl}/${ref.name.split('/').map(encodeURIComponent).join('/')}`;
    return ref.snapshot ? `${base}?snapshot=${encodeURIComponent(ref.snapshot)}` : base;
  }

  async containerExists(): Promise<boolean> {
    const abortSignal = this.count('getContainerProperties');
    try {
      await this.cc.getProperties({ abortSignal });
      return true;
    } catch (err) {
      if (errorStatus(err) === 404) return false;
      throw err;
    }
  }

  async ensureContainer(): Promise<boolean> {
    if (await this.containerExists()) return false;
    const abortSignal = this.count('createContainer');
    try {
      await this.cc.create({ abortSignal });
      return true;
    } catch (err) {
      if (errorStatus(err) === 409) return false; // created meanwhile (or being deleted: the next call says so)
      throw err;
    }
  }

  async create(name: string, sizeBytes: number, metadata: Record<string, string>): Promise<void> {
    const abortSignal = this.count('create');
    await this.pb({ name }).create(sizeBytes, { metadata, abortSignal });
  }

  async resize(name: string, sizeBytes: number): Promise<void> {
    const abortSignal = this.count('resize');
    await this.pb({ name }).resize(sizeBytes, { abortSignal });
  }

  async putPages(name: string, offset: number, data: Buffer): Promise<void> {
    const abortSignal = this.count('putPages');
    await this.pb({ name }).uploadPages(data, offset, data.length, { abortSignal });
    this.stats.bytesUploaded += data.length;
  }

  async clearPages(name: string, offset: number, length: number): Promise<void> {
    const abortSignal = this.count('clearPages');
    await this.pb({ name }).clearPages(offset, length, { abortSignal });
  }

  async pageRanges(ref: BlobRef, offset?: number, length?: number): Promise<PageRange[]> {
    const out: PageRange[] = [];
    const it = this.pb(ref).listPageRanges(offset, length, { abortSignal: this.count('getPageRanges') }).byPage();
    for (;;) {
      const page = await it.next();
      if (page.done) break;
      for (const r of page.value.pageRange ?? []) out.push({ start: r.start, end: r.end + 1 });
      if (page.value.continuationToken) this.count('getPageRanges');
    }
    out.sort((a, b) => a.start - b.start);
    // merge touching ranges (the service may split them)
    const merged: PageRange[] = [];
    for (const r of out) {
      const last = merged[merged.length - 1];
      if (last && r.start <= last.end) last.end = Math.max(last.end, r.end);
      else merged.push({ ...r });
    }
    return merged;
  }

  async download(ref: BlobRef, offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    const abortSignal = this.count('download');
    const res = await this.pb(ref).download(offset, length, { abortSignal, maxRetryRequests: 0 });
    const body = res.readableStreamBody;
    if (!body) throw new ShortReadError(length, 0);
    let got = 0;
    for await (const chunk of body as AsyncIterable<Buffer>) {
      if (got + chunk.length > length) throw new ShortReadError(length, got + chunk.length);
      chunk.copy(out, got);
      got += chunk.length;
    }
    if (got !== length) throw new ShortReadError(length, got);
    this.stats.bytesDownloaded += length;
    return out;
  }

  async properties(ref: BlobRef): Promise<BlobInfo | null> {
    const abortSignal = this.count('getProperties');
    try {
      const p = await this.pb(ref).getProperties({ abortSignal });
      return {
        name: ref.name, snapshot: ref.snapshot ?? null, sizeBytes: p.contentLength ?? 0, metadata: lower(p.metadata),
        copyStatus: p.copyStatus ?? null, copyStatusDescription: p.copyStatusDescription ?? null, copyProgress: p.copyProgress ?? null, copyId: p.copyId ?? null,
      };
    } catch (err) {
      if (errorStatus(err) === 404) return null;
      throw err;
    }
  }

  async exists(ref: BlobRef): Promise<boolean> {
    return (await this.properties(ref)) !== null;
  }

  async setMetadata(name: string, metadata: Record<string, string>): Promise<void> {
    const abortSignal = this.count('setMetadata');
    await this.pb({ name }).setMetadata(metadata, { abortSignal });
  }

  async snapshot(name: string, metadata: Record<string, string>): Promise<string> {
    const abortSignal = this.count('createSnapshot');
    const r = await this.pb({ name }).createSnapshot({ metadata, abortSignal });
    if (!r.snapshot) throw new Error(`the service created a snapshot of ${name} without returning its id`);
    return r.snapshot;
  }

  async delete(ref: BlobRef, withSnapshots = false): Promise<boolean> {
    const abortSignal = this.count('delete');
    try {
      await this.pb(ref).delete({ abortSignal, ...(withSnapshots && !ref.snapshot ? { deleteSnapshots: 'include' as const } : {}) });
      return true;
    } catch (err) {
      if (errorStatus(err) === 404) return false;
      throw err;
    }
  }

  async list(prefix: string, opts: { snapshots?: boolean } = {}): Promise<BlobInfo[]> {
    const out: BlobInfo[] = [];
    const it = this.cc.listBlobsFlat({ prefix, includeMetadata: true, includeSnapshots: opts.snapshots ?? false, includeCopy: true, abortSignal: this.count('list') }).byPage({ maxPageSize: 5000 });
    for (;;) {
      const page = await it.next();
      if (page.done) break;
      for (const b of page.value.segment.blobItems) {
        out.push({
          name: b.name, snapshot: b.snapshot || null, sizeBytes: b.properties.contentLength ?? 0, metadata: lower(b.metadata),
          copyStatus: b.properties.copyStatus ?? null, copyStatusDescription: b.properties.copyStatusDescription ?? null,
        });
      }
      if (page.value.continuationToken) this.count('list');
    }
    return out;
  }

  /** The URL the service reads a copy from: with the SAS token, when that is how we authenticate. */
  private sourceUrl(ref: BlobRef): string {
    return this.pb(ref).url;
  }

  async startCopy(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<{ status: string }> {
    const abortSignal = this.count('startCopy');
    const poller = await this.pb({ name: dest }).beginCopyFromURL(this.sourceUrl(source), { metadata, abortSignal });
    const st = poller.getOperationState() as { result?: BlobBeginCopyFromURLResponse; isCompleted?: boolean };
    return { status: st.result?.copyStatus ?? (st.isCompleted ? 'success' : 'pending') };
  }

  async abortCopy(dest: string, copyId: string): Promise<void> {
    const abortSignal = this.count('abortCopy');
    await this.pb({ name: dest }).abortCopyFromURL(copyId, { abortSignal });
  }

  async copyFrom(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<void> {
    let { status } = await this.startCopy(dest, source, metadata);
    for (let wait = 100; status === 'pending'; wait = Math.min(wait * 2, 2000)) {
      await sleep(wait);
      const p = await this.properties({ name: dest });
      if (!p) throw new CopyFailedError('failed', 'the destination vanished while copying');
      status = p.copyStatus ?? 'success';
      if (status === 'failed' || status === 'aborted') throw new CopyFailedError(status, p.copyStatusDescription ?? '');
    }
    if (status === 'failed' || status === 'aborted') throw new CopyFailedError(status, '');
  }
}

function lower(md: Record<string, string> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(md ?? {})) out[k.toLowerCase()] = v;
  return out;
}

export interface RetryingOpsOptions {
  policy?: Partial<RetryPolicy>;
  stats?: AzureOpStats;
  log?: Logger;
  clock?: RetryClock;
  /** How to name the target in messages (an account and container, never a secret). */
  target: string;
  /** What fixes an auth failure (e.g. "fix the credentials file /etc/mobility/azure.json"). */
  authFix: string;
  /** A server-side copy whose progress does not move for this long is given up (default COPY_STALL_MS). */
  copyStallMs?: number;
}

/** A pending server-side copy that shows no progress for this long is given up. */
export const COPY_STALL_MS = 10 * 60_000;

/**
 * Runs every call of `inner` under the retry policy. Auth, quota and exhausted transient failures
 * come out as coded MobilityErrors that name the operation, the blob and the target; answers
 * (not found, conflicts) come out as `inner` gave them.
 */
export class RetryingPageBlobOps implements PageBlobOps {
  readonly policy: RetryPolicy;
  readonly stats: AzureOpStats;

  constructor(private readonly inner: PageBlobOps, private readonly o: RetryingOpsOptions) {
    this.policy = retryPolicy(o.policy);
    this.stats = o.stats ?? newOpStats();
  }

  get containerUrl(): string { return this.inner.containerUrl; }
  blobUrl(ref: BlobRef): string { return this.inner.blobUrl(ref); }

  /** The same decorator over the same operations and counters, with another policy (e.g. one try for best-effort calls). */
  withPolicy(policy: Partial<RetryPolicy>): RetryingPageBlobOps {
    return new RetryingPageBlobOps(this.inner, { ...this.o, stats: this.stats, policy: { ...this.policy, ...policy } });
  }

  private async run<T>(op: string, subject: string, fn: () => Promise<T>): Promise<T> {
    const what = `${op}${subject ? ` ${subject}` : ''} at ${this.o.target}`;
    try {
      return await this.retried(what, op, subject, fn);
    } catch (err) {
      if (err instanceof MobilityError) throw err;
      // an answer of the service (not found, conflict, bad request): coded, with its status, and
      // without the SDK error (whose request and response carry URLs and headers)
      const c = classifyTargetError(err);
      throw new TargetAnswerError(`${what}: ${c.summary}`, c.status, c.code);
    }
  }

  private retried<T>(what: string, op: string, subject: string, fn: () => Promise<T>): Promise<T> {
    return withRetry(() => fn(), {
      policy: this.policy,
      what,
      clock: this.o.clock ?? systemClock,
      onRetry: ({ attempt, delayMs, error }) => {
        this.stats.retries++;
        this.o.log?.warn('azure call failed, retrying', { op, blob: subject || undefined, attempt, delayMs, error: error.summary });
      },
      authError: (c: ClassifiedError) => new MobilityError('MOB_ERR_TARGET_AUTH',
        `${what}: Azure storage refused the credentials (${c.summary}); ${this.o.authFix}`),
      quotaError: (c: ClassifiedError) => new MobilityError('MOB_ERR_TARGET_QUOTA',
        `${what}: Azure storage is out of capacity (${c.summary}); free space or raise the account's limits`),
    });
  }

  containerExists(): Promise<boolean> { return this.run('get container properties', '', () => this.inner.containerExists()); }
  ensureContainer(): Promise<boolean> { return this.run('create container', '', () => this.inner.ensureContainer()); }
  create(name: string, sizeBytes: number, metadata: Record<string, string>): Promise<void> {
    return this.run('create page blob', name, () => this.inner.create(name, sizeBytes, metadata));
  }
  resize(name: string, sizeBytes: number): Promise<void> { return this.run('resize', name, () => this.inner.resize(name, sizeBytes)); }
  putPages(name: string, offset: number, data: Buffer): Promise<void> {
    return this.run('put pages', `${name} @${offset}+${data.length}`, () => this.inner.putPages(name, offset, data));
  }
  clearPages(name: string, offset: number, length: number): Promise<void> {
    return this.run('clear pages', `${name} @${offset}+${length}`, () => this.inner.clearPages(name, offset, length));
  }
  pageRanges(ref: BlobRef, offset?: number, length?: number): Promise<PageRange[]> {
    return this.run('get page ranges', refName(ref), () => this.inner.pageRanges(ref, offset, length));
  }
  download(ref: BlobRef, offset: number, length: number): Promise<Buffer> {
    return this.run('download', `${refName(ref)} @${offset}+${length}`, () => this.inner.download(ref, offset, length));
  }
  properties(ref: BlobRef): Promise<BlobInfo | null> { return this.run('get properties', refName(ref), () => this.inner.properties(ref)); }
  exists(ref: BlobRef): Promise<boolean> { return this.run('get properties', refName(ref), () => this.inner.exists(ref)); }
  setMetadata(name: string, metadata: Record<string, string>): Promise<void> {
    return this.run('set metadata', name, () => this.inner.setMetadata(name, metadata));
  }
  snapshot(name: string, metadata: Record<string, string>): Promise<string> {
    return this.run('snapshot', name, () => this.inner.snapshot(name, metadata));
  }
  delete(ref: BlobRef, withSnapshots?: boolean): Promise<boolean> {
    return this.run('delete', refName(ref), () => this.inner.delete(ref, withSnapshots));
  }
  list(prefix: string, opts?: { snapshots?: boolean }): Promise<BlobInfo[]> {
    return this.run('list', `${prefix}*`, () => this.inner.list(prefix, opts));
  }
  abortCopy(dest: string, copyId: string): Promise<void> {
    return this.run('abort copy', dest, () => this.inner.abortCopy(dest, copyId));
  }

  startCopy(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<{ status: string }> {
    return this.run('start copy', `${refName(source)} -> ${dest}`, () => this.inner.startCopy(dest, source, metadata));
  }

  /** Starts the copy (retried), then polls the destination's copy state (each poll retried). */
  async copyFrom(dest: string, source: BlobRef, metadata: Record<string, string>): Promise<void> {
    const clock = this.o.clock ?? systemClock;
    const stallMs = this.o.copyStallMs ?? COPY_STALL_MS;
    let { status } = await this.startCopy(dest, source, metadata);
    let progress: string | null | undefined = null;
    let progressAt = clock.now();
    for (let wait = 100; status === 'pending'; wait = Math.min(wait * 2, 2000)) {
      await clock.sleep(wait);
      const p = await this.properties({ name: dest });
      if (!p) throw new CopyFailedError('failed', 'the destination vanished while copying');
      status = p.copyStatus ?? 'success';
      if (p.copyProgress !== progress) {
        progress = p.copyProgress;
        progressAt = clock.now();
      } else if (status === 'pending' && clock.now() - progressAt >= stallMs) {
        // a copy the service does not move on: abort it and give up (the caller copies page ranges instead)
        if (p.copyId) await this.abortCopy(dest, p.copyId).catch(() => undefined);
        throw new CopyFailedError('stalled', `no progress for ${Math.round(stallMs / 1000)} s (at ${progress ?? 'an unknown point'})`);
      }
    }
    if (status === 'failed' || status === 'aborted') {
      const p = await this.properties({ name: dest }).catch(() => null);
      throw new CopyFailedError(status, p?.copyStatusDescription ?? '');
    }
  }
}

function refName(ref: BlobRef): string {
  return ref.snapshot ? `${ref.name}@${ref.snapshot}` : ref.name;
}

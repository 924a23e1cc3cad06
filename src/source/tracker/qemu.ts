/**
 * Host-mode change tracker: QEMU dirty bitmaps, controlled over QMP, read over NBD.
 *
 * For each tracked disk (a block node of one QEMU process, named by its node name) the tracker
 * keeps one ENABLED dirty bitmap named `<name>.<gen>` (the "active" one) that QEMU sets for
 * every guest write. On qcow2 nodes it is persistent: QEMU stores it in the image when it stops
 * cleanly and loads it when it starts again, so neither an agent restart nor a clean QEMU
 * restart loses anything. On other formats (raw) QEMU can only keep it in memory: a QEMU
 * restart loses it, which the tracker reports as a loss with its reason (the caller answers it
 * with a checksum resync, never a full copy). A qcow2 bitmap found `inconsistent` (QEMU was
 * killed or crashed while it was in use) is a loss too.
 *
 * drain(), one round (serialised with every other call on this tracker):
 *   1. one QMP `transaction` across ALL disks: add `<name>.<gen+1>` (enabled) and disable
 *      `<name>.<gen>`. Writes before it are in the disabled ("frozen") bitmap, writes after it
 *      in the new one, with no gap and on every disk at the same instant;
 *   2. frozen bitmaps left by an earlier round that did not finish (agent killed, NBD error)
 *      are merged into this round's frozen one (a union: repeating it is harmless);
 *   3. the frozen bitmap is exported read-only over NBD (`block-export-add`, on the NBD server
 *      the caller names, or one the tracker starts on its own unix socket) and `nbdinfo
 *      --map=qemu:dirty-bitmap:<bitmap> --json` lists its dirty extents (QEMU refuses to export
 *      an enabled bitmap, hence the rotation first);
 *   4. the export is deleted (waiting for BLOCK_EXPORT_DELETED), the extents go to the
 *      caller's journal (raw record: lines "Q disk offset length"), and only then are the
 *      frozen bitmaps removed (one transaction). Until then they stay in QEMU: a failure or a
 *      kill anywhere before leaves them for the next round, so nothing is ever dropped.
 * Extents are whole bitmap granules (granularity() says how large: the qcow2 cluster size
 * unless set), so they cover every written byte and may cover a little more.
 *
 * Data: openSource() gives a DiskSource of a disk through QEMU's FUSE export (why not NBD:
 * see src/source/qemu/fuse-source.ts).
 *
 * Points: beginPoint() starts a copy-before-write view of all disks and rotates the bitmaps in
 * the same transaction (a crash-consistent point without stopping the guest).
 *
 * What this does not do (yet): discovery of a VM's
 * disks from libvirt or query-block.
 *
 * QMP errors are MOB_ERR_QMP, nbdinfo failures MOB_ERR_NBD, a node that cannot be tracked
 * (missing, bitmap busy with another job) MOB_ERR_QEMU_TRACKER.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { MobilityError } from '../../errors.js';
import { QmpClient, QmpCommandError } from '../qemu/qmp.js';
import { openFuseSource } from '../qemu/fuse-source.js';
import { installIdOf } from '../../util/installation.js';
import type { DiskSource } from '../disk-source.js';
import { coalesceExtents, lossOf, type DirtyExtent, type DrainJournal, type TrackingLoss } from './change-tracker.js';
import type { HostModeTracker, HostPoint, HostPointOptions } from './host-tracker.js';

export interface QemuDiskSpec {
  /**
   * The disk: its device (drive id or qdev id, as query-block lists it: stable across restarts
   * of the VM) or the node name of its format node (qcow2 or raw; stable only when the VM names
   * its nodes: QEMU's automatic `#blockNNN` names change at every start). A device is resolved
   * to the node it holds at every open().
   */
  node: string;
}

export interface QemuTrackerOptions {
  /** Bitmap prefix, one per agent installation: [A-Za-z0-9_-], at most 64 characters. */
  name: string;
  /** The QEMU process's QMP socket (unix). */
  qmpSocket: string;
  disks: QemuDiskSpec[];
  /**
   * The unix socket of the NBD server the QEMU process already runs, if it runs one (QEMU has
   * at most one per process). Absent: the tracker starts one on `<runDir>/<name>.nbd`.
   */
  nbdSocket?: string;
  /** Where the tracker's own NBD socket lives (default: the directory of qmpSocket). */
  runDir?: string;
  /** Bitmap granularity in bytes for bitmaps the tracker creates (power of two, 512 B .. 2 GiB); default QEMU's (the qcow2 cluster size, else 64 KiB). */
  granularity?: number;
  /** QMP connect and per-command timeout, ms. */
  qmpTimeoutMs?: number;
  /** nbdinfo run time bound, ms. */
  nbdTimeoutMs?: number;
}

interface BitmapInfo { name?: string; recording: boolean; persistent: boolean; busy: boolean; granularity: number; count: number; inconsistent?: boolean }
interface NodeInfo { 'node-name': string; drv: string; 'dirty-bitmaps'?: BitmapInfo[]; image?: { 'virtual-size'?: number } }

export interface QemuTrackedDisk {
  node: string;
  /** Format driver of the node ("qcow2", "raw", ...). */
  drv: string;
  /** Whether the tracker's bitmaps on this node survive a QEMU restart (qcow2 only). */
  persistent: boolean;
  sizeBytes: number;
  granularity: number;
}

const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;
const NBDINFO_MAX_OUTPUT = 256 * 1024 * 1024;
const RECORD_RE = /^Q (\d+) (\d+) (\d+)$/;

function trackerError(name: string, what: string, cause?: unknown): MobilityError {
  return new MobilityError('MOB_ERR_QEMU_TRACKER', `qemu tracker '${name}': ${what}`, cause === undefined ? undefined : { cause });
}

function isQmpClass(err: unknown, desc: RegExp): boolean {
  return err instanceof QmpCommandError && desc.test(err.desc);
}

export class QemuTracker implements HostModeTracker {
  readonly name: string;
  /** The disks are read live through QEMU's exports, between points too. */
  readonly dataAccess = 'live' as const;
  resumed: boolean;
  /** Per disk (index as given to open()): was tracking lost before this open(), and why. */
  readonly openLoss: TrackingLoss[];
  readonly disks: QemuTrackedDisk[];
  private qmp: QmpClient;
  private gen: number;
  private nbdStarted = false;
  private readonly ownNbd: string | null;
  private chain: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** A read export of an earlier round could not be deleted: the next round deletes it first. */
  private staleExports = false;

  private constructor(private readonly o: QemuTrackerOptions, qmp: QmpClient, gen: number, disks: QemuTrackedDisk[], openLoss: TrackingLoss[]) {
    this.name = o.name;
    this.qmp = qmp;
    this.gen = gen;
    this.disks = disks;
    this.openLoss = openLoss;
    this.resumed = openLoss.every((l) => !l.lost);
    this.ownNbd = o.nbdSocket ? null : ownNbdSocket(o.runDir ?? path.dirname(o.qmpSocket), o.name);
  }

  /**
   * Connects to QEMU, resumes the bitmaps a previous open() left (agent restart) or creates
   * them. A disk whose bitmap is missing or inconsistent gets a fresh one and a loss in
   * openLoss (resumed = false). Throws MOB_ERR_QMP (QEMU unreachable) or MOB_ERR_QEMU_TRACKER
   * (a node that does not exist, a bitmap busy with another job).
   */
  static async open(o: QemuTrackerOptions): Promise<QemuTracker> {
    if (!NAME_RE.test(o.name)) throw trackerError(String(o.name), 'name must match [A-Za-z0-9_-]{1,64}');
    if (o.disks.length === 0) throw trackerError(o.name, 'no disks to track');
    if (new Set(o.disks.map((d) => d.node)).size !== o.disks.length) throw trackerError(o.name, 'a node is listed twice');
    const qmp = await QmpClient.connect(o.qmpSocket, { timeoutMs: o.qmpTimeoutMs, commandTimeoutMs: o.qmpTimeoutMs });
    try {
      await removeLeftovers(qmp, o.name);
      const nodes = await queryNodes(qmp);
      o = { ...o, disks: await resolveDisks(qmp, o.name, o.disks, nodes) };
      let gen = 0;
      for (const d of o.disks) for (const b of ours(nodes.get(d.node), o.name)) gen = Math.max(gen, b.gen);
      const disks: QemuTrackedDisk[] = [];
      const loss: TrackingLoss[] = [];
      const fresh: number[] = [];
      for (const [i, d] of o.disks.entries()) {
        const n = nodes.get(d.node);
        if (!n) throw trackerError(o.name, `QEMU has no block node '${d.node}' (query-named-block-nodes)`);
        const persistent = n.drv === 'qcow2';
        const mine = ours(n, o.name);
        const busy = mine.find((b) => b.info.busy);
        if (busy) throw trackerError(o.name, `dirty bitmap ${busy.info.name} on node ${d.node} is busy (in use by a block job or export of someone else)`);
        // an agent killed inside a rotation (the new bitmap added, the old one not yet disabled:
        // see drainNow) left both recording: the old one is disabled now, and the next round
        // drains it with the rest (an older generation's bitmap is folded in there)
        const rec = mine.filter((b) => b.info.recording).sort((a, b) => a.gen - b.gen);
        if (rec.length === 2 && rec[1]!.gen === gen && rec[0]!.gen === gen - 1 && !mine.some((b) => b.info.inconsistent || b.info.busy)) {
          await qmp.execute('block-dirty-bitmap-disable', { node: d.node, name: rec[0]!.info.name });
          rec[0]!.info.recording = false;
        }
        const problem = resumeProblem(d.node, n, mine, gen, persistent);
        loss.push(lossOf(problem));
        if (problem) {
          for (const b of mine) await qmp.execute('block-dirty-bitmap-remove', { node: d.node, name: b.info.name });
          fresh.push(i);
        }
        disks.push({ node: d.node, drv: n.drv, persistent, sizeBytes: n.image?.['virtual-size'] ?? 0, granularity: 0 });
      }
      if (fresh.length) {
        gen += 1;
        await qmp.execute('transaction', {
          actions: fresh.map((i) => ({ type: 'block-dirty-bitmap-add', data: addArgs(disks[i]!.node, `${o.name}.${gen}`, disks[i]!.persistent, o.granularity) })),
        });
        // a disk that resumed keeps its older generation: move it to the common one
        const resumedIdx = disks.map((_, i) => i).filter((i) => !fresh.includes(i));
        if (resumedIdx.length) await rotate(qmp, disks, resumedIdx, o.name, gen - 1, gen, o.granularity, 'merge');
      }
      const t = new QemuTracker(o, qmp, gen, disks, loss);
      await t.refreshGranularity();
      return t;
    } catch (err) {
      qmp.close();
      throw err;
    }
  }

  /**
   * Removes what a tracker of this name keeps on these disks (bitmaps, exports, point views),
   * for protection that ends (a VM or a disk no longer protected): without it QEMU would go on
   * recording every guest write, in the image too (qcow2). Disks QEMU no longer has are skipped.
   */
  static async remove(o: { name: string; qmpSocket: string; disks: QemuDiskSpec[]; qmpTimeoutMs?: number }): Promise<void> {
    const qmp = await QmpClient.connect(o.qmpSocket, { timeoutMs: o.qmpTimeoutMs, commandTimeoutMs: o.qmpTimeoutMs });
    try {
      await removeLeftovers(qmp, o.name);
      const nodes = await queryNodes(qmp);
      for (const d of o.disks) {
        let node: string;
        try {
          node = (await resolveDisks(qmp, o.name, [d], nodes))[0]!.node;
        } catch {
          continue;
        }
        for (const b of ours(nodes.get(node), o.name)) await qmp.execute('block-dirty-bitmap-remove', { node, name: b.info.name });
      }
    } finally {
      qmp.close();
    }
  }

  /**
   * Stable across rounds and restarts: the QMP socket and the nodes. (A bitmap removed or
   * replaced under the tracker is found by open() and selfCheck() themselves: it is missing,
   * disabled or inconsistent, or its generation is not the tracker's.)
   */
  get identity(): string { return `qemu:${this.o.qmpSocket}:${this.disks.map((d) => d.node).join(',')}`; }

  /**
   * The last self-check could not talk to QEMU at all (socket gone, connection reset, no
   * answer): that says nothing about the bitmaps, which QEMU keeps whether we reach it or not
   * (a restarted QEMU is judged once it answers again).
   */
  lastCheckUnreachable = false;

  /**
   * Connections made since open(): a new one (after QEMU closed the last, or a dead one was
   * given up) may be to a restarted QEMU, whose exports are not the ones the caller holds.
   */
  epoch = 0;

  /** false once the QMP connection closed (QEMU stopped, or restarted): the exports and views went with it. */
  get connected(): boolean { return !this.qmp.isClosed; }

  /** Name of the bitmap recording now (on every disk). */
  get activeBitmap(): string { return `${this.name}.${this.gen}`; }

  /** The granule of disk i's bitmap, bytes: drained extents are whole granules. */
  granularity(i: number): number { return this.disks[i]!.granularity; }

  /**
   * A read-only DiskSource of disk i's current data (QEMU's FUSE export of the node, a file in
   * `dir`; see src/source/qemu/fuse-source.ts). Its reads see the guest's writes as they
   * happen: like tracefs, the extents say where to read, consistency comes from cuts. Close
   * it before close() of the tracker (it uses the tracker's QMP connection).
   */
  openSource(i: number, dir: string): Promise<DiskSource> {
    return this.serial(async () => {
      const d = this.disks[i];
      if (!d) throw trackerError(this.name, `no disk ${i}`);
      await this.reconnectIfNeeded();
      return openFuseSource(this.qmp, { node: d.node, id: `${this.name}-read-${i}`, dir });
    });
  }

  drain(journal?: DrainJournal): Promise<DirtyExtent[]> {
    return this.serial(() => this.drainNow(journal));
  }

  parseText(text: string): DirtyExtent[] {
    const out: DirtyExtent[] = [];
    for (const line of text.split('\n')) {
      const m = RECORD_RE.exec(line.trim());
      if (m) out.push({ disk: Number(m[1]), offset: Number(m[2]), length: Number(m[3]) });
    }
    return coalesceExtents(out);
  }

  selfCheck(): Promise<string | null> {
    return this.serial(() => this.check());
  }

  /** selfCheck() as a loss report. */
  async loss(): Promise<TrackingLoss> {
    return lossOf(await this.selfCheck());
  }

  /**
   * Puts a fresh enabled bitmap on every disk whose active bitmap is missing, disabled or
   * inconsistent (reconnecting to QEMU first if it restarted). Changes before the repair are
   * unknown: the caller resyncs. Throws MOB_ERR_QMP / MOB_ERR_QEMU_TRACKER.
   */
  repair(): Promise<void> {
    return this.serial(async () => {
      if (this.closed) throw trackerError(this.name, 'repair() after close()');
      await this.reconnectIfNeeded();
      const nodes = await queryNodes(this.qmp);
      const bad: number[] = [];
      for (const [i, d] of this.disks.entries()) {
        const n = nodes.get(d.node);
        if (!n) throw trackerError(this.name, `QEMU has no block node '${d.node}'`);
        const a = n['dirty-bitmaps']?.find((b) => b.name === this.activeBitmap);
        if (!a || !a.recording || a.inconsistent) {
          for (const b of ours(n, this.name)) if (b.gen >= this.gen) await this.qmp.execute('block-dirty-bitmap-remove', { node: d.node, name: b.info.name });
          bad.push(i);
        }
      }
      if (!bad.length) return;
      // a new generation everywhere: the disks stay on one common name
      const next = this.gen + 1;
      await this.qmp.execute('transaction', { actions: bad.map((i) => ({ type: 'block-dirty-bitmap-add', data: addArgs(this.disks[i]!.node, `${this.name}.${next}`, this.disks[i]!.persistent, this.o.granularity) })) });
      const good = this.disks.map((_, i) => i).filter((i) => !bad.includes(i));
      if (good.length) await rotate(this.qmp, this.disks, good, this.name, this.gen, next, this.o.granularity, 'disable');
      this.gen = next;
      await this.refreshGranularity();
    });
  }

  /**
   * keep = true: the bitmaps stay (enabled) in QEMU for the next open(); keep = false: they are
   * removed. Either way the tracker's exports and its own NBD server go, and QMP is closed.
   */
  close(o?: { keep?: boolean }): Promise<void> {
    return this.serial(async () => {
      if (this.closed) return;
      this.closed = true;
      try {
        await this.reconnectIfNeeded();
        // every export of ours: bitmap maps, and read exports a caller did not close
        await deleteOurExports(this.qmp, this.name, `${this.name}-`);
        if (!o?.keep) {
          const nodes = await queryNodes(this.qmp);
          for (const d of this.disks) for (const b of ours(nodes.get(d.node), this.name)) await this.qmp.execute('block-dirty-bitmap-remove', { node: d.node, name: b.info.name });
        }
        if (this.ownNbd && this.nbdStarted) {
          await this.qmp.execute('nbd-server-stop').catch(() => undefined);
          fs.rmSync(this.ownNbd, { force: true });
        }
      } finally {
        this.qmp.close();
      }
    });
  }

  // -------------------------------------------------------------------------------------------

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.chain.then(fn, fn);
    this.chain = p.catch(() => undefined);
    return p;
  }

  private async reconnectIfNeeded(): Promise<void> {
    if (!this.qmpGone()) return;
    this.qmp = await QmpClient.connect(this.o.qmpSocket, { timeoutMs: this.o.qmpTimeoutMs, commandTimeoutMs: this.o.qmpTimeoutMs });
    this.epoch++;
    this.nbdStarted = false; // a new QEMU process has no NBD server of ours
  }

  private qmpGone(): boolean {
    return this.qmp.isClosed;
  }

  private async refreshGranularity(): Promise<void> {
    const nodes = await queryNodes(this.qmp);
    for (const d of this.disks) {
      const b = nodes.get(d.node)?.['dirty-bitmaps']?.find((x) => x.name === this.activeBitmap);
      if (b) d.granularity = b.granularity;
    }
  }

  private async check(): Promise<string | null> {
    this.lastCheckUnreachable = false;
    if (this.closed) return 'the tracker was closed';
    try {
      await this.reconnectIfNeeded();
    } catch (err) {
      this.lastCheckUnreachable = true;
      return `QEMU's QMP socket ${this.o.qmpSocket} does not answer (${(err as Error).message})`;
    }
    let nodes: Map<string, NodeInfo> = new Map();
    try {
      nodes = await queryNodes(this.qmp);
    } catch (first) {
      // a connection to a QEMU that just went away (EPIPE before the close is seen): once more on
      // a new one, so a restarted QEMU is judged on what it has, not on the dead connection
      let err: unknown = first;
      if (!(first instanceof QmpCommandError)) {
        this.qmp.close();
        try {
          await this.reconnectIfNeeded();
          nodes = await queryNodes(this.qmp);
          err = null;
        } catch (again) {
          err = again;
        }
      }
      if (err) {
        this.lastCheckUnreachable = !(err instanceof QmpCommandError);
        return `QEMU does not answer query-named-block-nodes (${(err as Error).message})`;
      }
    }
    for (const d of this.disks) {
      const n = nodes.get(d.node);
      if (!n) return `block node ${d.node} is gone from QEMU (disk detached, or QEMU restarted without it)`;
      const a = n['dirty-bitmaps']?.find((b) => b.name === this.activeBitmap);
      if (!a) {
        return `dirty bitmap ${this.activeBitmap} is missing on node ${d.node}`
          + (d.persistent ? ' (removed by someone, or QEMU was killed before it stored the bitmap in the image, or restarted from an older copy of the image)' : ` (QEMU restarted: on a ${d.drv} image the bitmap lives only in QEMU's memory; or it was removed)`);
      }
      if (a.inconsistent) return `dirty bitmap ${a.name} on node ${d.node} is inconsistent (QEMU stopped without saving it: killed or crashed)`;
      if (!a.recording) return `dirty bitmap ${a.name} on node ${d.node} was disabled (not recording writes)`;
    }
    return null;
  }

  private async ensureNbd(): Promise<string> {
    if (this.o.nbdSocket) return this.o.nbdSocket;
    const sock = this.ownNbd!;
    fs.mkdirSync(path.dirname(sock), { recursive: true, mode: 0o700 });
    if (this.nbdStarted) return sock;
    try {
      await this.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    } catch (err) {
      // an earlier agent process of ours started it and was killed: reuse it
      if (!(isQmpClass(err, /already running/i) && fs.existsSync(sock))) {
        if (isQmpClass(err, /already running/i)) throw trackerError(this.name, 'QEMU already runs an NBD server (one per process): pass its unix socket as nbdSocket', err);
        throw err;
      }
    }
    this.nbdStarted = true;
    return sock;
  }

  /**
   * Pauses the guest's CPUs (QMP `stop`) so a multi-machine group point has one instant on
   * every machine. Answers false when the guest was not running (then resumeGuest() must not
   * be called). Throws MOB_ERR_QEMU_TRACKER when this QEMU cannot pause a guest (a
   * qemu-storage-daemon has none).
   */
  pauseGuest(): Promise<boolean> {
    return this.serial(async () => {
      await this.reconnectIfNeeded();
      let st: { running: boolean };
      try {
        st = await this.qmp.execute<{ running: boolean }>('query-status');
      } catch (err) {
        if (err instanceof QmpCommandError && err.qmpClass === 'CommandNotFound') throw trackerError(this.name, 'this QEMU runs no guest it could pause (query-status is unknown: a storage daemon?)', err);
        throw err;
      }
      if (!st.running) return false;
      try {
        await this.qmp.execute('stop');
      } catch (err) {
        // no answer is not "not paused": a `stop` QEMU carries out late would leave the guest
        // paused for good (a refused one paused nothing, and a guest someone else paused meanwhile
        // stays so). QMP runs commands in order, so a `cont` sent now follows it (and is
        // harmless on a running guest); best effort: a QEMU that is gone has no guest to resume
        if (!(err instanceof QmpCommandError)) void this.qmp.execute('cont').catch(() => undefined);
        throw err;
      }
      return true;
    });
  }

  /** Resumes a guest pauseGuest() paused (QMP `cont`). */
  resumeGuest(): Promise<void> {
    return this.serial(async () => {
      await this.reconnectIfNeeded();
      await this.qmp.execute('cont');
    });
  }

  /**
   * A crash-consistent point of all the tracker's disks without stopping the guest: one QMP
   * transaction starts a copy-before-write view of every disk (blockdev-backup sync=none into a
   * temporary qcow2 in `dir` whose backing is the disk: a guest write first copies the old data
   * there) and rotates the bitmaps, at the same instant. Returns the extents written up to the
   * point (drained as by drain(), journaled likewise) and a DiskSource per disk that reads the
   * disks as they were at the point, while the guest goes on writing. end() removes the view;
   * until then every guest write to a block not yet copied costs QEMU one copy.
   */
  beginPoint(dir: string, journal?: DrainJournal, o?: HostPointOptions): Promise<QemuPoint> {
    return this.serial(async () => {
      if (this.closed) throw trackerError(this.name, 'beginPoint() after close()');
      // the view itself is crash-consistent: an application-consistent point is the caller's guest-agent freeze around it
      if (o?.consistency === 'application') throw trackerError(this.name, 'QEMU views are crash-consistent: freeze the guest through its guest agent around beginPoint() for an application-consistent point');
      await this.reconnectIfNeeded();
      const views = this.disks.map((d, i) => ({ disk: d, node: `${viewNodePrefix(this.name)}${i}`, job: `${this.name}-cbw-${i}`, file: path.join(dir, `${this.name}-fleece-${i}.qcow2`), added: false, started: false }));
      const sources: DiskSource[] = [];
      let ended = false;
      const end = async (): Promise<void> => {
        if (ended) return;
        ended = true;
        for (const s of sources) await s.close().catch(() => undefined);
        const gone = this.qmp.isClosed;
        for (const v of views) {
          if (v.started && !gone) {
            const cancelled = this.qmp.waitEvent('BLOCK_JOB_CANCELLED', (d) => d['device'] === v.job);
            cancelled.catch(() => undefined);
            if (await this.qmp.execute('block-job-cancel', { device: v.job, force: true }).then(() => true, () => false)) await cancelled.catch(() => undefined);
          }
          if (v.added && !gone) await this.qmp.execute('blockdev-del', { 'node-name': v.node }).catch(() => undefined);
          fs.rmSync(v.file, { force: true });
        }
      };
      try {
        for (const v of views) {
          await createQcow2(v.file, v.disk.sizeBytes);
          await this.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': v.node, file: { driver: 'file', filename: v.file }, backing: v.disk.node });
          v.added = true;
        }
        const backups = views.map((v) => ({ type: 'blockdev-backup', data: { 'job-id': v.job, device: v.disk.node, target: v.node, sync: 'none' } }));
        const extents = await this.drainNow(journal, backups, () => { for (const v of views) v.started = true; });
        for (const [i, v] of views.entries()) sources.push(await openFuseSource(this.qmp, { node: v.node, id: `${this.name}-point-${i}`, dir }));
        return { extents, sources, end: () => this.serial(end) };
      } catch (err) {
        await end();
        throw err;
      }
    });
  }

  private async drainNow(journal?: DrainJournal, extra: QmpAction[] = [], rotated?: () => void): Promise<DirtyExtent[]> {
    if (this.closed) throw trackerError(this.name, 'drain() after close()');
    await this.reconnectIfNeeded();
    if (this.staleExports) {
      await deleteOurExports(this.qmp, this.name);
      this.staleExports = false;
    }
    // the recording bitmap must still be recording: rotating would otherwise quietly replace one that
    // someone disabled (writes since then unrecorded) with a fresh one. selfCheck() says what differs.
    const problem = await this.check();
    if (problem) throw new MobilityError('MOB_ERR_TRACKING_LOST', `qemu tracker '${this.name}': ${problem}`);
    const all = this.disks.map((_, i) => i);
    const next = this.gen + 1;
    const frozen = `${this.name}.${this.gen}`;
    // the new bitmap starts recording while the old one still does (a write in between is in both:
    // read twice, never missed); the old one is disabled only after checking that nobody else
    // disabled it since the check above: QEMU has no transaction that tests it, and a rotation
    // that replaced a disabled bitmap would hide the writes it missed
    await rotate(this.qmp, this.disks, all, this.name, this.gen, next, this.o.granularity, 'keep', extra);
    rotated?.();
    const nodes = await queryNodes(this.qmp);
    const off = this.disks.find((d) => !ours(nodes.get(d.node), this.name).find((b) => b.gen === this.gen)?.info.recording);
    if (off) {
      // back to how the check would have found it: the old bitmap, disabled, and no new one
      await this.qmp.execute('transaction', { actions: this.disks.map((d) => ({ type: 'block-dirty-bitmap-remove', data: { node: d.node, name: `${this.name}.${next}` } })) }).catch(() => undefined);
      throw new MobilityError('MOB_ERR_TRACKING_LOST', `qemu tracker '${this.name}': dirty bitmap ${frozen} on node ${off.node} was disabled (not recording writes)`);
    }
    await this.qmp.execute('transaction', { actions: this.disks.map((d) => ({ type: 'block-dirty-bitmap-disable', data: { node: d.node, name: frozen } })) });
    this.gen = next;
    // earlier rounds' frozen bitmaps that were never removed: fold them into this round's (the
    // query above still holds for them: only this round's frozen one changed since)
    const leftovers: { node: string; names: string[] }[] = [];
    for (const d of this.disks) {
      const names = ours(nodes.get(d.node), this.name).filter((b) => b.gen < next && b.info.name !== frozen && !b.info.recording).map((b) => b.info.name);
      if (names.length) {
        await this.qmp.execute('block-dirty-bitmap-merge', { node: d.node, target: frozen, bitmaps: names });
        leftovers.push({ node: d.node, names });
      }
    }
    const sock = await this.ensureNbd();
    const out: DirtyExtent[] = [];
    for (const [i, d] of this.disks.entries()) {
      const id = `${this.name}-map-${i}`;
      const deleted = this.qmp.waitEvent('BLOCK_EXPORT_DELETED', (data) => data['id'] === id);
      deleted.catch(() => undefined);
      await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': d.node, name: id, writable: false, bitmaps: [frozen] });
      try {
        for (const e of await nbdDirtyMap(sock, id, frozen, this.o.nbdTimeoutMs)) out.push({ disk: i, ...e });
      } finally {
        // an export that could not be deleted now is deleted at the start of the next round
        if (await this.qmp.execute('block-export-del', { id }).then(() => true, () => false)) await deleted.catch(() => undefined);
        else this.staleExports = true;
      }
    }
    const extents = coalesceExtents(out);
    if (journal) {
      journal.beforeRead();
      journal.afterRead(Buffer.from(extents.map((e) => `Q ${e.disk} ${e.offset} ${e.length}\n`).join('')));
    }
    const removals = this.disks.map((d) => ({ type: 'block-dirty-bitmap-remove', data: { node: d.node, name: frozen } }));
    for (const l of leftovers) for (const n of l.names) removals.push({ type: 'block-dirty-bitmap-remove', data: { node: l.node, name: n } });
    await this.qmp.execute('transaction', { actions: removals });
    return extents;
  }
}

type QmpAction = { type: string; data: Record<string, unknown> };

/** A point-in-time view of every disk of the tracker, from beginPoint(): the host-mode seam's point. */
export type QemuPoint = HostPoint;

/** Longest unix socket path (sun_path is 108 bytes with its NUL; a little margin). */
const MAX_SOCKET_PATH = 100;
/** Where the tracker's own NBD socket goes when `<runDir>/<name>.nbd` is too long for a unix socket. */
export const SHORT_SOCKET_DIR = '/run/mobility/nbd';

function ownNbdSocket(runDir: string, name: string): string {
  const p = path.join(runDir, `${name}.nbd`);
  if (Buffer.byteLength(p) <= MAX_SOCKET_PATH) return p;
  return path.join(SHORT_SOCKET_DIR, `${createHash('sha256').update(p).digest('hex').slice(0, 16)}.sock`);
}

/**
 * Node names of a point's views: QEMU limits node names to 31 characters (tracker names may be
 * 64), so the views are named by a digest of the tracker's name.
 */
function viewNodePrefix(name: string): string {
  return `mv${createHash('sha256').update(name).digest('hex').slice(0, 12)}-`;
}

/** Drivers of protocol nodes (the file, device or network under a format node): never tracked themselves. */
const PROTOCOL_DRIVERS = new Set(['file', 'host_device', 'host_cdrom', 'nbd', 'nfs', 'ssh', 'iscsi', 'rbd', 'gluster', 'http', 'https', 'ftp', 'ftps', 'null-co', 'null-aio', 'io_uring', 'nvme', 'blkdebug', 'blkverify']);

/**
 * Each disk as the node it is now: a device name (query-block's device or qdev) resolves to the
 * node inserted in it, else the name must be a node's. The node must be a format node: a name
 * that now belongs to a protocol node (QEMU's automatic names move between starts) is refused.
 */
async function resolveDisks(qmp: QmpClient, name: string, disks: QemuDiskSpec[], nodes: Map<string, NodeInfo>): Promise<QemuDiskSpec[]> {
  const blocks = await qmp.execute<{ device?: string; qdev?: string; inserted?: { 'node-name'?: string } }[]>('query-block');
  const out: QemuDiskSpec[] = [];
  for (const d of disks) {
    const dev = blocks.find((b) => b.inserted?.['node-name'] && ((b.device && b.device === d.node) || (b.qdev && (b.qdev === d.node || b.qdev.endsWith(`/${d.node}`)))));
    const node = dev?.inserted?.['node-name'] ?? d.node;
    const n = nodes.get(node);
    if (!n) throw trackerError(name, `QEMU has no device or block node '${d.node}' (query-block, query-named-block-nodes)`);
    if (PROTOCOL_DRIVERS.has(n.drv)) throw trackerError(name, `'${d.node}' is the ${n.drv} protocol node ${node}, not a disk's format node (name the device, or the qcow2/raw node above it)`);
    out.push({ node });
  }
  if (new Set(out.map((d) => d.node)).size !== out.length) throw trackerError(name, 'two disks name the same block node');
  return out;
}

function addArgs(node: string, name: string, persistent: boolean, granularity?: number): Record<string, unknown> {
  return { node, name, persistent, ...(granularity ? { granularity } : {}) };
}

/**
 * Adds generation `to` on the given disks in one transaction (with `extra` actions), and does with
 * generation `from`: 'merge' folds it into the new one and removes it (a resumed disk moved to a
 * new common generation without losing what it recorded), 'disable' stops it, 'keep' leaves it
 * recording (the caller checks and disables it: see drainNow).
 */
async function rotate(qmp: QmpClient, disks: QemuTrackedDisk[], idx: number[], name: string, from: number, to: number, granularity: number | undefined, old: 'merge' | 'disable' | 'keep', extra: QmpAction[] = []): Promise<void> {
  const actions: QmpAction[] = [...extra];
  for (const i of idx) {
    const d = disks[i]!;
    actions.push({ type: 'block-dirty-bitmap-add', data: addArgs(d.node, `${name}.${to}`, d.persistent, granularity) });
    if (old === 'merge') {
      actions.push({ type: 'block-dirty-bitmap-merge', data: { node: d.node, target: `${name}.${to}`, bitmaps: [`${name}.${from}`] } });
      actions.push({ type: 'block-dirty-bitmap-remove', data: { node: d.node, name: `${name}.${from}` } });
    } else if (old === 'disable') {
      actions.push({ type: 'block-dirty-bitmap-disable', data: { node: d.node, name: `${name}.${from}` } });
    }
  }
  await qmp.execute('transaction', { actions });
}

async function queryNodes(qmp: QmpClient): Promise<Map<string, NodeInfo>> {
  const list = await qmp.execute<NodeInfo[]>('query-named-block-nodes', { flat: true });
  return new Map(list.map((n) => [n['node-name'], n]));
}

type OurBitmap = { gen: number; info: BitmapInfo & { name: string } };

function ours(n: NodeInfo | undefined, name: string): OurBitmap[] {
  const out: OurBitmap[] = [];
  for (const b of n?.['dirty-bitmaps'] ?? []) {
    if (typeof b.name !== 'string' || !b.name.startsWith(`${name}.`)) continue; // a block job's bitmap has no name
    const g = b.name.slice(name.length + 1);
    if (/^[1-9]\d{0,14}$/.test(g)) out.push({ gen: Number(g), info: { ...b, name: b.name } });
  }
  return out;
}

/** Why the bitmaps found on a node cannot be resumed (null: they can). */
function resumeProblem(node: string, n: NodeInfo, mine: OurBitmap[], gen: number, persistent: boolean): string | null {
  if (!mine.length) {
    return `no dirty bitmap of this tracker on node ${node}: first protection, or `
      + (persistent
        ? 'QEMU was killed or crashed before it ever stored the bitmap in the image (it does at a clean stop), or the bitmap was removed, or the image replaced'
        : `QEMU restarted (on a ${n.drv} image the bitmap lives only in QEMU's memory)`);
  }
  const bad = mine.find((b) => b.info.inconsistent);
  if (bad) return `dirty bitmap ${bad.info.name} on node ${node} is inconsistent (QEMU stopped without saving it: killed or crashed)`;
  const active = mine.filter((b) => b.info.recording);
  if (active.length !== 1) return `node ${node} has ${active.length} recording bitmaps of this tracker (expected 1): tracking was disabled or tampered with`;
  if (active[0]!.gen !== gen) return `the recording bitmap on node ${node} is ${active[0]!.info.name}, older than another disk's: the disks were not rotated together`;
  return null;
}

/**
 * What a killed agent of this tracker may have left in QEMU: read exports (bitmap maps, FUSE
 * views), point-in-time jobs and their nodes. Their temporary image files are in the directory
 * the caller gave beginPoint(); QEMU no longer holds them afterwards.
 */
async function removeLeftovers(qmp: QmpClient, name: string): Promise<void> {
  await deleteOurExports(qmp, name, `${name}-`);
  const jobs = await qmp.execute<{ device: string }[]>('query-block-jobs');
  for (const j of jobs) {
    if (!j.device.startsWith(`${name}-cbw-`)) continue;
    const cancelled = qmp.waitEvent('BLOCK_JOB_CANCELLED', (d) => d['device'] === j.device);
    cancelled.catch(() => undefined);
    await qmp.execute('block-job-cancel', { device: j.device, force: true });
    await cancelled;
  }
  for (const n of (await queryNodes(qmp)).keys()) {
    if (n.startsWith(viewNodePrefix(name))) await qmp.execute('blockdev-del', { 'node-name': n });
  }
}

async function deleteOurExports(qmp: QmpClient, name: string, prefix = `${name}-map-`): Promise<void> {
  const list = await qmp.execute<{ id: string }[]>('query-block-exports');
  for (const e of list) {
    if (!e.id.startsWith(prefix)) continue;
    const deleted = qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d['id'] === e.id);
    deleted.catch(() => undefined);
    // hard: drop any client still connected (an nbdinfo of a killed agent)
    await qmp.execute('block-export-del', { id: e.id, mode: 'hard' });
    await deleted;
  }
}

function createQcow2(file: string, sizeBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(sizeBytes)], { timeout: 30_000 }, (err, _out, errOut) => {
      if (err) reject(new MobilityError('MOB_ERR_QEMU_TRACKER', `cannot create the point-in-time image ${file}: ${String(errOut).trim() || err.message}`, { cause: err }));
      else resolve();
    });
  });
}

/** Dirty extents of `bitmap` in NBD export `exportName` at unix socket `sock`, via `nbdinfo --map --json`. */
export async function nbdDirtyMap(sock: string, exportName: string, bitmap: string, timeoutMs = 60_000): Promise<{ offset: number; length: number }[]> {
  const uri = `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(sock)}`;
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile('nbdinfo', [`--map=qemu:dirty-bitmap:${bitmap}`, '--json', uri], { timeout: timeoutMs, maxBuffer: NBDINFO_MAX_OUTPUT, killSignal: 'SIGKILL' }, (err, out, errOut) => {
      if (err) {
        const e = err as NodeJS.ErrnoException & { killed?: boolean };
        const why = e.code === 'ENOENT' ? 'nbdinfo is not installed (Debian package libnbd-bin)' : e.killed ? `nbdinfo did not finish within ${timeoutMs} ms` : `nbdinfo failed: ${String(errOut).trim() || e.message}`;
        reject(new MobilityError('MOB_ERR_NBD', `${why} (${uri}, bitmap ${bitmap})`, { cause: err }));
      } else {
        resolve(out);
      }
    });
  });
  let list: { offset: number; length: number; type: number }[];
  try {
    list = JSON.parse(stdout) as typeof list;
    if (!Array.isArray(list)) throw new Error('not a list');
  } catch (err) {
    throw new MobilityError('MOB_ERR_NBD', `nbdinfo --map printed something that is not a JSON extent list (${uri})`, { cause: err });
  }
  const out: { offset: number; length: number }[] = [];
  for (const e of list) {
    if (!Number.isSafeInteger(e.offset) || !Number.isSafeInteger(e.length)) throw new MobilityError('MOB_ERR_NBD', `nbdinfo --map printed a bad extent ${JSON.stringify(e)} (${uri})`);
    // NBD_STATE_DIRTY is bit 0 of the qemu:dirty-bitmap context
    if (e.type & 1) out.push({ offset: e.offset, length: e.length });
  }
  return out;
}

/**
 * The bitmap prefix of one agent installation for one protected machine (a VM): its id plus a
 * digest of the state directory, within QEMU's name rules for this tracker ([A-Za-z0-9_-], 64).
 */
export function qemuTrackerName(agentId: string, stateDir: string): string {
  return `mob-${agentId.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 40)}-${installIdOf(stateDir).slice(0, 8)}`;
}

/**
 * DirtyJournal: the agent's durable set of blocks that changed on the source
 * and are not yet known to be on the target, per disk, fed by the tracker.
 *
 * Files in the agent state directory (mode 0600):
 *   dirty.snap  JSON snapshot: dirty blocks (dirty + in flight) per disk, the
 *               tracker's loss counters, disks that need a scan, replaced atomically
 *   dirty.log.N lines appended with write(2) (no fsync) since snapshot N-1 was
 *               captured (a capture switches to a new log; writing the snapshot
 *               deletes the logs it includes):
 *                 "B n"        a drain of the tracker begins (events leave the kernel)
 *                 "D id a-b,…" blocks a..b of the disk with that id became dirty
 *                 "R"          a read of the trace is about to happen
 *                 "R x y"      the same, from copy x of a tracker that records every
 *                              change twice; copy y still holds what this read takes
 *                 "T len\n" + len raw bytes   what that read returned (len 0: nothing,
 *                              and after "R x y": copy x is empty now)
 *                 "X x"        copy x may hold changes its twin lacks (the twin is newer)
 *                 "E n"        the drain's blocks are all logged
 *
 * Why no fsync: these files must survive the agent being killed, which page-cache
 * writes do; a machine crash loses the tracefs instance too, and that always means
 * a scan. A "B" without its "E" means the agent died in the middle of a drain: its raw
 * trace text ("T" records) is replayed through the tracker's parser. When the last
 * record is an "R" (killed inside a read, or between it and the record of what it
 * returned), what that read took is not in the journal:
 *   - "R" (a tracker with one copy): those events are lost, and open() reports it
 *     (torn): the caller scans;
 *   - "R x y": copy y still holds them (its own reads were all logged, so everything
 *     it gave up is in the journal and everything after is still in it) and the next
 *     drain reads them from there: nothing is lost. Until y has been read empty once
 *     (a "T 0" after "R y x"), y is the only holder, like a copy named by "X y": a read
 *     of a sole holder cut short is torn (two kills in a row inside the first drain).
 *     Which copies are sole holders is restated ("X") at the head of each new log, so a
 *     snapshot deleting the old logs forgets nothing.
 *
 * The snapshot is taken together with the digest map (snapshot(): the caller
 * serialises the map in the same tick), so a block leaves the persisted dirty set
 * only once a persisted map holds what the target acknowledged for it. On open,
 * every block in the set must be treated as unknown to the map (the target may
 * hold a newer version than the map says): see forgetInMap() in the protector.
 */
import fs from 'node:fs';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import type { DrainJournal, DrainSource } from './tracker/change-tracker.js';

export interface JournalDisk { id: string; sizeBytes: number; blockSize: number }
export interface LossBaseline { overrun: number; dropped: number; lostNotices: number }

interface SnapFile {
  version: 1;
  disks: Record<string, { blockSize: number; sizeBytes: number; blocks: [number, number][]; scanRequired: string | null }>;
  counters: LossBaseline;
  savedAt: string;
  /** Logs with a lower number are included in this snapshot. */
  logGen: number;
}

/** Inclusive ranges of a sorted list of block numbers. */
export function toRanges(blocks: number[]): [number, number][] {
  const out: [number, number][] = [];
  for (const b of blocks) {
    const last = out[out.length - 1];
    if (last && b === last[1] + 1) last[1] = b;
    else if (!last || b > last[1]) out.push([b, b]);
  }
  return out;
}

export class DiskDirt {
  /** block -> time (ms) it first became dirty since it was last acknowledged */
  readonly dirty = new Map<number, number>();
  /** blocks handed to the shipper, not yet acknowledged -> time first dirty */
  readonly inflight = new Map<number, number>();
  /** Why this disk needs a scan before tracking can be trusted again (null: it does not). */
  scanRequired: string | null = null;
  constructor(readonly id: string, readonly blockSize: number, readonly sizeBytes: number) {}
  get blocks(): number { return Math.ceil(this.sizeBytes / this.blockSize); }
  /** Bytes not yet acknowledged (dirty + in flight). */
  backlogBytes(): number {
    let n = this.dirty.size;
    for (const b of this.inflight.keys()) if (!this.dirty.has(b)) n++;
    const last = this.blocks - 1;
    const short = this.blockSize - (this.sizeBytes - last * this.blockSize);
    return n * this.blockSize - (this.dirty.has(last) || this.inflight.has(last) ? short : 0);
  }
  /** Age of the oldest unacknowledged change, ms (0 when none). */
  oldestMs(now = Date.now()): number {
    let oldest = now;
    for (const t of this.dirty.values()) if (t < oldest) oldest = t;
    for (const t of this.inflight.values()) if (t < oldest) oldest = t;
    return now - oldest;
  }
}

export class DirtyJournal implements DrainJournal {
  readonly disks: DiskDirt[];
  counters: LossBaseline = { overrun: 0, dropped: 0, lostNotices: 0 };
  private drainNo = 0;
  private logFd: number;
  private logBytes = 0;
  /** Copies of the tracker that may hold changes no other copy holds (see "X" in the file head). */
  private readonly sole = new Set<string>();
  /** The copy the last beforeRead() named (null: a tracker with one copy). */
  private reading: DrainSource | null = null;

  private constructor(readonly dir: string, disks: DiskDirt[], private logGen: number) {
    this.disks = disks;
    this.logFd = fs.openSync(this.logPath(logGen), 'a', 0o600);
    this.logBytes = fs.fstatSync(this.logFd).size;
  }

  get snapFile(): string { return path.join(this.dir, 'dirty.snap'); }
  private logPath(gen: number): string { return path.join(this.dir, `dirty.log.${gen}`); }
  /** Bytes in the current log (the caller snapshots when it grows). */
  get logSize(): number { return this.logBytes; }

  /**
   * Loads the journal for these disks. found=false when there was none (first start);
   * torn=true when the agent died mid-drain (the caller must scan every disk).
   * A disk whose geometry changed since the snapshot gets scanRequired.
   */
  static open(dir: string, disks: JournalDisk[], replayRaw?: (text: string) => { disk: number; offset: number; length: number }[]): { journal: DirtyJournal; found: boolean; torn: boolean } {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const dd = disks.map((d) => new DiskDirt(d.id, d.blockSize, d.sizeBytes));
    const byId = new Map(dd.map((d, i) => [d.id, i]));
    let found = false;
    let torn = false;
    let counters: LossBaseline = { overrun: 0, dropped: 0, lostNotices: 0 };
    const snapPath = path.join(dir, 'dirty.snap');
    let snap: SnapFile | null = null;
    try {
      snap = JSON.parse(fs.readFileSync(snapPath, 'utf8')) as SnapFile;
      if (snap.version !== 1) throw new Error('unsupported version');
      found = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `dirty-block snapshot ${snapPath} is unreadable: ${(err as Error).message}`);
      }
    }
    const now = Date.now();
    if (snap) {
      counters = snap.counters;
      for (const d of dd) {
        const s = snap.disks[d.id];
        if (!s) { d.scanRequired = 'disk was not tracked before'; continue; }
        if (s.blockSize !== d.blockSize || s.sizeBytes !== d.sizeBytes) { d.scanRequired = 'disk geometry or block size changed'; continue; }
        d.scanRequired = s.scanRequired;
        for (const [a, b] of s.blocks) for (let x = a; x <= b; x++) d.dirty.set(x, now);
      }
    } else {
      for (const d of dd) d.scanRequired = 'no tracking state (first start)';
    }
    const snapGen = snap?.logGen ?? 0;
    const gens = fs.readdirSync(dir).map((f) => /^dirty\.log\.(\d+)$/.exec(f)).filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1])).sort((a, b) => a - b);
    const parts: Buffer[] = [];
    for (const g of gens) {
      if (g < snapGen) { fs.rmSync(path.join(dir, `dirty.log.${g}`), { force: true }); continue; }
      parts.push(fs.readFileSync(path.join(dir, `dirty.log.${g}`)));
    }
    const buf = Buffer.concat(parts);
    if (buf.length) found = true;
    const markRange = (d: DiskDirt, a: number, b: number) => { for (let x = a; x <= b; x++) if (x < d.blocks) d.dirty.set(x, now); };
    const pending: { disk: number; offset: number; length: number }[] = [];
    let open: { n: string; raw: Buffer[]; last: 'B' | 'R' | 'T'; from: DrainSource | null } | null = null;
    let maxDrain = 0;
    const sole = new Set<string>();
    let reading: DrainSource | null = null;
    // a drain that never logged its end: replay its raw trace; a read whose result is missing
    // is recovered from the other copy when there is one that still holds it, else torn
    const settleOpen = () => {
      if (!open) return;
      if (!replayRaw) torn = true;
      else if (open.last === 'R') {
        if (!open.from || sole.has(open.from.name)) torn = true;
        else sole.add(open.from.heldBy);
      }
      if (replayRaw) {
        const text = Buffer.concat(open.raw).toString('utf8');
        const nl = text.lastIndexOf('\n');
        if (nl >= 0) pending.push(...replayRaw(text.slice(0, nl)));
      }
      open = null;
    };
    let pos = 0;
    while (pos < buf.length) {
      const nl = buf.indexOf(10, pos);
      // a half-written last record: only a cut "T" header (or its data) means a read's result is lost
      if (nl < 0) { if (open && buf[pos] === 0x54) open.last = 'R'; break; }
      const line = buf.toString('utf8', pos, nl);
      pos = nl + 1;
      const kind = line[0];
      if (kind === 'B') {
        settleOpen();
        open = { n: line.slice(2), raw: [], last: 'B', from: null };
        maxDrain = Math.max(maxDrain, Number(open.n) || 0);
      } else if (kind === 'R') {
        const m = /^R ([a-z]+) ([a-z]+)$/.exec(line);
        reading = m ? { name: m[1]!, heldBy: m[2]! } : null;
        if (open) { open.last = 'R'; open.from = reading; }
      } else if (kind === 'T') {
        const len = Number(line.slice(2));
        if (!Number.isSafeInteger(len) || len < 0 || pos + len > buf.length) { if (open) open.last = 'R'; break; }
        if (open) { open.raw.push(buf.subarray(pos, pos + len)); open.last = 'T'; }
        // that copy was read empty: whatever it held is in the journal now (as afterRead() does live)
        if (len === 0 && reading) sole.delete(reading.name);
        reading = null;
        pos += len;
      } else if (kind === 'X') {
        const m = /^X ([a-z]+)$/.exec(line);
        if (m) sole.add(m[1]!);
        else if (open) { open.last = 'R'; open.from = null; } else torn = true;
      } else if (kind === 'E') {
        if (open && open.n === line.slice(2)) open = null; // its D lines are complete
      } else if (kind === 'D') {
        const m = /^D ([A-Za-z0-9._-]+) ([\d,-]+)$/.exec(line);
        if (!m) { if (open) { open.last = 'R'; open.from = null; } else torn = true; continue; }
        const idx = byId.get(m[1]);
        const d = idx === undefined ? undefined : dd[idx];
        if (!d) continue;
        for (const r of m[2].split(',')) {
          const [a, b] = r.split('-').map(Number);
          markRange(d, a, b ?? a);
        }
      }
    }
    settleOpen();
    for (const e of pending) {
      const d = dd[e.disk];
      if (!d || e.length <= 0) continue;
      markRange(d, Math.floor(e.offset / d.blockSize), Math.floor((e.offset + e.length - 1) / d.blockSize));
    }
    const j = new DirtyJournal(dir, dd, Math.max(snapGen, gens[gens.length - 1] ?? 0));
    j.counters = counters;
    j.drainNo = maxDrain; // drain numbers stay unique across runs (a torn drain is never matched by a later one)
    // a copy found sole holder by this replay (a read of its twin cut short) is logged as such: the
    // replayed log does not say it by itself (its drain is settled only by the next "B")
    for (const x of sole) j.soleHolder(x);
    return { journal: j, found, torn };
  }

  private append(s: string): void {
    const b = Buffer.from(s);
    fs.writeSync(this.logFd, b);
    this.logBytes += b.length;
  }

  /** Logs the start of a drain; call immediately before taking events out of the kernel. */
  beginDrain(): number {
    this.append(`B ${++this.drainNo}\n`);
    return this.drainNo;
  }

  /** Marks byte ranges dirty (logged before returning). */
  addExtents(extents: { disk: number; offset: number; length: number }[], now = Date.now()): void {
    const per = new Map<number, number[]>();
    for (const e of extents) {
      const d = this.disks[e.disk];
      if (!d || e.length <= 0) continue;
      const a = Math.floor(e.offset / d.blockSize);
      const b = Math.min(d.blocks - 1, Math.floor((e.offset + e.length - 1) / d.blockSize));
      let list = per.get(e.disk);
      if (!list) per.set(e.disk, (list = []));
      for (let x = a; x <= b; x++) {
        if (!d.dirty.has(x)) {
          // a write after the in-flight copy was read: its age starts now (the older write is in flight)
          d.dirty.set(x, now);
          list.push(x);
        }
      }
    }
    for (const [disk, list] of per) {
      if (!list.length) continue;
      list.sort((x, y) => x - y);
      this.append(`D ${this.disks[disk].id} ${toRanges(list).map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(',')}\n`);
    }
  }

  /** The tracker is about to read the trace, from copy source.name when it keeps two (see DrainJournal). */
  beforeRead(source?: DrainSource): void {
    if (source && !(/^[a-z]+$/.test(source.name) && /^[a-z]+$/.test(source.heldBy))) {
      throw new MobilityError('MOB_ERR_INTERNAL', `invalid trace copy names ${JSON.stringify(source)}`);
    }
    this.reading = source ?? null;
    this.append(source ? `R ${source.name} ${source.heldBy}\n` : 'R\n');
  }

  /** What the read returned, raw, in one write with its header. */
  afterRead(raw: Buffer): void {
    const rec = Buffer.concat([Buffer.from(`T ${raw.length}\n`), raw]);
    fs.writeSync(this.logFd, rec);
    this.logBytes += rec.length;
    if (raw.length === 0 && this.reading) this.sole.delete(this.reading.name);
    this.reading = null;
  }

  /** Copy `name` of the tracker may hold changes its twin lacks, until it is read empty (see DrainJournal). */
  soleHolder(name: string): void {
    if (!/^[a-z]+$/.test(name)) throw new MobilityError('MOB_ERR_INTERNAL', `invalid trace copy name ${JSON.stringify(name)}`);
    this.sole.add(name);
    this.append(`X ${name}\n`);
  }

  /** Copies that may hold changes no other copy holds (tests and diagnostics). */
  get soleHolders(): string[] { return [...this.sole].sort(); }

  /** Logs the end of drain n: everything it took from the kernel is logged. */
  endDrain(n: number): void {
    this.append(`E ${n}\n`);
  }

  /**
   * Moves up to max dirty blocks of a disk to in flight, oldest change first (a Map keeps
   * insertion order, and a block re-enters it when dirtied again), so a hot region cannot
   * starve the rest of the disk. A block still in
   * flight is not taken again until it is settled: one version of a block is in flight at
   * a time, so an ack never settles a newer write than the one it carried.
   */
  take(disk: number, max: number): number[] {
    const d = this.disks[disk];
    const blocks: number[] = [];
    for (const b of d.dirty.keys()) {
      if (blocks.length >= max) break;
      if (!d.inflight.has(b)) blocks.push(b);
    }
    for (const b of blocks) {
      d.inflight.set(b, d.dirty.get(b)!);
      d.dirty.delete(b);
    }
    return blocks;
  }

  /** The target acknowledged these blocks (or they needed nothing): no longer in flight. A block dirtied again meanwhile stays dirty. */
  settle(disk: number, blocks: number[]): void {
    const d = this.disks[disk];
    for (const b of blocks) d.inflight.delete(b);
  }

  /** Puts in-flight blocks back (connection lost before their ack). */
  requeue(disk: number, blocks?: number[]): void {
    const d = this.disks[disk];
    for (const b of blocks ?? [...d.inflight.keys()]) {
      const t = d.inflight.get(b);
      if (t === undefined) continue;
      d.inflight.delete(b);
      if (!d.dirty.has(b)) d.dirty.set(b, t);
    }
  }

  /**
   * Captures what a snapshot will hold, synchronously (call in the same tick as
   * serialising the digest map), and returns a function that writes it and
   * empties the log.
   */
  snapshot(): () => void {
    const snap: SnapFile = { version: 1, disks: {}, counters: { ...this.counters }, savedAt: new Date().toISOString(), logGen: 0 };
    for (const d of this.disks) {
      const blocks = [...new Set([...d.dirty.keys(), ...d.inflight.keys()])].sort((a, b) => a - b);
      snap.disks[d.id] = { blockSize: d.blockSize, sizeBytes: d.sizeBytes, blocks: toRanges(blocks), scanRequired: d.scanRequired };
    }
    // what is logged from now on goes to a new log, which this snapshot does not include
    const gen = this.logGen + 1;
    snap.logGen = gen;
    fs.closeSync(this.logFd);
    this.logGen = gen;
    this.logFd = fs.openSync(this.logPath(gen), 'a', 0o600);
    this.logBytes = 0;
    // the logs this snapshot replaces may be all that said so
    for (const x of this.sole) this.append(`X ${x}\n`);
    const body = JSON.stringify(snap);
    return () => {
      const tmp = `${this.snapFile}.tmp`;
      fs.writeFileSync(tmp, body, { mode: 0o600 });
      fs.renameSync(tmp, this.snapFile);
      for (let g = gen - 1; g >= 0; g--) {
        if (!fs.existsSync(this.logPath(g))) break;
        fs.rmSync(this.logPath(g), { force: true });
      }
    };
  }

  close(): void {
    try { fs.closeSync(this.logFd); } catch { /* closed */ }
  }
}

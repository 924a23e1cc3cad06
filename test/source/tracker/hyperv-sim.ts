/**
 * SimHost: a simulated Hyper-V host with one VM, for the Hyper-V tracker's tests.
 *
 * A MOCK, by necessity: Hyper-V, Windows and PowerShell cannot run on the Linux machines this
 * project is tested on. SimHost decodes each script the tracker sends (the one line
 * wrapForInvoke() makes), reads its arguments back from the single quoted JSON literal, and
 * answers as the WMI methods and storage cmdlets are documented to:
 *   - CreateReferencePoint records each disk's RCT id; GetVirtualDiskChanges lists what was
 *     written since an RCT id, a bounded amount per call, and refuses an id of a reset log;
 *   - CreateSnapshot (recovery) freezes each disk's VHDX (a copy of the disk's bytes at that
 *     instant, when the disk has data); the VM writes on to its differencing disk. Changes listed
 *     on a frozen VHDX end at the snapshot; ConvertToReferencePoint makes a reference point at the
 *     snapshot's instant and merges the snapshot away; DestroySnapshot merges it away. Neither
 *     merges a VHDX that is mounted;
 *   - Mount-VHD -ReadOnly attaches a VHDX that is not in use by the running VM (a frozen parent
 *     or a free-standing file) as disk N; reads of \\.\PhysicalDriveN must be whole 512-byte
 *     sectors and are served from the local file standing for the VHDX, base64-encoded.
 * What only a real host could show (that the scripts run, that Hyper-V behaves as documented)
 * is not shown by this: the README says so.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { HyperVShell } from '../../../src/source/tracker/hyperv-script.js';

export const GiB = 2 ** 30;

export interface SimDisk { id: string; path: string; size: number; format: string; epoch: number; file?: string }
interface Write { seq: number; disk: string; offset: number; length: number }
interface Snapshot { id: string; seq: number; consistencyLevel: number; frozen: Map<string, string | undefined> }

export class SimHost implements HyperVShell {
  version = '10.0';
  disks: SimDisk[] = [
    { id: 'Microsoft:AAAA\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\0\\0\\D', path: 'D:\\VMs\\app01\\disk0.vhdx', size: 8 * GiB, format: 'VHDX', epoch: 0 },
    { id: 'Microsoft:AAAA\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\0\\1\\D', path: 'D:\\VMs\\app01\\data.vhdx', size: 2 * GiB, format: 'VHDX', epoch: 0 },
  ];
  seq = 0;
  writes: Write[] = [];
  points = new Map<string, { disks: string[]; rct: string[] }>();
  snapshots = new Map<string, Snapshot>();
  nextPoint = 1;
  scripts: string[] = [];
  /** Fails the next script whose title matches. */
  failNext: RegExp | null = null;
  /** Fails every script whose title matches. */
  failAlways: RegExp | null = null;
  /** Bytes GetVirtualDiskChanges processes per call (it may process less than asked). */
  perCall = 3 * GiB;
  changeCalls = 0;
  closed = false;
  /** VHDX files that are not a disk of the VM (path -> local file), mountable. */
  files = new Map<string, string>();
  /** Attached VHDX: path -> disk number. */
  mounts = new Map<string, number>();
  nextDiskNumber = 3;
  /** Bytes asked per read script call. */
  readCalls: number[] = [];
  /** The next read answers this many bytes fewer than it read. */
  shortBy = 0;
  /** The next read answers data that is not base64. */
  corrupt = false;

  constructor(readonly vmName = 'app01') {}

  /** Gives each disk a local sparse file of its size standing for its VHDX (small disks only). */
  withData(dir: string, sizes: number[]): this {
    this.disks = sizes.map((size, i) => {
      const file = path.join(dir, `disk${i}.img`);
      fs.writeFileSync(file, '');
      fs.truncateSync(file, size);
      return { id: `Microsoft:AAAA\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\0\\${i}\\D`, path: `D:\\VMs\\app01\\disk${i}.vhdx`, size, format: 'VHDX', epoch: 0, file };
    });
    return this;
  }

  /** The guest writes `length` bytes at `offset` of disk i (bytes `fill`, when the disk has data). */
  write(disk: number, offset: number, length: number, fill = 0): void {
    const d = this.disks[disk]!;
    this.writes.push({ seq: ++this.seq, disk: d.id, offset, length });
    if (d.file) {
      const fd = fs.openSync(d.file, 'r+');
      try { fs.writeSync(fd, Buffer.alloc(length, fill), 0, length, offset); } finally { fs.closeSync(fd); }
    }
  }

  /** The disk's bytes now (the guest's view). */
  live(disk: number): Buffer {
    return fs.readFileSync(this.disks[disk]!.file!);
  }

  /** The disk's change log is reset (edited offline, compacted): RCT ids given before are refused. */
  resetRct(disk: number): void {
    this.disks[disk]!.epoch++;
  }

  private rctOf(d: SimDisk, seq = this.seq): string {
    return `rct:{${d.id}}:${d.epoch}:${seq}`;
  }

  /** The snapshot that froze this VHDX path, if any. */
  private frozenBy(p: string): Snapshot | undefined {
    for (const s of this.snapshots.values()) if (s.frozen.has(p)) return s;
    return undefined;
  }

  private merge(s: Snapshot): string | null {
    for (const p of s.frozen.keys()) if (this.mounts.has(p)) return `The operation cannot be performed while the object is in use: ${p} is mounted`;
    for (const f of s.frozen.values()) if (f) fs.rmSync(f, { force: true });
    this.snapshots.delete(s.id);
    return null;
  }

  async run(line: string): Promise<string> {
    const m = /FromBase64String\('([A-Za-z0-9+/=]+)'\)/.exec(line);
    if (!m) throw new Error(`not a wrapped script: ${line.slice(0, 80)}`);
    const text = Buffer.from(m[1]!, 'base64').toString('utf8');
    this.scripts.push(text);
    const title = text.split('\n')[0]!;
    // a PowerShell single-quoted literal: any of the four quote characters ends it unless doubled
    const lit = /^\$a = ConvertFrom-Json '((?:[^'\u2018-\u201B]|(['\u2018-\u201B])\2)*)'$/m.exec(text);
    if (!lit) throw new Error('no arguments line');
    const a = JSON.parse(lit[1]!.replace(/(['\u2018-\u201B])\1/g, '$1')) as Record<string, unknown>;
    const fail = (why: string) => `MOBILITY-FAIL MOB_ERR_HYPERV ${why}\n`;
    if ((this.failNext && this.failNext.test(title)) || (this.failAlways && this.failAlways.test(title))) {
      if (this.failNext?.test(title)) this.failNext = null;
      return fail('The WMI provider failed (simulated)');
    }
    const json = (o: unknown) => `some host output\nMOBILITY-JSON ${JSON.stringify(o)}\n`;
    const one = <T>(l: T[]): T | T[] => (l.length === 1 ? l[0]! : l); // ConvertTo-Json prints a one-element array as the element
    if (title.includes('Describe a VM')) {
      if (a.vm !== this.vmName) return fail(`no virtual machine named ${String(a.vm)} on this host`);
      const p = typeof a.base === 'string' ? this.points.get(a.base) : undefined;
      const disks = this.disks.map((d) => ({ id: d.id, path: d.path, sizeBytes: d.size, format: d.format }));
      return json({ vm: 'GUID', version: this.version, disks: one(disks), base: p ? { id: a.base, disks: p.disks, rct: p.rct } : null });
    }
    if (title.includes('Create an RCT reference point')) {
      if (a.vm !== this.vmName) return fail(`no virtual machine named ${String(a.vm)} on this host`);
      const id = `Microsoft:RP-${this.nextPoint++}`;
      const p = { disks: this.disks.map((d) => d.id), rct: this.disks.map((d) => this.rctOf(d)) };
      this.points.set(id, p);
      return json({ id, disks: p.disks, rct: p.rct });
    }
    if (title.includes('List the changes')) {
      const out = (a.disks as { path: string; sizeBytes: number; since: string }[]).map((q) => {
        const d = this.disks.find((x) => x.path === q.path)!;
        // a frozen VHDX holds the writes up to its snapshot; later ones are in the differencing disk
        const upTo = this.frozenBy(q.path)?.seq ?? Infinity;
        const mm = /^rct:\{(.*)\}:(\d+):(\d+)$/.exec(q.since);
        const offsets: number[] = [];
        const lengths: number[] = [];
        let at = 0;
        while (at < q.sizeBytes) {
          this.changeCalls++;
          if (!mm || mm[1] !== d.id || Number(mm[2]) !== d.epoch) {
            return { path: q.path, offsets, lengths, lost: `GetVirtualDiskChanges returned 32773 for ${q.path} since RCT id ${q.since}` };
          }
          const end = Math.min(q.sizeBytes, at + this.perCall);
          for (const w of this.writes) {
            if (w.disk !== d.id || w.seq <= Number(mm[3]) || w.seq > upTo || w.offset + w.length <= at || w.offset >= end) continue;
            const s = Math.max(w.offset, at);
            offsets.push(s);
            lengths.push(Math.min(w.offset + w.length, end) - s);
          }
          at = end;
        }
        return { path: q.path, offsets: one(offsets), lengths: one(lengths), lost: null };
      });
      return json({ disks: one(out) });
    }
    if (title.includes('Destroy an RCT reference point')) {
      const had = this.points.delete(String(a.id));
      return json({ destroyed: had });
    }
    if (title.includes('Create a recovery checkpoint')) {
      if (a.vm !== this.vmName) return fail(`no virtual machine named ${String(a.vm)} on this host`);
      if (this.snapshots.size) return fail('the virtual machine already has a recovery checkpoint in progress (simulated: one at a time)');
      const id = `Microsoft:SNAP-${this.nextPoint++}`;
      const frozen = new Map<string, string | undefined>();
      for (const d of this.disks) {
        const copy = d.file ? `${d.file}.${this.nextPoint}.parent` : undefined;
        if (copy) fs.copyFileSync(d.file!, copy);
        frozen.set(d.path, copy);
      }
      this.snapshots.set(id, { id, seq: this.seq, consistencyLevel: Number(a.consistencyLevel), frozen });
      // the snapshot's own disk settings: "Microsoft:<snapshot>\<the VM disk's controller and location>"
      const disks = this.disks.map((d) => ({ id: `Microsoft:SNAP${this.nextPoint}${d.id.slice(d.id.indexOf('\\'))}`, path: d.path }));
      return json({ id, type: 'Microsoft:Hyper-V:Snapshot:Recovery', disks: one(disks) });
    }
    if (title.includes('Convert a recovery checkpoint')) {
      const s = this.snapshots.get(String(a.id));
      if (!s) return fail(`recovery checkpoint ${String(a.id)} no longer exists`);
      const why = this.merge(s);
      if (why) return fail(`ConvertToReferencePoint failed: job state 10: ${why}`);
      const id = `Microsoft:RP-${this.nextPoint++}`;
      const p = { disks: this.disks.map((d) => d.id), rct: this.disks.map((d) => this.rctOf(d, s.seq)) };
      this.points.set(id, p);
      return json({ id, disks: p.disks, rct: p.rct });
    }
    if (title.includes('Destroy a recovery checkpoint')) {
      const s = this.snapshots.get(String(a.id));
      if (s) {
        const why = this.merge(s);
        if (why) return fail(`DestroySnapshot failed: job state 10: ${why}`);
      }
      return json({ destroyed: !!s });
    }
    if (title.includes('Mount a virtual hard disk')) {
      const p = String(a.path);
      const file = this.fileOf(p);
      if (file === null) return fail(`The process cannot access the file because it is being used by another process: ${p}`);
      if (file === undefined) return fail(`The system cannot find the file specified: ${p}`);
      let n = this.mounts.get(p);
      if (n === undefined) this.mounts.set(p, n = this.nextDiskNumber++);
      return json({ disk: n, size: fs.statSync(file).size, sector: 512 });
    }
    if (title.includes('Read ranges of a mounted')) {
      const p = String(a.path);
      const n = Number(a.disk);
      if (this.mounts.get(p) !== n) return fail(`disk ${n} is no longer ${p}: the virtual hard disk was dismounted`);
      const file = this.fileOf(p)!;
      const ranges = a.ranges as { offset: number; length: number }[];
      this.readCalls.push(ranges.reduce((s, r) => s + r.length, 0));
      const fd = fs.openSync(file, 'r');
      try {
        const out = ranges.map((r) => {
          if (r.offset % 512 || r.length % 512) throw new Error(`unaligned read of \\\\.\\PhysicalDrive${n}: ${r.offset}+${r.length}`);
          const buf = Buffer.alloc(r.length);
          let got = fs.readSync(fd, buf, 0, r.length, r.offset);
          if (this.shortBy) { got = Math.max(0, got - this.shortBy); this.shortBy = 0; }
          const data = this.corrupt ? '<not base64>' : buf.subarray(0, got).toString('base64');
          this.corrupt = false;
          return { offset: r.offset, length: got, data };
        });
        return json({ ranges: one(out) });
      } finally {
        fs.closeSync(fd);
      }
    }
    if (title.includes('Dismount a virtual hard disk')) {
      const had = this.mounts.delete(String(a.path));
      return json({ dismounted: had });
    }
    throw new Error(`unknown script: ${title}`);
  }

  /** The local file a VHDX path reads from: a free-standing file, a frozen parent; null when the running VM holds it. */
  private fileOf(p: string): string | null | undefined {
    if (this.files.has(p)) return this.files.get(p);
    const s = this.frozenBy(p);
    if (s) return s.frozen.get(p);
    if (this.disks.some((d) => d.path === p)) return null;
    return undefined;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

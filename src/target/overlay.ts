/**
 * What the replica stores share about accepted writes that are not yet applied (or confirmed):
 *
 * - WriteOverlay: the pending writes, indexed by range, so a read sees the newest content at
 *   once (a block whose changed pages arrive is patched on top of what the replica holds,
 *   accepted writes included). Writes of a disk may overlap (a block written twice, a span of a
 *   block over an earlier whole block): the later one wins on the bytes both cover.
 * - resolveOverlaps: a batch's writes as disjoint, sorted pieces, the later write winning.
 */
import type { WriteOp } from './replica-store.js';

/** Pending writes are found through the 1 MiB slices of the disk they touch. */
const SLICE_SHIFT = 20;

/** A piece of a resolved batch: [start, end) gets data (from data[dataOffset]) or zeros. */
export interface Seg { start: number; end: number; data: Buffer | null; dataOffset: number }

export class WriteOverlay {
  private nextId = 0;
  private readonly byId = new Map<number, WriteOp>();
  /** Ids of the pending writes touching each slice, oldest first. */
  private readonly slices = new Map<number, number[]>();

  get size(): number { return this.byId.size; }

  /** Adds writes (in submission order); returns their ids, for remove(). */
  add(ops: WriteOp[]): number[] {
    const ids: number[] = [];
    for (const op of ops) {
      const id = this.nextId++;
      this.byId.set(id, op);
      ids.push(id);
      for (let s = sliceOf(op.offset), last = sliceOf(op.offset + Math.max(op.length, 1) - 1); s <= last; s++) {
        const l = this.slices.get(s);
        if (l) l.push(id);
        else this.slices.set(s, [id]);
      }
    }
    return ids;
  }

  /** Removes writes that are applied (the oldest ones, in the usual case). */
  remove(ids: readonly number[]): void {
    for (const id of ids) {
      const op = this.byId.get(id);
      if (!op) continue;
      this.byId.delete(id);
      for (let s = sliceOf(op.offset), last = sliceOf(op.offset + Math.max(op.length, 1) - 1); s <= last; s++) {
        const l = this.slices.get(s);
        if (!l) continue;
        const at = l[0] === id ? 0 : l.indexOf(id);
        if (at >= 0) l.splice(at, 1);
        if (l.length === 0) this.slices.delete(s);
      }
    }
  }

  clear(): void {
    this.byId.clear();
    this.slices.clear();
  }

  /** The pending writes that overlap [start, end), oldest first. */
  overlapping(start: number, end: number): WriteOp[] {
    if (end <= start || this.byId.size === 0) return [];
    const first = sliceOf(start);
    const last = sliceOf(end - 1);
    let ids: number[] = [];
    for (let s = first; s <= last; s++) {
      const l = this.slices.get(s);
      if (l) ids = ids.length ? ids.concat(l) : l.slice();
    }
    if (last > first) ids = [...new Set(ids)].sort((a, b) => a - b);
    const out: WriteOp[] = [];
    for (const id of ids) {
      const op = this.byId.get(id)!;
      if (op.offset < end && op.offset + op.length > start) out.push(op);
    }
    return out;
  }

  /**
   * The newest content of [start, end) when the pending writes cover all of it (a copy), else
   * null with `pieces`: copies of the parts they cover, oldest first, to lay over what the
   * replica holds (overlayInto). Copies, because a pending write's data is staging memory,
   * reused as soon as its batch is durable, which may happen while the caller reads the rest.
   */
  read(start: number, end: number): { whole: Buffer | null; pieces: WriteOp[] } {
    const over = this.overlapping(start, end);
    if (over.length && covers(over, start, end)) {
      const buf = Buffer.alloc(end - start);
      for (const op of over) overlayInto(buf, start, op);
      return { whole: buf, pieces: [] };
    }
    const pieces = over.map((op) => {
      const s = Math.max(op.offset, start);
      const e = Math.min(op.offset + op.length, end);
      return { offset: s, length: e - s, data: op.data ? Buffer.from(op.data.subarray(s - op.offset, e - op.offset)) : null };
    });
    return { whole: null, pieces };
  }
}

function sliceOf(offset: number): number {
  return Math.floor(offset / 2 ** SLICE_SHIFT);
}

/** Lays an op's bytes (its data, or zeros when null) over buf, which holds [at, at + buf.length). */
export function overlayInto(buf: Buffer, at: number, op: WriteOp): void {
  const s = Math.max(op.offset, at);
  const e = Math.min(op.offset + op.length, at + buf.length);
  if (e <= s) return;
  if (op.data) op.data.copy(buf, s - at, s - op.offset, e - op.offset);
  else buf.fill(0, s - at, e - at);
}

/** True when the ops together cover every byte of [start, end). */
export function covers(ops: readonly WriteOp[], start: number, end: number): boolean {
  const rs = ops.map((o) => [o.offset, o.offset + o.length] as const).sort((a, b) => a[0] - b[0]);
  let at = start;
  for (const [s, e] of rs) {
    if (s > at) return false;
    if (e > at) at = e;
    if (at >= end) return true;
  }
  return at >= end;
}

/** Disjoint, sorted pieces of `ops` where a later op wins over an earlier one on the bytes both cover. */
export function resolveOverlaps(ops: readonly WriteOp[]): Seg[] {
  const idx = ops.map((_, i) => i).filter((i) => ops[i].length > 0);
  idx.sort((a, b) => ops[a].offset - ops[b].offset || a - b);
  let overlap = false;
  for (let k = 1; k < idx.length && !overlap; k++) {
    const p = ops[idx[k - 1]];
    if (ops[idx[k]].offset < p.offset + p.length) overlap = true;
  }
  if (!overlap) return idx.map((i) => ({ start: ops[i].offset, end: ops[i].offset + ops[i].length, data: ops[i].data, dataOffset: 0 }));
  // sweep over the boundaries; the active op with the highest index (the latest) owns each piece
  const bounds = [...new Set(idx.flatMap((i) => [ops[i].offset, ops[i].offset + ops[i].length]))].sort((a, b) => a - b);
  const heap: number[] = []; // max-heap of op indices
  const push = (v: number) => {
    heap.push(v);
    for (let c = heap.length - 1; c > 0;) {
      const p = (c - 1) >> 1;
      if (heap[p] >= heap[c]) break;
      [heap[p], heap[c]] = [heap[c], heap[p]];
      c = p;
    }
  };
  const pop = () => {
    const top = heap[0];
    const last = heap.pop()!;
    if (heap.length) {
      heap[0] = last;
      for (let p = 0; ;) {
        const l = 2 * p + 1;
        const r = l + 1;
        let m = p;
        if (l < heap.length && heap[l] > heap[m]) m = l;
        if (r < heap.length && heap[r] > heap[m]) m = r;
        if (m === p) break;
        [heap[p], heap[m]] = [heap[m], heap[p]];
        p = m;
      }
    }
    return top;
  };
  const out: Seg[] = [];
  let k = 0;
  for (let b = 0; b < bounds.length - 1; b++) {
    const s = bounds[b];
    const e = bounds[b + 1];
    while (k < idx.length && ops[idx[k]].offset <= s) push(idx[k++]);
    while (heap.length && ops[heap[0]].offset + ops[heap[0]].length <= s) pop();
    if (!heap.length) continue;
    const op = ops[heap[0]];
    const last = out[out.length - 1];
    if (last && last.end === s && last.data === op.data && (op.data === null || last.dataOffset + (last.end - last.start) === s - op.offset)) {
      last.end = e;
    } else {
      out.push({ start: s, end: e, data: op.data, dataOffset: s - op.offset });
    }
  }
  return out;
}

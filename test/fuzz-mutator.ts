/**
 * Seeded mutation of protocol frames for the server fuzz test: a small PRNG, a
 * protobuf wire-format reader/writer (to shuffle, duplicate, drop and retype
 * fields of a valid header) and byte-level operators (bit flips, truncation,
 * bad length prefixes, splices). Everything is a pure function of the seed.
 */

/** sfc32 seeded through splitmix32: fast, good enough, reproducible. */
export class Rng {
  private a: number; private b: number; private c: number; private d: number;
  constructor(seed: number) {
    let s = seed >>> 0;
    const next = () => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next(); this.b = next(); this.c = next(); this.d = next();
    for (let i = 0; i < 12; i++) this.u32();
  }
  u32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t >>> 0;
  }
  /** 0 <= n < max */
  int(max: number): number { return max <= 1 ? 0 : Math.floor((this.u32() / 4294967296) * max); }
  range(lo: number, hi: number): number { return lo + this.int(hi - lo + 1); }
  chance(p: number): boolean { return this.u32() / 4294967296 < p; }
  pick<T>(a: readonly T[]): T { return a[this.int(a.length)]; }
  private pool: Buffer | null = null;
  bytes(n: number): Buffer {
    if (n > 256) {
      // large buffers: a copy from a seeded 1 MiB pool at a random offset (cheap, still reproducible)
      if (!this.pool) this.pool = new Rng(this.u32()).smallBytes(1 << 20);
      const out = Buffer.allocUnsafe(n);
      for (let o = 0; o < n;) {
        const from = this.int(this.pool.length - 1);
        const len = Math.min(n - o, this.pool.length - from);
        this.pool.copy(out, o, from, from + len);
        o += len;
      }
      return out;
    }
    return this.smallBytes(n);
  }
  private smallBytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      for (let j = 0; j < 4 && i + j < n; j++) b[i + j] = (v >>> (8 * j)) & 0xff;
    }
    return b;
  }
  /** Picks a key of `weights` with probability proportional to its weight. */
  weighted<K extends string>(weights: Record<K, number>): K {
    const keys = Object.keys(weights) as K[];
    let total = 0;
    for (const k of keys) total += weights[k];
    let r = (this.u32() / 4294967296) * total;
    for (const k of keys) {
      r -= weights[k];
      if (r < 0) return k;
    }
    return keys[keys.length - 1];
  }
}

/** Edge values for integer fields (as uint64). */
export const EDGE_INTS: readonly bigint[] = [
  0n, 1n, 2n, 7n, 63n, 64n, 65n, 511n, 512n, 4095n, 4096n, 65535n, 65536n, 65537n, 0x7fffffffn, 0x80000000n, 0xffffffffn, 0x100000000n,
  (1n << 52n), (1n << 53n) - 1n, (1n << 53n), (1n << 53n) + 1n, (1n << 63n), (1n << 64n) - 1n, 21990232555520n /* 20 TiB */,
];

// ---- protobuf wire format ----

export interface WireField { tag: number; wt: number; v: bigint | Buffer; overlong?: number }

function readVarint(b: Buffer, o: number): [bigint, number] | null {
  let r = 0n;
  let shift = 0n;
  for (let i = 0; i < 10; i++) {
    if (o + i >= b.length) return null;
    const x = b[o + i];
    r |= BigInt(x & 0x7f) << shift;
    if (!(x & 0x80)) return [r & ((1n << 64n) - 1n), o + i + 1];
    shift += 7n;
  }
  return null;
}

export function varint(v: bigint, overlong = 0): Buffer {
  const out: number[] = [];
  let x = BigInt.asUintN(64, v);
  do {
    let byte = Number(x & 0x7fn);
    x >>= 7n;
    if (x > 0n || overlong > 0) byte |= 0x80;
    out.push(byte);
  } while (x > 0n);
  // an overlong encoding: continuation bytes of zero (still decodes to the same value, up to 10 bytes)
  for (let i = 0; i < overlong; i++) out.push(i === overlong - 1 ? 0x00 : 0x80);
  return Buffer.from(out);
}

/** Parses a protobuf message into its fields, or null if it is not well-formed wire format. */
export function parseWire(b: Buffer): WireField[] | null {
  const out: WireField[] = [];
  let o = 0;
  while (o < b.length) {
    const k = readVarint(b, o);
    if (!k) return null;
    o = k[1];
    const tag = Number(k[0] >> 3n);
    const wt = Number(k[0] & 7n);
    if (tag === 0) return null;
    if (wt === 0) {
      const v = readVarint(b, o);
      if (!v) return null;
      out.push({ tag, wt, v: v[0] });
      o = v[1];
    } else if (wt === 1 || wt === 5) {
      const n = wt === 1 ? 8 : 4;
      if (o + n > b.length) return null;
      out.push({ tag, wt, v: b.subarray(o, o + n) });
      o += n;
    } else if (wt === 2) {
      const l = readVarint(b, o);
      if (!l || l[1] + Number(l[0]) > b.length) return null;
      out.push({ tag, wt, v: b.subarray(l[1], l[1] + Number(l[0])) });
      o = l[1] + Number(l[0]);
    } else {
      return null;
    }
  }
  return out;
}

export function encodeWire(fields: WireField[]): Buffer {
  const parts: Buffer[] = [];
  for (const f of fields) {
    parts.push(varint((BigInt(f.tag) << 3n) | BigInt(f.wt)));
    if (f.wt === 0) parts.push(varint(f.v as bigint, f.overlong ?? 0));
    else if (f.wt === 2) { parts.push(varint(BigInt((f.v as Buffer).length))); parts.push(f.v as Buffer); }
    else parts.push(f.v as Buffer);
  }
  return Buffer.concat(parts);
}

/** One structural mutation of a parsed message (recursing into sub-messages). */
function mutateFields(rng: Rng, fields: WireField[], depth: number): WireField[] {
  const f = [...fields];
  const op = rng.int(10);
  if (f.length === 0 || op === 0) {
    // insert a field: known or unknown tag, any wire type
    const tag = rng.chance(0.5) ? rng.range(1, 16) : rng.pick([17, 100, 1000, 536870911]);
    const wt = rng.pick([0, 1, 2, 5]);
    const v = wt === 0 ? rng.pick(EDGE_INTS) : wt === 2 ? rng.bytes(rng.int(24)) : rng.bytes(wt === 1 ? 8 : 4);
    f.splice(rng.int(f.length + 1), 0, { tag, wt, v });
    return f;
  }
  const i = rng.int(f.length);
  switch (op) {
    case 1: { // shuffle
      for (let k = f.length - 1; k > 0; k--) { const j = rng.int(k + 1); [f[k], f[j]] = [f[j], f[k]]; }
      return f;
    }
    case 2: f.splice(rng.int(f.length + 1), 0, f[i]); return f; // duplicate (last one wins, or repeats)
    case 3: f.splice(i, 1); return f; // drop
    case 4: { // retype: the same bytes under another wire type
      const wt = rng.pick([0, 1, 2, 5].filter((w) => w !== f[i].wt));
      const raw = f[i].v instanceof Buffer ? f[i].v as Buffer : varint(f[i].v as bigint);
      f[i] = { tag: f[i].tag, wt, v: wt === 0 ? rng.pick(EDGE_INTS) : wt === 2 ? raw : Buffer.concat([raw, Buffer.alloc(8)]).subarray(0, wt === 1 ? 8 : 4) };
      return f;
    }
    case 5: f[i] = { ...f[i], tag: rng.chance(0.7) ? rng.range(1, 16) : rng.range(17, 2000) }; return f; // renumber
    default: {
      const x = f[i];
      if (x.wt === 0) { f[i] = { ...x, v: rng.chance(0.7) ? rng.pick(EDGE_INTS) : (x.v as bigint) ^ (1n << BigInt(rng.int(64))) }; return f; }
      if (x.wt === 2) {
        const sub = depth < 4 ? parseWire(x.v as Buffer) : null;
        if (sub && sub.length && rng.chance(0.7)) { f[i] = { ...x, v: encodeWire(mutateFields(rng, sub, depth + 1)) }; return f; }
        const b = Buffer.from(x.v as Buffer);
        const k = rng.int(4);
        if (k === 0 && b.length) f[i] = { ...x, v: b.subarray(0, rng.int(b.length)) };
        else if (k === 1) f[i] = { ...x, v: Buffer.concat([b, rng.bytes(rng.range(1, 16))]) };
        else if (k === 2 && b.length) { b[rng.int(b.length)] ^= 1 << rng.int(8); f[i] = { ...x, v: b }; }
        else f[i] = { ...x, v: rng.chance(0.5) ? Buffer.alloc(0) : rng.bytes(rng.range(1, 300)) };
        return f;
      }
      const b = Buffer.from(x.v as Buffer);
      b[rng.int(b.length)] ^= 1 << rng.int(8);
      f[i] = { ...x, v: b };
      return f;
    }
  }
}

/** Splits a message into its length-prefixed header and its payload (no validation). */
export function splitMessage(msg: Buffer): { header: Buffer; payload: Buffer } {
  const hl = msg.length >= 4 ? Math.min(msg.readUInt32BE(0), msg.length - 4) : 0;
  return { header: msg.subarray(4, 4 + hl), payload: msg.subarray(4 + hl) };
}

export function joinMessage(header: Buffer, payload: Buffer, prefix = header.length): Buffer {
  const out = Buffer.allocUnsafe(4 + header.length + payload.length);
  out.writeUInt32BE(prefix >>> 0, 0);
  header.copy(out, 4);
  payload.copy(out, 4 + header.length);
  return out;
}

export type ByteMutation = 'noncanonical' | 'fields' | 'bitflip-header' | 'bitflip-payload' | 'truncate' | 'extend' | 'length-prefix' | 'payload-length' | 'splice' | 'garbage' | 'tiny';

/** Applies one mutation to an encoded message (`other` makes a second valid message, for splices). */
export function mutateMessage(rng: Rng, msg: Buffer, other: () => Buffer, kind: ByteMutation): Buffer {
  const { header, payload } = splitMessage(msg);
  switch (kind) {
    case 'fields': {
      const outer = parseWire(header);
      if (!outer) return mutateMessage(rng, msg, other, 'bitflip-header');
      let fields = outer;
      // mostly inside the message body (the oneof's sub-message), sometimes the outer Frame itself
      if (fields.length === 1 && fields[0].wt === 2 && rng.chance(0.85)) {
        const inner = parseWire(fields[0].v as Buffer) ?? [];
        let m = inner;
        for (let n = rng.range(1, 3); n > 0; n--) m = mutateFields(rng, m, 1);
        fields = [{ ...fields[0], v: encodeWire(m) }];
      } else {
        fields = mutateFields(rng, fields, 0);
      }
      return joinMessage(encodeWire(fields), payload);
    }
    case 'noncanonical': {
      // the same message in an unusual but legal encoding: unknown fields, overlong varints,
      // reordered and repeated fields (a lenient decoder accepts it; the session goes on)
      const outer = parseWire(header);
      if (!outer || outer.length !== 1 || outer[0].wt !== 2) return mutateMessage(rng, msg, other, 'fields');
      let inner = parseWire(outer[0].v as Buffer) ?? [];
      for (let n = rng.range(1, 3); n > 0; n--) {
        const op = rng.int(4);
        if (op === 0) {
          const wt = rng.pick([0, 1, 2, 5]);
          const v = wt === 0 ? rng.pick(EDGE_INTS) : wt === 1 ? rng.bytes(8) : wt === 5 ? rng.bytes(4) : rng.bytes(rng.int(12));
          inner.splice(rng.int(inner.length + 1), 0, { tag: rng.range(20, 5000), wt, v });
        }
        else if (op === 1) inner = inner.map((f) => (f.wt === 0 && rng.chance(0.5) ? { ...f, overlong: rng.range(1, 3) } : f));
        else if (op === 2) { for (let k = inner.length - 1; k > 0; k--) { const j = rng.int(k + 1); [inner[k], inner[j]] = [inner[j], inner[k]]; } }
        else if (inner.length) { const f = inner[rng.int(inner.length)]; if (f.wt !== 2) inner.unshift({ ...f, v: f.wt === 0 ? rng.pick(EDGE_INTS) : f.v }); }
      }
      const fields: WireField[] = [{ ...outer[0], v: encodeWire(inner) }];
      if (rng.chance(0.2)) fields.push({ tag: rng.range(16, 99), wt: 0, v: 1n });
      return joinMessage(encodeWire(fields), payload);
    }
    case 'bitflip-header': {
      const h = Buffer.from(header);
      for (let n = rng.range(1, 6); n > 0 && h.length; n--) h[rng.int(h.length)] ^= 1 << rng.int(8);
      return joinMessage(h, payload);
    }
    case 'bitflip-payload': {
      if (!payload.length) return mutateMessage(rng, msg, other, 'extend');
      const p = Buffer.from(payload);
      for (let n = rng.range(1, 4); n > 0; n--) p[rng.int(p.length)] ^= 1 << rng.int(8);
      return joinMessage(header, p);
    }
    case 'truncate': return msg.subarray(0, rng.int(msg.length));
    case 'extend': return Buffer.concat([msg, rng.chance(0.5) ? Buffer.alloc(rng.range(1, 4096)) : rng.bytes(rng.range(1, 4096))]);
    case 'length-prefix': {
      const out = Buffer.from(msg);
      const v = rng.pick([0, 1, header.length - 1, header.length + 1, msg.length - 4, msg.length, 256 * 1024, 256 * 1024 + 1, 0x7fffffff, 0xffffffff, rng.u32()]);
      if (out.length >= 4) out.writeUInt32BE(Math.max(0, v) >>> 0, 0);
      return out;
    }
    case 'payload-length': {
      // keep the header, give it a payload of another length (bad payload lengths)
      const n = rng.pick([0, 1, payload.length - 1, payload.length + 1, payload.length * 2, 4096, 65536]);
      return joinMessage(header, rng.chance(0.5) ? Buffer.alloc(Math.max(0, n)) : rng.bytes(Math.max(0, n)));
    }
    case 'splice': {
      const a = msg.subarray(0, rng.int(msg.length + 1));
      const o = other();
      const b = o.subarray(rng.int(o.length + 1));
      return rng.chance(0.5) ? Buffer.concat([a, b]) : Buffer.concat([msg, o]);
    }
    case 'garbage': {
      const g = rng.bytes(rng.range(4, 512));
      if (rng.chance(0.5)) g.writeUInt32BE(g.length - 4 - rng.int(Math.min(8, g.length - 4)), 0);
      return g;
    }
    case 'tiny': return rng.bytes(rng.int(4));
  }
}

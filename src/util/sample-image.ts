/**
 * Generates a disk image of mixed content for the demo, tests and benchmarks:
 * about 25% zeros, 25% random bytes and 50% text-like data, in 256 KiB
 * regions chosen by a seeded generator (the same seed gives the same image).
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';

const WORDS = ('the replica store keeps recovery points for every protected machine and disk while the agent tracks '
  + 'changed blocks compresses them and streams frames to the process server which verifies digests before writing '
  + 'log entries configuration policy retention snapshot consistent failover network latency throughput error warning '
  + 'kernel filesystem ext4 journal inode superblock sector device partition volume mount service daemon status').split(' ');

export function prng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s / 0x100000000;
  };
}

export function textPool(bytes: number, seed = 7): Buffer {
  const rnd = prng(seed);
  const parts: string[] = [];
  let n = 0;
  while (n < bytes) {
    let line = `${Math.floor(rnd() * 1e9)} ${new Date(1.7e12 + Math.floor(rnd() * 1e10)).toISOString()} `;
    const words = 6 + Math.floor(rnd() * 12);
    for (let i = 0; i < words; i++) line += WORDS[Math.floor(rnd() * WORDS.length)] + (rnd() < 0.1 ? ', ' : ' ');
    line += '\n';
    parts.push(line);
    n += line.length;
  }
  return Buffer.from(parts.join('')).subarray(0, bytes);
}

export type RegionKind = 'zero' | 'random' | 'text';
export const REGION_BYTES = 256 * 1024;

/** Which kind each region of an image of `size` bytes is, for `seed`. */
export function regionKinds(size: number, seed: number): RegionKind[] {
  const rnd = prng(seed * 7919 + 1);
  const out: RegionKind[] = [];
  for (let o = 0; o < size; o += REGION_BYTES) {
    const r = rnd();
    out.push(r < 0.25 ? 'zero' : r < 0.5 ? 'random' : 'text');
  }
  return out;
}

export async function writeSampleImage(file: string, size: number, seed = 1): Promise<{ kinds: RegionKind[] }> {
  const pool = textPool(16 * 1024 * 1024, seed);
  const rnd = prng(seed);
  const kinds = regionKinds(size, seed);
  const fh = await fsp.open(file, 'w');
  try {
    await fh.truncate(size);
    const chunk = Buffer.alloc(4 * 1024 * 1024);
    for (let base = 0; base < size; base += chunk.length) {
      const len = Math.min(chunk.length, size - base);
      let allZero = true;
      for (let o = 0; o < len; o += REGION_BYTES) {
        const k = kinds[(base + o) / REGION_BYTES];
        const rl = Math.min(REGION_BYTES, len - o);
        if (k === 'zero') chunk.fill(0, o, o + rl);
        else if (k === 'random') { crypto.randomFillSync(chunk, o, rl); allZero = false; }
        else { const from = Math.floor(rnd() * (pool.length - rl)); pool.copy(chunk, o, from, from + rl); allZero = false; }
      }
      if (!allZero) await fh.write(chunk, 0, len, base); // zero chunks stay holes
    }
  } finally {
    await fh.close();
  }
  return { kinds };
}

/**
 * Rewrites `fraction` of the image in writes of 4..64 KiB (4 KiB aligned) at random
 * offsets, with content like the region written (text into zero regions), optionally only
 * within regions of one kind. Returns the bytes written per kind.
 */
export async function churnImage(file: string, size: number, fraction: number, seed: number, kinds?: RegionKind[], only?: RegionKind): Promise<Record<RegionKind, number>> {
  const rnd = prng(seed + 1000);
  const pool = textPool(4 * 1024 * 1024, seed + 2000);
  const k = kinds ?? regionKinds(size, 1);
  const target = Math.floor(size * fraction);
  const written: Record<RegionKind, number> = { zero: 0, random: 0, text: 0 };
  const fh = await fsp.open(file, 'r+');
  try {
    let done = 0;
    while (done < target) {
      const len = 4096 * (1 + Math.floor(rnd() * 16));
      const off = Math.floor((rnd() * (size - len)) / 4096) * 4096;
      const region = k[Math.floor(off / REGION_BYTES)] ?? 'text';
      if (only && (region !== only || k[Math.floor((off + len - 1) / REGION_BYTES)] !== only)) continue;
      // a write into free (zero) space is new file data: text-like
      const kind: RegionKind = region === 'zero' ? 'text' : region;
      let buf: Buffer;
      if (kind === 'text') { const from = Math.floor(rnd() * (pool.length - len)); buf = pool.subarray(from, from + len); }
      else buf = crypto.randomBytes(len);
      await fh.write(buf, 0, len, off);
      written[kind] += len;
      done += len;
    }
  } finally {
    await fh.close();
  }
  return written;
}

export async function sha256File(file: string, length?: number): Promise<string> {
  const h = crypto.createHash('sha256');
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    let pos = 0;
    for (;;) {
      const want = length === undefined ? buf.length : Math.min(buf.length, length - pos);
      if (want <= 0) break;
      const { bytesRead } = await fh.read(buf, 0, want, pos);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

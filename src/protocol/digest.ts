/**
 * Digests: xxh64 (non-cryptographic, ~9 GB/s on 64 KiB blocks). Page digests drive
 * change detection; a block digest lets the receiver verify a block before persisting it.
 * Integrity against an attacker comes from TLS, not from these digests.
 */
import { xxh64 } from '@node-rs/xxhash';

export const DIGEST_BYTES = 8;

export function digest(buf: Uint8Array): bigint {
  return xxh64(buf);
}

export function digestBytes(buf: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(DIGEST_BYTES);
  out.writeBigUInt64LE(xxh64(buf), 0);
  return out;
}

export function digestEquals(buf: Uint8Array, expected: Uint8Array): boolean {
  if (expected.length !== DIGEST_BYTES) return false;
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  return b.readBigUInt64LE(0) === xxh64(buf);
}

/** Fills `out[first..]` with the digest of each page of `data` (the last page may be short). */
export function pageDigests(data: Uint8Array, pageSize: number, out: BigUint64Array, first = 0): number {
  let n = 0;
  for (let o = 0; o < data.length; o += pageSize) {
    out[first + n++] = xxh64(data.subarray(o, Math.min(o + pageSize, data.length)));
  }
  return n;
}

const ZEROS = Buffer.alloc(1024 * 1024);
export function isZero(buf: Uint8Array): boolean {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let o = 0; o < b.length; o += ZEROS.length) {
    const len = Math.min(ZEROS.length, b.length - o);
    if (!b.subarray(o, o + len).equals(ZEROS.subarray(0, len))) return false;
  }
  return true;
}

export function zeroBuffer(len: number): Buffer {
  return len <= ZEROS.length ? ZEROS.subarray(0, len) : Buffer.alloc(len);
}

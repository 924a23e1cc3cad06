/**
 * Per-block compression with the lz4 block API. A block that does not shrink
 * is sent raw; an all-zero block is sent as a flag with no payload.
 */
import lz4 from 'lz4';
import { Encoding } from './frame-codec.js';
import { isZero } from './digest.js';
import { MobilityError } from '../errors.js';

export interface EncodedBlock { encoding: Encoding; payload: Buffer }

/**
 * When the agent compresses: `auto` (the default) only while the link is what holds the
 * shipping back (bytes wait in the agent's socket, or a bandwidth limit is set), because
 * lz4 costs CPU on both ends and buys nothing when the network keeps up; `always` on every
 * block (metered links); `never` sends blocks raw.
 */
export type CompressMode = 'auto' | 'always' | 'never';

export function parseCompressMode(s: string): CompressMode {
  if (s === 'auto' || s === 'always' || s === 'never') return s;
  throw new MobilityError('MOB_ERR_USAGE', `--compress must be auto, always or never, got ${JSON.stringify(s)}`);
}

/** Whether a block is compressed now: `linkBusy` = the link, not this side, is the bottleneck. */
export function shouldCompress(mode: CompressMode, linkBusy: () => boolean): boolean {
  return mode === 'always' || (mode === 'auto' && linkBusy());
}

/** Largest lz4 output for `len` input bytes: the size of a scratch buffer for encodeBlock. */
export function encodeBound(len: number): number {
  return lz4.encodeBound(len);
}

/** Encodes `data` (a whole block, or the concatenated changed pages of one). */
export function encodeBlock(data: Buffer, compress: boolean, scratch?: Buffer): EncodedBlock {
  if (isZero(data)) return { encoding: Encoding.ZERO, payload: Buffer.alloc(0) };
  if (compress) {
    const bound = lz4.encodeBound(data.length);
    const out = scratch && scratch.length >= bound ? scratch : Buffer.allocUnsafe(bound);
    const n = lz4.encodeBlock(data, out) as number;
    // keep only a real gain: lz4 block output must be noticeably smaller than raw
    if (n > 0 && n < data.length - data.length / 64) return { encoding: Encoding.LZ4, payload: Buffer.from(out.subarray(0, n)) };
  }
  return { encoding: Encoding.RAW, payload: data };
}

/** Decodes a block payload into exactly `expectedLen` bytes, or throws MOB_ERR_FRAME_MALFORMED. */
export function decodeBlock(encoding: Encoding, payload: Buffer, expectedLen: number, out?: Buffer): Buffer {
  switch (encoding) {
    case Encoding.ZERO:
      if (payload.length !== 0) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'zero block carries a payload');
      return out ? out.fill(0, 0, expectedLen).subarray(0, expectedLen) : Buffer.alloc(expectedLen);
    case Encoding.RAW:
      if (payload.length !== expectedLen) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `raw block of ${payload.length} bytes, expected ${expectedLen}`);
      return payload;
    case Encoding.LZ4: {
      const dst = out && out.length >= expectedLen ? out.subarray(0, expectedLen) : Buffer.allocUnsafe(expectedLen);
      let n: number;
      try {
        n = lz4.decodeBlock(payload, dst) as number;
      } catch (err) {
        throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `lz4 block does not decode: ${(err as Error).message}`);
      }
      if (n !== expectedLen) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `lz4 block decodes to ${n} bytes, expected ${expectedLen}`);
      return dst;
    }
    default:
      throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `unknown block encoding ${String(encoding)}`);
  }
}

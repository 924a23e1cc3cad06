/**
 * DigestMap: the source's durable record of what the target holds, one xxh64
 * per page. An entry is set only after the target acknowledged that page as
 * durable, so the map never claims more than the replica has: after any crash
 * the worst case is resending pages the target already had.
 * A digest of 0n means "unknown" (always resent).
 *
 * Besides the page digests the map keeps one digest per transfer block (the
 * xxh64 of the whole block as the target holds it): a scan hashes each block
 * once and looks at its pages only when the block digest differs, which makes
 * an incremental scan of an unchanged block one hash call instead of sixteen.
 * A block digest is a cache: 0n (unknown) falls back to the page comparison.
 *
 * File format (v2): u32 BE header length | JSON header | pages * 8 bytes (LE)
 *   | blocks * 8 bytes (LE) | u64 LE xxh64 of all before.
 * v1 files (no block digests) still load; their block digests start unknown.
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';
import { MobilityError } from '../errors.js';
import { writeFileDurable } from '../util/durable-file.js';

export interface DigestMapHeader {
  version: 1 | 2;
  diskId: string;
  diskSize: number;
  pageSize: number;
  /** Replica generation this map describes; a different generation invalidates the map. */
  generation: string;
  /** Block size the block digests are for (v2); block digests are dropped when a pass uses another. */
  blockSize?: number;
}

export class DigestMap {
  readonly pages: number;
  readonly digests: BigUint64Array;
  /** Whole-block digests for header.blockSize (empty when the block size is unknown). */
  blockDigests: BigUint64Array;
  dirty = false;

  constructor(readonly header: DigestMapHeader, digests?: BigUint64Array, blockDigests?: BigUint64Array) {
    this.pages = Math.ceil(header.diskSize / header.pageSize);
    this.digests = digests ?? new BigUint64Array(this.pages);
    const bs = header.blockSize;
    this.blockDigests = blockDigests ?? new BigUint64Array(bs ? Math.ceil(header.diskSize / bs) : 0);
  }

  /** Makes the block digests describe `blockSize` blocks, forgetting them if they were for another size. */
  useBlockSize(blockSize: number): void {
    if (this.header.blockSize === blockSize && this.blockDigests.length === Math.ceil(this.header.diskSize / blockSize)) return;
    this.header.blockSize = blockSize;
    this.blockDigests = new BigUint64Array(Math.ceil(this.header.diskSize / blockSize));
    this.dirty = true;
  }

  setBlock(block: number, d: bigint): void {
    this.blockDigests[block] = d === 0n ? 1n : d;
    this.dirty = true;
  }

  /** Forgets what the target holds for a block (its pages and block digest become unknown: always resent). */
  forgetBlock(block: number, blockSize: number): void {
    const per = blockSize / this.header.pageSize;
    const first = block * per;
    this.digests.fill(0n, Math.min(first, this.pages), Math.min(first + per, this.pages));
    if (this.header.blockSize === blockSize && block < this.blockDigests.length) this.blockDigests[block] = 0n;
    this.dirty = true;
  }

  /** Number of pages with a known digest. */
  knownPages(): number {
    let n = 0;
    for (let i = 0; i < this.pages; i++) if (this.digests[i] !== 0n) n++;
    return n;
  }

  /** Records a page as the target holds it; forgets its block's digest (setBlock after, when known). */
  set(page: number, d: bigint): void {
    this.digests[page] = d === 0n ? 1n : d; // 0n is reserved for "unknown"; a collision only costs a resend
    if (this.blockDigests.length) this.blockDigests[Math.floor((page * this.header.pageSize) / this.header.blockSize!)] = 0n;
    this.dirty = true;
  }

  static normalize(d: bigint): bigint {
    return d === 0n ? 1n : d;
  }

  serialize(): Buffer {
    const head = Buffer.from(JSON.stringify({ ...this.header, version: 2, blockSize: this.header.blockSize ?? 0 }));
    const body = Buffer.from(this.digests.buffer, this.digests.byteOffset, this.digests.byteLength);
    const blocks = Buffer.from(this.blockDigests.buffer, this.blockDigests.byteOffset, this.blockDigests.byteLength);
    const out = Buffer.allocUnsafe(4 + head.length + body.length + blocks.length + 8);
    out.writeUInt32BE(head.length, 0);
    head.copy(out, 4);
    body.copy(out, 4 + head.length);
    blocks.copy(out, 4 + head.length + body.length);
    out.writeBigUInt64LE(xxh64(out.subarray(0, out.length - 8)), out.length - 8);
    return out;
  }

  async save(file: string): Promise<void> {
    await writeFileDurable(file, this.serialize(), 0o600);
    this.dirty = false;
  }

  static parse(buf: Buffer, file: string): DigestMap {
    const corrupt = (why: string) => new MobilityError('MOB_ERR_STATE_CORRUPT', `digest map ${file} is unusable: ${why}`);
    if (buf.length < 12) throw corrupt('truncated');
    const sum = buf.readBigUInt64LE(buf.length - 8);
    if (xxh64(buf.subarray(0, buf.length - 8)) !== sum) throw corrupt('checksum mismatch (truncated or damaged)');
    const hlen = buf.readUInt32BE(0);
    if (4 + hlen > buf.length - 8) throw corrupt('header runs past the end');
    let header: DigestMapHeader;
    try {
      header = JSON.parse(buf.subarray(4, 4 + hlen).toString('utf8')) as DigestMapHeader;
    } catch {
      throw corrupt('header is not JSON');
    }
    if ((header.version !== 1 && header.version !== 2) || !(header.pageSize > 0) || !(header.diskSize >= 0)) throw corrupt('unsupported header');
    const bs = header.version === 2 && Number.isSafeInteger(header.blockSize) && header.blockSize! > 0 ? header.blockSize! : 0;
    if (!bs) delete header.blockSize;
    const pages = Math.ceil(header.diskSize / header.pageSize);
    const blocks = bs ? Math.ceil(header.diskSize / bs) : 0;
    const bodyLen = buf.length - 8 - 4 - hlen;
    if (bodyLen !== (pages + blocks) * 8) throw corrupt(`holds ${bodyLen / 8} digests, expected ${pages + blocks}`);
    const digests = new BigUint64Array(pages);
    Buffer.from(digests.buffer).set(buf.subarray(4 + hlen, 4 + hlen + pages * 8));
    const blockDigests = new BigUint64Array(blocks);
    Buffer.from(blockDigests.buffer).set(buf.subarray(4 + hlen + pages * 8, 4 + hlen + bodyLen));
    return new DigestMap(header, digests, blockDigests);
  }

  /** Loads a map; null when there is none. Throws MOB_ERR_STATE_CORRUPT when it is damaged. */
  static async load(file: string): Promise<DigestMap | null> {
    let buf: Buffer;
    try {
      buf = await fsp.readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
    return DigestMap.parse(buf, file);
  }
}

/**
 * Reprotect (fail back) one machine's disks from their promoted images on the server:
 * a checksum resync in the reverse direction. The server digests the promoted image page
 * by page, the agent digests its own disk, and only the pages that differ travel (server
 * to agent) and are written to the local disk. A second comparison proves the disks equal
 * the images before the caller asks the server to fail back (server/failover.ts).
 *
 * The local disks must not be mounted (they are overwritten underneath any filesystem).
 */
import fs from 'node:fs';
import { AGENT_VERSION, DIGEST_REQUEST_PAGES, DIGEST_REQUESTS_IN_FLIGHT, PAGE_SIZE } from '../constants.js';
import { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { Connection } from '../transport/client.js';
import { encodeMessage, type DigestReply, type ReadReply } from '../protocol/frame-codec.js';
import { pageDigests } from '../protocol/digest.js';
import { ChunkReader, openDiskSource, type DiskSource } from '../source/disk-source.js';
import { deviceFamily, mountsOn } from './freeze.js';

const READ_PAGES = 256;

export interface ReprotectDiskResult { diskId: string; path: string; sizeBytes: number; bytesCompared: number; pagesPulled: number; bytesPulled: number; ms: number }

export async function reprotect(o: {
  serverUrl: string; token: string; ca?: string; pin?: string; agentId: string; disks: { path: string; id: string }[]; logger: Logger;
  /** A registered agent's client certificate and key (PEM): the session authenticates with them instead of the token. */
  cert?: string; key?: string;
  onProgress?: (p: { diskId: string; done: number; total: number }) => void;
}): Promise<ReprotectDiskResult[]> {
  const srcs: DiskSource[] = [];
  const fds: number[] = [];
  try {
    for (const d of o.disks) {
      const mounted = mountsOn(new Set(deviceFamily(d.path)));
      if (mounted.length) throw new MobilityError('MOB_ERR_CONFIG', `${d.path} is mounted (${mounted.join(', ')}): unmount it before reprotect overwrites it`);
      srcs.push(await openDiskSource(d.path, { direct: true }));
      try {
        fds.push(fs.openSync(d.path, 'r+'));
      } catch (err) {
        throw new MobilityError('MOB_ERR_SOURCE', `cannot open ${d.path} for writing: ${(err as Error).message}`);
      }
    }
    const conn = await Connection.connect({
      url: o.serverUrl, ca: o.ca, pin: o.pin, cert: o.cert, key: o.key,
      hello: { agentId: o.agentId, token: o.token, agentVersion: AGENT_VERSION, readOnly: true, purpose: 'reprotect', disks: o.disks.map((d, i) => ({ diskId: d.id, sizeBytes: srcs[i].size, blockSize: 64 * 1024, pageSize: PAGE_SIZE })) },
    });
    try {
      const out: ReprotectDiskResult[] = [];
      for (const [i, d] of o.disks.entries()) {
        const t0 = Date.now();
        const pulled = await pass(conn, i, srcs[i], fds[i], true, (done) => o.onProgress?.({ diskId: d.id, done, total: srcs[i].size }));
        fs.fsyncSync(fds[i]);
        const left = await pass(conn, i, srcs[i], fds[i], false);
        if (left.pages > 0) throw new MobilityError('MOB_ERR_REPLICA_DIVERGED', `${d.path} still differs from its promoted image in ${left.pages} pages after reprotect (is something writing to it?)`);
        out.push({ diskId: d.id, path: d.path, sizeBytes: srcs[i].size, bytesCompared: 2 * srcs[i].size, pagesPulled: pulled.pages, bytesPulled: pulled.bytes, ms: Date.now() - t0 });
        o.logger.info('disk reprotected', { disk: d.id, pagesPulled: pulled.pages, bytesPulled: pulled.bytes, ms: Date.now() - t0 });
      }
      return out;
    } finally {
      conn.shutdown();
    }
  } finally {
    for (const s of srcs) await s.close().catch(() => undefined);
    for (const fd of fds) fs.closeSync(fd);
  }
}

/** One comparison of the whole disk; with pull=true, differing pages are fetched and written. */
async function pass(conn: Connection, disk: number, src: DiskSource, fd: number, pull: boolean, progress?: (done: number) => void): Promise<{ pages: number; bytes: number }> {
  const ps = PAGE_SIZE;
  const totalPages = Math.ceil(src.size / ps);
  const replies = new Map<number, Buffer>();
  const reads = new Map<number, Buffer>();
  let wake: (() => void) | null = null;
  const onDigest = (r: DigestReply, payload: Buffer) => { if (r.disk === disk) { replies.set(r.firstPage, payload); wake?.(); } };
  const onRead = (r: ReadReply, payload: Buffer) => { if (r.disk === disk) { reads.set(r.requestId, payload); wake?.(); } };
  const onClose = () => wake?.();
  conn.on('digestReply', onDigest);
  conn.on('readReply', onRead);
  conn.on('close', onClose);
  const waitFor = async (has: () => boolean) => {
    while (!has()) {
      if (conn.closed) throw conn.closed;
      await new Promise<void>((r) => (wake = r));
      wake = null;
    }
  };
  let next = 0;
  let reqId = 0;
  const request = () => {
    if (next >= totalPages) return;
    const count = Math.min(DIGEST_REQUEST_PAGES, totalPages - next);
    conn.send(encodeMessage({ type: 'digestRequest', digestRequest: { disk, requestId: ++reqId, firstPage: next, pageCount: count } }));
    next += count;
  };
  let pages = 0;
  let bytes = 0;
  try {
    for (let k = 0; k < DIGEST_REQUESTS_IN_FLIGHT; k++) request();
    const reader = new ChunkReader(src, 0, src.size, DIGEST_REQUEST_PAGES * ps);
    const local = new BigUint64Array(DIGEST_REQUEST_PAGES);
    for (;;) {
      const c = await reader.read();
      if (!c) break;
      const first = c.offset / ps;
      const n = pageDigests(c.data, ps, local);
      await waitFor(() => replies.has(first));
      const remote = replies.get(first)!;
      replies.delete(first);
      request();
      if (remote.length !== n * 8) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `digest reply for page ${first} has ${remote.length / 8} digests, expected ${n}`);
      let run = -1;
      const flush = async (end: number) => {
        if (run < 0) return;
        for (let a = run; a < end; a += READ_PAGES) {
          const cnt = Math.min(READ_PAGES, end - a);
          pages += cnt;
          if (!pull) continue;
          const id = ++reqId;
          conn.send(encodeMessage({ type: 'readRequest', readRequest: { disk, requestId: id, firstPage: first + a, pageCount: cnt } }));
          await waitFor(() => reads.has(id));
          const data = reads.get(id)!;
          reads.delete(id);
          const want = Math.min(cnt * ps, src.size - (first + a) * ps);
          if (data.length !== want) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `read reply of ${data.length} bytes, expected ${want}`);
          let w = 0;
          while (w < data.length) w += fs.writeSync(fd, data, w, data.length - w, (first + a) * ps + w);
          bytes += data.length;
        }
        run = -1;
      };
      for (let p = 0; p < n; p++) {
        if (remote.readBigUInt64LE(8 * p) !== local[p]) { if (run < 0) run = p; }
        else await flush(p);
      }
      await flush(n);
      progress?.(c.offset + c.data.length);
    }
    return { pages, bytes };
  } finally {
    conn.off('digestReply', onDigest);
    conn.off('readReply', onRead);
    conn.off('close', onClose);
  }
}

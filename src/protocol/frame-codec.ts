/**
 * Framing: every binary WebSocket message is
 *   uint32 BE header length | protobuf Frame (proto/mobility.proto) | raw payload.
 * The payload never goes through protobuf (a `bytes` field would copy it).
 * decodeMessage() is a pure function of one whole message; it throws a coded
 * MobilityError for anything malformed and never returns a partial frame.
 */
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { MAX_FRAME_BYTES, MAX_HEADER_BYTES } from '../constants.js';
import { MobilityError } from '../errors.js';

const protoPath = fileURLToPath(new URL('../../../proto/mobility.proto', import.meta.url));
const root = protobuf.loadSync(protoPath);
const FrameType = root.lookupType('mobility.v1.Frame');

export enum Encoding {
  ZERO = 0,
  RAW = 1,
  LZ4 = 2,
}

export interface DiskInfo { diskId: string; sizeBytes: number; blockSize: number; pageSize: number }
export interface Hello { protocolVersion: number; agentId: string; token: string; disks: DiskInfo[]; agentVersion: string; readOnly?: boolean; purpose?: string }
export interface DiskState { diskId: string; lastDurableSeq: number; generation: string; initialComplete: boolean; sizeBytes: number; replicaExists: boolean }
export interface Welcome { protocolVersion: number; sessionId: string; disks: DiskState[]; creditBytes: number; maxFrameBytes: number; heartbeatMs: number }
export interface BlockRef { index: number; encoding: Encoding; length: number; pageMask: Uint8Array; digest: Uint8Array }
export interface Data { disk: number; seq: number; blocks: BlockRef[] }
/** busyPct: the server's load in percent when it sent the ack, the larger of its event-loop utilization and host CPU use (0 = not reported). */
export interface Ack { disk: number; seq: number; creditBytes: number; busyPct?: number }
export interface ErrorBody { code: string; message: string; retryable: boolean }
export interface Heartbeat { sentAtMs: number; reply: boolean }
export interface DigestRequest { disk: number; requestId: number; firstPage: number; pageCount: number }
export interface DigestReply { disk: number; requestId: number; firstPage: number; pageCount: number }
export interface PassEnd { disk: number; seq: number; kind: string }
/** samplePages[i]'s source digest is sampleDigests[8*i .. 8*i+8] (xxh64, little-endian). */
export interface CutDisk { disk: number; seq: number; samplePages?: number[]; sampleDigests?: Uint8Array }
export interface Cut { cutId: number; kind: string; disks: CutDisk[]; takenAtMs: number; frozenMs: number; note: string; groupPoint?: string }
export interface CutMismatch { disk: number; page: number; replicaDigest: bigint; sourceDigest: bigint }
/** pointId set: recorded. Otherwise errorCode/errorMessage say why not (mismatches for MOB_ERR_POINT_UNVERIFIED). */
export interface CutAck { cutId: number; pointId: string; errorCode?: string; errorMessage?: string; mismatches?: CutMismatch[]; verifiedPages?: number }
export interface DiskHealth {
  disk: number; state: string; reason: string; backlogBytes: number; dataLagMs: number; churnBytesPerSec: number;
  freezeFailures: number; lastFreezeMs: number; progressPermille: number;
}
export interface Health { disks: DiskHealth[] }
export interface CutRequest { kind: string; reason: string }
export interface ReadRequest { disk: number; requestId: number; firstPage: number; pageCount: number }
export interface ReadReply { disk: number; requestId: number; firstPage: number; pageCount: number }

export type FrameBody =
  | { type: 'hello'; hello: Hello }
  | { type: 'welcome'; welcome: Welcome }
  | { type: 'data'; data: Data }
  | { type: 'ack'; ack: Ack }
  | { type: 'error'; error: ErrorBody }
  | { type: 'heartbeat'; heartbeat: Heartbeat }
  | { type: 'digestRequest'; digestRequest: DigestRequest }
  | { type: 'digestReply'; digestReply: DigestReply }
  | { type: 'passEnd'; passEnd: PassEnd }
  | { type: 'cut'; cut: Cut }
  | { type: 'cutAck'; cutAck: CutAck }
  | { type: 'health'; health: Health }
  | { type: 'cutRequest'; cutRequest: CutRequest }
  | { type: 'readRequest'; readRequest: ReadRequest }
  | { type: 'readReply'; readReply: ReadReply };

export type FrameType = FrameBody['type'];
export type DecodedFrame = FrameBody & { payload: Buffer };

const TYPES: readonly FrameType[] = ['hello', 'welcome', 'data', 'ack', 'error', 'heartbeat', 'digestRequest', 'digestReply', 'passEnd', 'cut', 'cutAck', 'health', 'cutRequest', 'readRequest', 'readReply'];

/** A fixed64 digest as an unsigned bigint (protobufjs gives a Long or a number). */
function u64(v: unknown): bigint {
  if (v === undefined || v === null) return 0n;
  if (typeof v === 'number') return BigInt.asUintN(64, BigInt(v));
  const l = v as { low: number; high: number };
  return (BigInt(l.high >>> 0) << 32n) | BigInt(l.low >>> 0);
}

/** protobufjs gives uint64 as Long objects (or numbers); offsets and sequences stay below 2^53. */
function num(v: unknown): number {
  if (v === undefined || v === null) return 0;
  if (typeof v === 'number') return v;
  const n = (v as { toNumber(): number }).toNumber();
  if (!Number.isSafeInteger(n)) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'integer field out of range');
  return n;
}

const EMPTY = Buffer.alloc(0);

/**
 * Encodes a frame. `payload` may be several buffers; they are copied once into the message.
 * `alloc` supplies the message buffer (at least n bytes; the result is its first n bytes).
 */
export function encodeMessage(body: FrameBody, payload: Buffer | Buffer[] = EMPTY, alloc?: (n: number) => Buffer): Buffer {
  const { type, ...rest } = body as FrameBody & Record<string, unknown>;
  let msg = (rest as Record<string, unknown>)[type];
  // fixed64 digests travel as bigints in our types; protobufjs takes decimal strings
  if (type === 'cutAck') msg = JSON.parse(JSON.stringify(msg, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)));
  const header = FrameType.encode(FrameType.fromObject({ [type]: msg })).finish();
  const parts = Array.isArray(payload) ? payload : [payload];
  let payloadLen = 0;
  for (const p of parts) payloadLen += p.length;
  const total = 4 + header.length + payloadLen;
  const out = alloc ? alloc(total).subarray(0, total) : Buffer.allocUnsafe(total);
  out.writeUInt32BE(header.length, 0);
  out.set(header, 4);
  let o = 4 + header.length;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Decodes one whole binary message. Throws MOB_ERR_FRAME_* / MOB_ERR_UNKNOWN_MESSAGE. */
export function decodeMessage(msg: Buffer, maxFrameBytes = MAX_FRAME_BYTES): DecodedFrame {
  if (msg.length > maxFrameBytes) {
    throw new MobilityError('MOB_ERR_FRAME_TOO_LARGE', `frame of ${msg.length} bytes exceeds the limit of ${maxFrameBytes}`);
  }
  if (msg.length < 4) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `frame of ${msg.length} bytes is shorter than its length prefix`);
  const headerLen = msg.readUInt32BE(0);
  if (headerLen > MAX_HEADER_BYTES) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `header length ${headerLen} exceeds ${MAX_HEADER_BYTES}`);
  if (4 + headerLen > msg.length) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `header length ${headerLen} runs past the end of a ${msg.length}-byte frame (truncated)`);
  let decoded: protobuf.Message & Record<string, unknown>;
  try {
    decoded = FrameType.decode(msg.subarray(4, 4 + headerLen)) as protobuf.Message & Record<string, unknown>;
  } catch (err) {
    throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `header does not decode: ${(err as Error).message}`);
  }
  const type = TYPES.find((t) => decoded[t] !== undefined && decoded[t] !== null);
  if (type === undefined) throw new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', 'frame carries no known message type');
  const payload = msg.subarray(4 + headerLen);
  const m = decoded[type] as Record<string, unknown>;
  if (payload.length > 0 && type !== 'data' && type !== 'digestReply' && type !== 'readReply') {
    throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `${type} frame must not carry a payload`);
  }
  switch (type) {
    case 'hello':
      return {
        type, payload,
        hello: {
          protocolVersion: num(m.protocolVersion), agentId: String(m.agentId ?? ''), token: String(m.token ?? ''),
          agentVersion: String(m.agentVersion ?? ''), readOnly: Boolean(m.readOnly), purpose: String(m.purpose ?? ''),
          disks: ((m.disks as Record<string, unknown>[] | undefined) ?? []).map((d) => ({
            diskId: String(d.diskId ?? ''), sizeBytes: num(d.sizeBytes), blockSize: num(d.blockSize), pageSize: num(d.pageSize),
          })),
        },
      };
    case 'welcome':
      return {
        type, payload,
        welcome: {
          protocolVersion: num(m.protocolVersion), sessionId: String(m.sessionId ?? ''), creditBytes: num(m.creditBytes),
          maxFrameBytes: num(m.maxFrameBytes), heartbeatMs: num(m.heartbeatMs),
          disks: ((m.disks as Record<string, unknown>[] | undefined) ?? []).map((d) => ({
            diskId: String(d.diskId ?? ''), lastDurableSeq: num(d.lastDurableSeq), generation: String(d.generation ?? ''),
            initialComplete: Boolean(d.initialComplete), sizeBytes: num(d.sizeBytes), replicaExists: Boolean(d.replicaExists),
          })),
        },
      };
    case 'data':
      return {
        type, payload,
        data: {
          disk: num(m.disk), seq: num(m.seq),
          blocks: ((m.blocks as Record<string, unknown>[] | undefined) ?? []).map((b) => ({
            index: num(b.index), encoding: num(b.encoding) as Encoding, length: num(b.length),
            pageMask: (b.pageMask as Uint8Array | undefined) ?? EMPTY, digest: (b.digest as Uint8Array | undefined) ?? EMPTY,
          })),
        },
      };
    case 'ack':
      return { type, payload, ack: { disk: num(m.disk), seq: num(m.seq), creditBytes: num(m.creditBytes), busyPct: Math.min(100, num(m.busyPct)) } };
    case 'error':
      return { type, payload, error: { code: String(m.code ?? ''), message: String(m.message ?? ''), retryable: Boolean(m.retryable) } };
    case 'heartbeat':
      return { type, payload, heartbeat: { sentAtMs: num(m.sentAtMs), reply: Boolean(m.reply) } };
    case 'digestRequest':
      return { type, payload, digestRequest: { disk: num(m.disk), requestId: num(m.requestId), firstPage: num(m.firstPage), pageCount: num(m.pageCount) } };
    case 'digestReply':
      return { type, payload, digestReply: { disk: num(m.disk), requestId: num(m.requestId), firstPage: num(m.firstPage), pageCount: num(m.pageCount) } };
    case 'passEnd':
      return { type, payload, passEnd: { disk: num(m.disk), seq: num(m.seq), kind: String(m.kind ?? '') } };
    case 'cut':
      return {
        type, payload,
        cut: {
          cutId: num(m.cutId), kind: String(m.kind ?? ''), takenAtMs: num(m.takenAtMs), frozenMs: num(m.frozenMs), note: String(m.note ?? ''), groupPoint: String(m.groupPoint ?? ''),
          disks: ((m.disks as Record<string, unknown>[] | undefined) ?? []).map((d) => ({
            disk: num(d.disk), seq: num(d.seq),
            samplePages: ((d.samplePages as unknown[] | undefined) ?? []).map(num),
            sampleDigests: (d.sampleDigests as Uint8Array | undefined) ?? new Uint8Array(0),
          })),
        },
      };
    case 'cutRequest':
      return { type, payload, cutRequest: { kind: String(m.kind ?? ''), reason: String(m.reason ?? '') } };
    case 'readRequest':
      return { type, payload, readRequest: { disk: num(m.disk), requestId: num(m.requestId), firstPage: num(m.firstPage), pageCount: num(m.pageCount) } };
    case 'readReply':
      return { type, payload, readReply: { disk: num(m.disk), requestId: num(m.requestId), firstPage: num(m.firstPage), pageCount: num(m.pageCount) } };
    case 'cutAck':
      return {
        type, payload,
        cutAck: {
          cutId: num(m.cutId), pointId: String(m.pointId ?? ''), errorCode: String(m.errorCode ?? ''), errorMessage: String(m.errorMessage ?? ''),
          verifiedPages: num(m.verifiedPages),
          mismatches: ((m.mismatches as Record<string, unknown>[] | undefined) ?? []).map((x) => ({
            disk: num(x.disk), page: num(x.page), replicaDigest: u64(x.replicaDigest), sourceDigest: u64(x.sourceDigest),
          })),
        },
      };
    case 'health':
      return {
        type, payload,
        health: {
          disks: ((m.disks as Record<string, unknown>[] | undefined) ?? []).map((d) => ({
            disk: num(d.disk), state: String(d.state ?? ''), reason: String(d.reason ?? ''), backlogBytes: num(d.backlogBytes),
            dataLagMs: num(d.dataLagMs), churnBytesPerSec: num(d.churnBytesPerSec), freezeFailures: num(d.freezeFailures),
            lastFreezeMs: num(d.lastFreezeMs), progressPermille: num(d.progressPermille),
          })),
        },
      };
  }
}

/** Encodes a coded error frame. */
export function errorMessage(err: MobilityError): Buffer {
  return encodeMessage({ type: 'error', error: { code: err.code, message: err.message, retryable: err.retryable } });
}

import t from 'tap';
import { decodeMessage, encodeMessage, Encoding } from '../../src/protocol/frame-codec.js';
import { MobilityError } from '../../src/errors.js';

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return err instanceof MobilityError ? err.code : `not coded: ${String(err)}`;
  }
  return 'no error';
}

t.test('data frame round trip keeps header fields and payload', async (t) => {
  const payload = Buffer.from('hello payload');
  const msg = encodeMessage({
    type: 'data',
    data: { disk: 1, seq: 2 ** 40, blocks: [{ index: 123456789, encoding: Encoding.LZ4, length: payload.length, pageMask: Buffer.from([5]), digest: Buffer.alloc(8, 7) }] },
  }, payload);
  const f = decodeMessage(msg);
  t.equal(f.type, 'data');
  if (f.type !== 'data') return;
  t.equal(f.data.seq, 2 ** 40);
  t.equal(f.data.blocks[0].index, 123456789);
  t.equal(f.data.blocks[0].encoding, Encoding.LZ4);
  t.same(Buffer.from(f.data.blocks[0].pageMask), Buffer.from([5]));
  t.same(f.payload, payload);
});

t.test('every truncation of a valid frame is a coded error or a shorter valid decode, never a crash', async (t) => {
  const msg = encodeMessage({ type: 'hello', hello: { protocolVersion: 1, agentId: 'a', token: 'secret', agentVersion: 'x', disks: [{ diskId: 'd', sizeBytes: 4096, blockSize: 65536, pageSize: 4096 }] } });
  for (let n = 0; n < msg.length; n++) {
    const cut = msg.subarray(0, n);
    const code = codeOf(() => decodeMessage(cut));
    t.ok(code.startsWith('MOB_ERR_FRAME_MALFORMED') || code === 'MOB_ERR_UNKNOWN_MESSAGE', `cut at ${n}: ${code}`);
  }
});

t.test('malformed inputs get stable codes', async (t) => {
  t.equal(codeOf(() => decodeMessage(Buffer.from([0, 0]))), 'MOB_ERR_FRAME_MALFORMED', 'shorter than the length prefix');
  t.equal(codeOf(() => decodeMessage(Buffer.from([0, 0, 0, 50, 1, 2]))), 'MOB_ERR_FRAME_MALFORMED', 'header length past the end');
  t.equal(codeOf(() => decodeMessage(Buffer.from([0xff, 0xff, 0xff, 0xff]))), 'MOB_ERR_FRAME_MALFORMED', 'absurd header length');
  t.equal(codeOf(() => decodeMessage(Buffer.from([0, 0, 0, 3, 0xff, 0xff, 0xff]))), 'MOB_ERR_FRAME_MALFORMED', 'garbage protobuf');
  t.equal(codeOf(() => decodeMessage(Buffer.from([0, 0, 0, 0]))), 'MOB_ERR_UNKNOWN_MESSAGE', 'empty Frame (no known type)');
  // field 99 (unknown to this version): decodes, but carries no known message
  t.equal(codeOf(() => decodeMessage(Buffer.from([0, 0, 0, 3, 0x9a, 0x06, 0x00]))), 'MOB_ERR_UNKNOWN_MESSAGE', 'unknown message type');
  const big = Buffer.alloc(1024);
  t.equal(codeOf(() => decodeMessage(big, 512)), 'MOB_ERR_FRAME_TOO_LARGE');
  const ack = encodeMessage({ type: 'ack', ack: { disk: 0, seq: 1, creditBytes: 1 } }, Buffer.from('x'));
  t.equal(codeOf(() => decodeMessage(ack)), 'MOB_ERR_FRAME_MALFORMED', 'payload on a frame that takes none');
});

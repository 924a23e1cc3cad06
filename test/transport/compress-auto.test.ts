/**
 * Compression that adapts to the link: the decision rule, the server's load figure that
 * feeds it, and real replicate runs over wss on loopback with each --compress mode.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { LINK_BACKLOG_BYTES, PEER_BUSY_PCT } from '../../src/constants.js';
import { parseCompressMode, shouldCompress } from '../../src/protocol/block-codec.js';
import { decodeMessage, encodeMessage } from '../../src/protocol/frame-codec.js';
import { linkIsBottleneck } from '../../src/transport/client.js';
import { LoopLoad, parseProcStat } from '../../src/util/loop-load.js';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { replicateArgs, runCli, startServer, tmpDir } from '../helpers.js';

t.test('the rule: a rate limit, or a socket backlog while the server has time to spare', async (t) => {
  t.equal(linkIsBottleneck({ limited: true, backlogBytes: 0, peerBusyPct: 100 }), true, 'a bandwidth limit is the bottleneck by definition');
  t.equal(linkIsBottleneck({ limited: false, backlogBytes: 0, peerBusyPct: 0 }), false, 'nothing waiting: the link keeps up');
  t.equal(linkIsBottleneck({ limited: false, backlogBytes: LINK_BACKLOG_BYTES - 1, peerBusyPct: 0 }), false, 'below the backlog threshold');
  t.equal(linkIsBottleneck({ limited: false, backlogBytes: LINK_BACKLOG_BYTES, peerBusyPct: 0 }), true, 'backlog and an idle server: the link is slow');
  t.equal(linkIsBottleneck({ limited: false, backlogBytes: 64 << 20, peerBusyPct: PEER_BUSY_PCT }), false, 'backlog behind a busy server is the server\'s');
  let asked = 0;
  const busy = () => { asked++; return true; };
  t.equal(shouldCompress('always', () => false), true);
  t.equal(shouldCompress('never', busy), false);
  t.equal(shouldCompress('auto', busy), true);
  t.equal(shouldCompress('auto', () => false), false);
  t.equal(asked, 1, 'the link is only consulted in auto mode');
  t.equal(parseCompressMode('auto'), 'auto');
  t.throws(() => parseCompressMode('lz4'), { code: 'MOB_ERR_USAGE' });
});

t.test('the server load figure sees a busy event loop, and travels in the Ack', async (t) => {
  const load = new LoopLoad();
  const end = performance.now() + 400;
  while (performance.now() < end) { /* a callback that holds the loop */ }
  t.ok(load.read() >= 80, `a loop held for 400 ms of the window reads as busy (${load.read()} %)`);
  const ack = decodeMessage(encodeMessage({ type: 'ack', ack: { disk: 1, seq: 7, creditBytes: 9, busyPct: 63 } }));
  t.match(ack, { type: 'ack', ack: { disk: 1, seq: 7, creditBytes: 9, busyPct: 63 } });
  const old = decodeMessage(encodeMessage({ type: 'ack', ack: { disk: 1, seq: 7, creditBytes: 9 } }));
  t.equal(old.type === 'ack' && old.ack.busyPct, 0, 'an Ack without the field (older server) reads as 0');
});

t.test('host CPU from /proc/stat: I/O wait is spare capacity, steal is not', async (t) => {
  const ioBound = parseProcStat('cpu  100 0 50 200 650 0 0 0 0 0\ncpu0 50 0 25 100 325 0 0 0 0 0\n');
  t.same(ioBound, { busy: 150, total: 1000 }, 'a host waiting on its disk is 15 % busy, not 43 %');
  t.same(parseProcStat('cpu  10 2 3 80 0 1 2 2\n'), { busy: 20, total: 100 }, 'stolen time is CPU this host does not get');
  t.same(parseProcStat('cpu  1 2 3 4\n'), { busy: 6, total: 10 }, 'older kernels with four fields');
  t.equal(parseProcStat('intr 1 2 3\n'), null, 'no cpu line');
  t.equal(parseProcStat('cpu  a b c d\n'), null, 'garbage');
  const load = new LoopLoad();
  await new Promise((r) => setTimeout(r, 300));
  const idle = load.read();
  t.ok(idle >= 1 && idle <= 100, `an idle window reads 1-100 (${idle}), never 0, which on the wire means "not reported"`);
});

t.test('replicate with each mode: auto compresses under a rate limit, never and always do what they say', async (t) => {
  const SIZE = 16 * 1024 * 1024;
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  await writeSampleImage(img, SIZE, 5);
  const srv = await startServer(t, path.join(dir, 'srv'));
  type Out = { disks: { stats: { lz4Blocks: number; bytesSent: number; bytesChanged: number; blocksSent: number; zeroBlocks: number } }[] };
  const run = async (id: string, extra: string[]) => {
    const r = await runCli(replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=${id}`, stateDir: path.join(dir, `agent-${id}`), extra })).done;
    t.equal(r.code, 0, `exit 0 (${r.stderr.slice(-500)})`);
    t.equal(await sha256File(path.join(dir, 'srv', 'replicas', 'agent1', id, 'replica.img')), await sha256File(img), `replica ${id} equals the source`);
    return (JSON.parse(r.stdout) as Out).disks[0].stats;
  };
  const limited = await run('auto', ['--max-rate', '400M']);
  t.ok(limited.lz4Blocks > 0, `auto under a rate limit compresses (${limited.lz4Blocks} lz4 blocks)`);
  t.ok(limited.bytesSent < limited.bytesChanged * 0.8, `and sends fewer bytes than it read (${limited.bytesSent} of ${limited.bytesChanged})`);
  const never = await run('never', ['--compress', 'never', '--max-rate', '400M']);
  t.equal(never.lz4Blocks, 0, 'never: no lz4 block even under a rate limit');
  const nonZero = never.bytesChanged - never.zeroBlocks * 65536;
  t.ok(never.bytesSent >= nonZero, `never: every non-zero byte on the wire (${never.bytesSent} for ${nonZero})`);
  const always = await run('always', ['--compress', 'always']);
  t.ok(always.lz4Blocks > 0, `always: compresses without any limit (${always.lz4Blocks})`);
  t.ok(always.bytesSent < always.bytesChanged * 0.8, 'always: fewer bytes on the wire');
  const bad = await runCli(replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=bad`, stateDir: path.join(dir, 'agent-bad'), extra: ['--no-compress', '--compress', 'always'] })).done;
  t.equal(bad.code, 2, 'contradicting flags are a usage error');
  t.match(bad.stderr, /MOB_ERR_USAGE/);
  t.notOk(await fsp.stat(path.join(dir, 'srv', 'replicas', 'agent1', 'bad')).catch(() => null), 'and nothing was created for it');
});

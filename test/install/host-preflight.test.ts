/**
 * Host-mode preflight against a real qemu-storage-daemon: every check passes for qcow2 and raw
 * format nodes (raw with its caveat), and each failure has its code and fix: a protocol node, an
 * unknown node, a read-only node, a socket nobody listens on, a run directory that is too full.
 * The CLI reports the same with exit 3. No bitmap is left behind. With a guest agent socket: a
 * real qemu-ga passes (and one with its fsfreeze commands blocked fails), a silent socket fails
 * within the bound.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { runHostPreflight } from '../../src/install/host-preflight.js';
import { QmpClient } from '../../src/source/qemu/qmp.js';
import { cleanup } from '../cleanup.js';
import { runCli } from '../helpers.js';
import { QemuDaemon, createImage, requireQemuTools } from '../source/qemu/qemu-daemon.js';
import { silentSocket, startQemuGa } from '../qemu-ga.js';

t.test('host preflight on a real QEMU', async (t) => {
  requireQemuTools();
  const c = cleanup(t);
  const dir = c.dir('hostpre-');
  const disks = (['qcow2', 'raw'] as const).map((format, i) => {
    const image = path.join(dir, `disk${i}.${format}`);
    createImage(image, format, '64M');
    return { image, format };
  });
  const q = new QemuDaemon(c, dir, disks, false);
  await q.start();
  t.teardown(() => q.stop());

  const checks = await runHostPreflight({ qmpSocket: q.qmpSocket, nodes: ['disk0', 'disk1'], minFreeBytes: 1 });
  const byId = new Map(checks.map((x) => [x.id, x]));
  t.same(checks.map((x) => x.id), ['qmp', 'qemu-version', 'fuse', 'nbdinfo', 'node:disk0', 'node:disk1', 'point-space']);
  for (const x of checks) t.ok(x.ok, `${x.id}: ${x.message}`);
  t.match(byId.get('qemu-version')!.message, /^QEMU \d+\.\d+\.\d+$/);
  t.match(byId.get('node:disk0')!.message, /qcow2, 67108864 bytes; persistent dirty bitmaps/);
  t.match(byId.get('node:disk1')!.message, /raw, 67108864 bytes; dirty bitmaps in memory only: a QEMU restart costs a checksum resync/);

  // the probe bitmaps are gone (read through the test's own monitor)
  const qmp = await QmpClient.connect(q.testQmpSocket);
  const nodes = await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: unknown[] }[]>('query-named-block-nodes');
  qmp.close();
  t.same(nodes.flatMap((n) => n['dirty-bitmaps'] ?? []), [], 'no dirty bitmap left on any node');

  const bad = await runHostPreflight({ qmpSocket: q.qmpSocket, nodes: ['file0', 'nosuch'], minFreeBytes: Number.MAX_SAFE_INTEGER });
  const b = new Map(bad.map((x) => [x.id, x]));
  t.match(b.get('node:file0'), { ok: false, code: 'MOB_ERR_PRE_QEMU', message: /protocol node \(file\)/, fix: /format node above it \(disk0, disk1\)/ });
  t.match(b.get('node:nosuch'), { ok: false, code: 'MOB_ERR_PRE_QEMU', message: /no block node 'nosuch'/ });
  t.match(b.get('point-space'), { ok: false, code: 'MOB_ERR_PRE_LOW_DISK', fix: /point-in-time view/ });

  const gone = await runHostPreflight({ qmpSocket: path.join(dir, 'nobody.sock'), nodes: ['disk0'], timeoutMs: 2000 });
  t.same(gone.map((x) => x.id), ['qmp', 'nbdinfo'], 'without QMP only the QMP failure and the tool check');
  t.match(gone[0], { ok: false, code: 'MOB_ERR_PRE_QEMU', fix: /QMP monitor of its own/ });

  // the CLI: exit 3 with the failures, exit 0 when all pass (as root; the state dir's filesystem has room)
  const state = path.join(dir, 'state');
  fs.mkdirSync(state);
  const ok = await runCli(['preflight', '--qmp', q.qmpSocket, '--node', 'disk0', '--run-dir', dir, '--state-dir', state, '--json']).done;
  const j = JSON.parse(ok.stdout) as { ok: boolean; checks: { id: string; ok: boolean; message: string }[] };
  t.equal(ok.code, j.ok ? 0 : 3, `exit code follows the result (${ok.stderr})`);
  t.ok(j.checks.some((x) => x.id === 'node:disk0' && x.ok), 'the node passes through the CLI');
  t.notOk(j.checks.some((x) => x.id === 'tracefs'), 'host mode does not check tracefs');
  const fail = await runCli(['preflight', '--qmp', q.qmpSocket, '--node', 'nosuch', '--state-dir', state]).done;
  t.equal(fail.code, 3, 'a failing node: exit 3');
  t.match(fail.stdout, /FAIL  node:nosuch  MOB_ERR_PRE_QEMU: QEMU has no block node 'nosuch'/);
  const usage = await runCli(['preflight', '--qmp', q.qmpSocket]).done;
  t.equal(usage.code, 2, 'no --node: a usage error');
  t.match(usage.stderr, /needs at least one --node/);
});

t.test('host preflight of the guest agent (app-consistent points) against a real qemu-ga', async (t) => {
  const c = cleanup(t);
  const dir = c.dir('hostpre-qga-');
  const nobody = path.join(dir, 'nobody-qmp.sock'); // QMP is not what this test looks at
  const ga = await startQemuGa(t, { dir: c.dir('qga-'), mounts: [] });
  const ok = await runHostPreflight({ qmpSocket: nobody, nodes: ['disk0'], timeoutMs: 5000, guestAgentSocket: ga.socket });
  const byId = new Map(ok.map((x) => [x.id, x]));
  t.match(byId.get('guest-agent'), { ok: true, message: /^guest agent \d+\.\d+\S* answers on / });
  // this test's agent blocks the unbounded freeze: freeze-list is enough, and the check says so
  t.match(byId.get('guest-fsfreeze'), { ok: true, message: /fsfreeze commands enabled \(guest-fsfreeze-freeze-list only/ });

  const blocked = await startQemuGa(t, { dir: c.dir('qga-blocked-'), mounts: [], block: ['guest-fsfreeze-freeze-list', 'guest-fsfreeze-thaw'] });
  const b = await runHostPreflight({ qmpSocket: nobody, nodes: ['disk0'], timeoutMs: 5000, guestAgentSocket: blocked.socket });
  t.match(b.find((x) => x.id === 'guest-agent'), { ok: true });
  t.match(b.find((x) => x.id === 'guest-fsfreeze'), { ok: false, code: 'MOB_ERR_PRE_GUEST_AGENT', message: /guest-fsfreeze-freeze, guest-fsfreeze-thaw disabled/, fix: /qemu-ga\.conf/ });

  const silent = path.join(dir, 'silent.sock');
  await silentSocket(t, silent);
  const s = await runHostPreflight({ qmpSocket: nobody, nodes: ['disk0'], timeoutMs: 1500, guestAgentSocket: silent });
  t.match(s.find((x) => x.id === 'guest-agent'), { ok: false, code: 'MOB_ERR_PRE_GUEST_AGENT', message: /no answer to guest-sync-delimited .*within 1500 ms/, fix: /install and start the QEMU guest agent/ });
  t.notOk(s.some((x) => x.id === 'guest-fsfreeze'), 'no fsfreeze check without an agent');
  const none = await runHostPreflight({ qmpSocket: nobody, nodes: ['disk0'], timeoutMs: 1000 });
  t.notOk(none.some((x) => x.id.startsWith('guest')), 'no guest agent checks unless a socket is given');

  // the CLI: the checks come through, exit 3 (QMP fails here), and --guest-agent needs --qmp
  const state = c.dir('state-');
  const cli = await runCli(['preflight', '--qmp', nobody, '--node', 'disk0', '--guest-agent', ga.socket, '--state-dir', state, '--json']).done;
  t.equal(cli.code, 3, 'exit 3: QMP does not answer here');
  const j = JSON.parse(cli.stdout) as { checks: { id: string; ok: boolean }[] };
  t.ok(j.checks.some((x) => x.id === 'guest-agent' && x.ok) && j.checks.some((x) => x.id === 'guest-fsfreeze' && x.ok), 'the guest agent checks pass through the CLI');
  const usage = await runCli(['preflight', '--guest-agent', ga.socket]).done;
  t.equal(usage.code, 2, '--guest-agent without --qmp: a usage error');
  t.match(usage.stderr, /--guest-agent go with --qmp/);
});

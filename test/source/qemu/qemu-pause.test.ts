/**
 * QemuTracker.pauseGuest()/resumeGuest() (host-mode group cuts without a guest agent pause the
 * VM's CPUs from the group's freeze to its commit) against real QEMU: a qemu-system-x86_64 with
 * no guest (-M none) but a qcow2 disk node, and a qemu-storage-daemon, which has no guest to
 * pause (a coded error). Missing tools fail the test, never skip it.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { QemuTracker } from '../../../src/source/tracker/qemu.js';
import { QmpClient } from '../../../src/source/qemu/qmp.js';
import { cleanup } from '../../cleanup.js';
import { sleep } from '../../helpers.js';
import { QemuDaemon, createImage, qmpProxy, requireQemuTools } from './qemu-daemon.js';
import type { Cleanup } from '../../cleanup.js';

/** A qemu-system-x86_64 with no guest (-M none) but a qcow2 disk node, and two QMP monitors (the tracker's, the test's). */
async function startVm(c: Cleanup, prefix: string, paused: boolean): Promise<{ dir: string; qmpSock: string; testSock: string }> {
  const dir = c.dir(prefix);
  const image = path.join(dir, 'vm.qcow2');
  createImage(image, 'qcow2', '16M');
  const qmpSock = path.join(dir, 'vm.qmp');
  const testSock = path.join(dir, 'vm-test.qmp');
  const vm = c.spawn('qemu-system-x86_64', ['-M', 'none', '-nodefaults', '-display', 'none', ...(paused ? ['-S'] : []),
    '-blockdev', `driver=file,filename=${image},node-name=file0`, '-blockdev', 'driver=qcow2,file=file0,node-name=disk0',
    '-chardev', `socket,path=${qmpSock},server=on,wait=off,id=m0`, '-mon', 'chardev=m0,mode=control',
    '-chardev', `socket,path=${testSock},server=on,wait=off,id=m1`, '-mon', 'chardev=m1,mode=control'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  vm.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  for (let i = 0; !(fs.existsSync(qmpSock) && fs.existsSync(testSock)); i++) {
    if (vm.exitCode !== null || i > 1500) throw new Error(`qemu-system-x86_64 did not start: ${err}`);
    await sleep(20);
  }
  return { dir, qmpSock, testSock };
}

t.test('a VM is paused and resumed; a storage daemon cannot pause and says so', async (t) => {
  requireQemuTools();
  const c = cleanup(t);
  const { dir, qmpSock, testSock } = await startVm(c, 'qemu-pause-', true);
  const probe = await QmpClient.connect(testSock);
  t.teardown(() => probe.close());
  const running = async () => (await probe.execute<{ running: boolean }>('query-status')).running;
  const tr = await QemuTracker.open({ name: 'pausetest', qmpSocket: qmpSock, disks: [{ node: 'disk0' }], runDir: dir });
  t.teardown(() => tr.close().catch(() => undefined));
  t.equal(await running(), false, 'started with -S: not running');
  t.equal(await tr.pauseGuest(), false, 'a guest that is not running is not paused (and must not be resumed)');
  await probe.execute('cont');
  t.equal(await running(), true, 'running');
  t.equal(await tr.pauseGuest(), true, 'paused');
  t.equal(await running(), false, 'QEMU says paused');
  await tr.resumeGuest();
  t.equal(await running(), true, 'resumed');

  const d = new QemuDaemon(c, c.dir('qsd-'), [{ image: path.join(dir, 'd.qcow2'), format: 'qcow2' }]);
  createImage(path.join(dir, 'd.qcow2'), 'qcow2', '16M');
  await d.start();
  const tr2 = await QemuTracker.open({ name: 'pausetest', qmpSocket: d.qmpSocket, nbdSocket: d.nbdSocket, disks: [{ node: 'disk0' }] });
  t.teardown(() => tr2.close().catch(() => undefined));
  await t.rejects(tr2.pauseGuest(), { code: 'MOB_ERR_QEMU_TRACKER', message: /runs no guest it could pause/ }, 'a storage daemon has no guest: coded error');
});

t.test('a `stop` answered too late does not leave the guest paused', async (t) => {
  requireQemuTools();
  const c = cleanup(t);
  const { dir, qmpSock, testSock } = await startVm(c, 'qemu-pause-late-', false);
  const probe = await QmpClient.connect(testSock);
  t.teardown(() => probe.close());
  const running = async () => (await probe.execute<{ running: boolean }>('query-status')).running;
  // a monitor that holds back everything from the first `stop` on (QEMU busy: the command is
  // carried out late), until the test lets it through
  const proxySock = path.join(dir, 'proxy.qmp');
  let holding: Promise<void> | null = null;
  let release: () => void = () => undefined;
  let pending = '';
  await qmpProxy(t, qmpSock, proxySock, (text) => {
    if (!holding && /"execute"\s*:\s*"stop"/.test(text)) holding = new Promise<void>((r) => { release = r; });
    if (!holding) return;
    pending += text;
    return holding;
  });
  const tr = await QemuTracker.open({ name: 'pauselate', qmpSocket: proxySock, disks: [{ node: 'disk0' }], runDir: dir, qmpTimeoutMs: 3000 });
  t.teardown(() => tr.close().catch(() => undefined));
  t.equal(await running(), true, 'running');
  await t.rejects(tr.pauseGuest(), { code: 'MOB_ERR_QMP' }, 'the stop got no answer in time: the pause failed');
  t.match(pending, /"stop"/, 'the stop is still on its way to QEMU');
  // the tracker sends a cont after the stop that got no answer (it is queued behind it)
  for (let i = 0; !/"cont"/.test(pending); i++) {
    if (i > 1000) break;
    await sleep(10);
  }
  t.match(pending, /"cont"/, 'a cont follows the stop that got no answer');
  release();
  // one more command on the same monitor: QEMU answers it after the stop and whatever followed it
  await tr.selfCheck();
  t.equal(await running(), true, 'QEMU carried the stop out late, and the guest runs again');
});

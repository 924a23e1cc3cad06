/**
 * Host mode app-consistent points through the QEMU guest agent, end to end: `mobility protect
 * --qmp ... --guest-agent SOCKET` protects a qcow2 disk of a real qemu-storage-daemon, a real
 * `mobility server` keeps the points, and the "guest" is a real qemu-ga on this host that may
 * freeze only an ext4 on a loop device (test/qemu-ga.ts: own mount namespace, the unbounded
 * guest-fsfreeze-freeze blocked; --guest-mount names the loop filesystem).
 *
 *   - a guest left frozen (as by an agent killed inside a freeze) is thawed when protection starts;
 *   - an app-consistent cut freezes the guest through its agent: a frozen-phase hook finds the
 *     filesystem frozen and MOBILITY_MOUNTS naming it; the point is recorded as app-consistent
 *     with the filesystem in its mounts, and the guest is thawed afterwards;
 *   - with the guest agent gone, an app-consistent cut is recorded crash-consistent (note: MOB_ERR_GUEST_AGENT) while
 *     crash-consistent cuts go on.
 *
 * Needs qemu-storage-daemon, qemu-img, nbdinfo, /dev/fuse, qemu-ga: a missing one fails.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { cleanup } from '../cleanup.js';
import { startServer } from '../helpers.js';
import { Agent, LONG, type Ev } from '../protect-harness.js';
import { QemuDaemon, createImage, requireQemuTools } from '../source/qemu/qemu-daemon.js';
import { mountExt4 } from '../mount-helpers.js';
import { startQemuGa } from '../qemu-ga.js';
import { startWriter, writerBlocks } from '../frozen-writer.js';
import { GuestAgentClient } from '../../src/source/qemu/guest-agent.js';

t.test('host mode: app-consistent cuts freeze the guest through its QEMU guest agent', async (tt) => {
  requireQemuTools();
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is required (QEMU exports the disks to the agent through FUSE)');
  const c = cleanup(tt);
  const dir = c.dir('host-ga-');
  const image = path.join(dir, 'vm-disk0.qcow2');
  createImage(image, 'qcow2', String(16 * 1024 * 1024));
  const daemon = new QemuDaemon(c, dir, [{ image, format: 'qcow2' }]);
  await daemon.start();
  const server = await startServer(tt, path.join(dir, 'srv'));
  const mnt = await mountExt4(tt, { sizeMb: 16 });
  const ga = await startQemuGa(tt, { dir: c.dir('qga-'), mounts: [mnt] });

  // a frozen-phase hook: is the guest's filesystem frozen now? (FIFREEZE on a frozen filesystem
  // answers EBUSY; on a thawed one it freezes, and the hook thaws it again at once)
  const hooks = path.join(dir, 'hooks');
  const seen = path.join(dir, 'seen.txt');
  fs.mkdirSync(path.join(hooks, 'frozen'), { recursive: true });
  fs.writeFileSync(path.join(hooks, 'frozen', '10-check'), `#!/bin/sh
if fsfreeze -f ${JSON.stringify(mnt)} 2>/dev/null; then fsfreeze -u ${JSON.stringify(mnt)}; s=thawed; else s=frozen; fi
echo "$MOBILITY_CUT_KIND $s $MOBILITY_MOUNTS" >> ${JSON.stringify(seen)}
`, { mode: 0o755 });

  // a guest left frozen, as an agent killed inside a freeze leaves it
  const qga = await GuestAgentClient.connect(ga.socket);
  tt.equal(await qga.freeze([mnt]), 1, 'the guest is frozen before protection starts');
  qga.close();
  const stuck = startWriter(tt, path.join(mnt, 'stuck'));
  tt.equal(await writerBlocks(stuck), true, 'a writer in the guest is stuck');

  const agentId = `hostga-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
  const args = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!,
    '--qmp', daemon.qmpSocket, '--nbd-socket', daemon.nbdSocket, '--disk', 'disk0=d0',
    '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'), '--json-logs', '--crash-interval', '15m', '--app-interval', '15m',
    '--hooks-dir', hooks, '--guest-agent', ga.socket, '--guest-mount', mnt];
  const agent = new Agent(c, args);
  await agent.waitEvent((e) => e.event === 'started', LONG, 'started');
  tt.equal(await stuck.done, 0, 'protection started by thawing the guest: the stuck writer finished');
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous', LONG, 'continuous');
  // the first point after the initial sync is app-consistent, taken by itself: after it, no cut
  // runs unless asked (15 min intervals), so what the guest shows below is after a cut, not in one
  const first = await agent.waitEvent((e) => e.event === 'cut' || e.event === 'cut-failed', LONG, 'the first point');
  tt.match(first, { event: 'cut', kind: 'app' }, 'the first point is app-consistent');

  const app = await agent.cut('app');
  tt.equal(app.event, 'cut', `the app-consistent cut made a point ${app.event === 'cut' ? '' : JSON.stringify(app)}`);
  tt.equal(app.kind, 'app');
  tt.same(app.mounts, [mnt], 'the point names the guest filesystem it froze');
  const lines = fs.readFileSync(seen, 'utf8').trim().split('\n');
  const appLines = lines.filter((l) => l.startsWith('app '));
  tt.equal(appLines.length, 2, `the frozen hook ran in both app cuts: ${lines.join(' | ')}`);
  tt.ok(appLines.every((l) => l === `app frozen ${mnt}`), 'in every app cut the guest filesystem was frozen while the frozen hooks ran, and MOBILITY_MOUNTS named it');
  const after = startWriter(tt, path.join(mnt, 'after'));
  tt.equal(await writerBlocks(after), false, 'the guest was thawed after the cut');
  const st = await GuestAgentClient.connect(ga.socket);
  tt.equal(await st.freezeStatus(), 'thawed', 'and its agent says so');
  st.close();
  await st.closed;

  // the guest agent goes away: app-consistent cuts fail, coded; crash-consistent ones go on
  await ga.kill();
  const failed = await agent.cut('app');
  tt.equal(failed.event, 'cut', 'an app cut without the guest agent still gives a point (the view needs nothing from the guest)');
  tt.equal(failed.kind, 'crash', 'recorded crash-consistent');
  tt.match(String(failed.note), /MOB_ERR_GUEST_AGENT/, `and says why: ${String(failed.note)}`);
  const crash = await agent.cut('crash');
  tt.equal(crash.event, 'cut', 'a crash-consistent cut still makes a point');
  tt.equal((crash as Ev).kind, 'crash');
  await agent.stop();
  tt.equal(await agent.exited, 0, 'the agent stopped cleanly');
});

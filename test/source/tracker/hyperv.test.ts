/**
 * The Hyper-V change tracker (src/source/tracker/hyperv.ts).
 *
 * A MOCK, by necessity: Hyper-V, Windows and PowerShell cannot run on the Linux machines this
 * project is tested on, so no real peer exists here. The scripts are checked as text (golden
 * files), and the tracker runs against SimHost (./hyperv-sim.ts): a simulated Hyper-V host that
 * decodes each script the tracker sends, reads its arguments, and answers as the WMI methods are
 * documented to. What only a real host could show (that the scripts run, and that Hyper-V
 * behaves as documented) is not shown here: the README says so. Points and data reads:
 * hyperv-point.test.ts.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  HyperVTracker, buildChangesScript, buildCreateReferencePointScript, buildDescribeScript, buildDestroyReferencePointScript,
  openPowerShellShell,
} from '../../../src/source/tracker/hyperv.js';
import type { DirtyExtent } from '../../../src/source/tracker/change-tracker.js';
import { MobilityError } from '../../../src/errors.js';
import { tmpDir } from '../../helpers.js';
import { GiB, SimHost } from './hyperv-sim.js';

// compiled to dist/test/source/tracker/: the golden files live in the source tree
const GOLDEN = fileURLToPath(new URL('../../../../test/source/tracker/golden/', import.meta.url));

function merged(list: DirtyExtent[]): string {
  return list.map((e) => `${e.disk}:${e.offset}+${e.length}`).join(' ');
}

t.test('golden: the four scripts for fixed arguments', async (t) => {
  const cases: [string, string][] = [
    ['hyperv-describe.ps1', buildDescribeScript('app01', 'Microsoft:RP-1')],
    ['hyperv-create-reference-point.ps1', buildCreateReferencePointScript('app01')],
    ['hyperv-changes.ps1', buildChangesScript([{ path: 'D:\\VMs\\app01\\disk0.vhdx', sizeBytes: 8 * GiB, since: 'rct:1' }])],
    ['hyperv-destroy-reference-point.ps1', buildDestroyReferencePointScript('Microsoft:RP-1')],
  ];
  for (const [file, text] of cases) {
    const f = path.join(GOLDEN, file);
    if (process.env.UPDATE_GOLDEN === '1') {
      fs.mkdirSync(GOLDEN, { recursive: true });
      fs.writeFileSync(f, text);
    }
    t.equal(text, fs.readFileSync(f, 'utf8'), `${file} matches (UPDATE_GOLDEN=1 rewrites it)`);
  }
});

t.test('arguments reach a script as data: quotes in a VM name cannot end the literal', async (t) => {
  const name = "o'brien \u2019); Remove-Item C:\\ -Recurse; ('";
  const host = new SimHost(name);
  const dir = await tmpDir(t);
  const tr = await HyperVTracker.open({ name: 'agent1', vm: name, stateDir: dir, shell: host, minDrainIntervalMs: 0 });
  t.equal(tr.disks.length, 2, 'the simulated host read the exact name back');
  const text = buildDescribeScript(name, null);
  const line = text.split('\n').find((l) => l.startsWith('$a = '))!;
  t.match(line, /^\$a = ConvertFrom-Json '(?:[^'\u2018-\u201B]|''|\u2019\u2019)*'$/, 'one single-quoted literal, every quote doubled');
  await tr.close({ keep: false });
});

t.test('first start, rounds, restart, loss and repair on a simulated host', async (t) => {
  const host = new SimHost();
  const dir = await tmpDir(t);
  const open = () => HyperVTracker.open({ name: 'agent1', vm: 'app01', stateDir: dir, shell: host, minDrainIntervalMs: 0 });

  let tr = await open();
  t.equal(tr.resumed, false, 'first start: not resumed');
  t.equal(tr.openLoss, 'no Hyper-V tracking state (first start)');
  t.equal(host.points.size, 1, 'one reference point: the base');
  const stateFile = path.join(dir, 'hyperv-agent1.json');
  t.equal(fs.statSync(stateFile).mode & 0o777, 0o600, 'the state file is 0600');
  t.same(await tr.drain(), [], 'nothing written yet');

  host.write(0, 4096, 8192);
  host.write(0, 12288, 4096); // adjacent: merged
  host.write(1, GiB, 65536);
  host.write(0, 8 * GiB - 512, 512); // the last sector
  const raw: Buffer[] = [];
  let before = 0;
  const journal = { beforeRead: () => { before++; }, afterRead: (b: Buffer) => { raw.push(b); } };
  const got = await tr.drain(journal);
  t.equal(merged(got), `0:4096+12288 0:${8 * GiB - 512}+512 1:${GiB}+65536`, 'every write, merged and sorted');
  t.equal(before, 1);
  t.equal(merged(tr.parseText(Buffer.concat(raw).toString())), merged(got), 'the journal record replays to the same extents');
  t.ok(host.changeCalls > 2, 'the listing went on where GetVirtualDiskChanges stopped (ProcessedByteLength)');
  t.equal(host.points.size, 1, 'the old base was destroyed once the new one was recorded');
  t.same(await tr.drain(), [], 'changes are consumed');

  // a round that fails after the new reference point was made: nothing is lost
  host.write(1, 0, 4096);
  host.failNext = /List the changes/;
  await t.rejects(tr.drain(), { code: 'MOB_ERR_HYPERV' }, 'the failed listing is a coded error');
  t.equal(host.points.size, 1, 'the failed round left no reference point behind');
  t.equal(merged(await tr.drain()), '1:0+4096', 'the next round lists the write again');

  // agent restart: the base is kept on the host and in the state file
  const identity = tr.identity;
  await tr.close({ keep: true });
  t.ok(host.closed, 'the shell is closed');
  host.write(0, 1 << 20, 4096); // written while the agent was down
  tr = await open();
  t.equal(tr.resumed, true, 'restart: resumed');
  t.equal(tr.identity, identity, 'the same base');
  t.equal(merged(await tr.drain()), `0:${1 << 20}+4096`, 'what was written while the agent was down is delivered');
  t.equal(await tr.selfCheck(), null, 'self-check passes');

  // the disk's change log is reset (edited offline): the round says so, the caller resyncs and repairs
  host.resetRct(1);
  host.write(0, 0, 4096);
  t.equal(merged(await tr.drain()), '0:0+4096', 'the other disk\'s changes are still delivered');
  t.match(await tr.selfCheck(), /returned 32773 for D:\\VMs\\app01\\data\.vhdx/, 'the loss is reported with its reason');
  await tr.repair();
  t.equal(await tr.selfCheck(), null, 'after repair the self-check passes');
  t.equal(host.points.size, 1, 'one base after repair');

  // the base removed on the host behind the agent's back
  host.points.clear();
  t.match(await tr.selfCheck(), /no longer exists on the host/);
  await tr.close({ keep: true });
  tr = await open();
  t.equal(tr.resumed, false, 'reopened without its base: not resumed');
  t.match(tr.openLoss, /no longer exists on the host/);

  // protection disabled: the base and the state file go
  await tr.close({ keep: false });
  t.equal(host.points.size, 0, 'no reference point left');
  t.notOk(fs.existsSync(stateFile), 'no state file left');
});

t.test('what cannot be tracked is refused with MOB_ERR_HYPERV and a fix', async (t) => {
  const dir = await tmpDir(t);
  const refuse = async (host: SimHost, vm: string, re: RegExp, what: string) => {
    const err = await HyperVTracker.open({ name: 'agent1', vm, stateDir: dir, shell: host }).catch((e: unknown) => e);
    t.ok(err instanceof MobilityError && err.code === 'MOB_ERR_HYPERV', `${what}: MOB_ERR_HYPERV`);
    t.match((err as Error).message, re, what);
  };
  await refuse(new SimHost(), 'nosuchvm', /no virtual machine named nosuchvm/, 'an unknown VM');
  const old = new SimHost();
  old.version = '5.0';
  await refuse(old, 'app01', /configuration version 5\.0.*Update-VMVersion/, 'a configuration older than 6.2');
  const vhd = new SimHost();
  vhd.disks[1]!.format = 'VHD';
  await refuse(vhd, 'app01', /data\.vhdx of VM app01 is VHD;.*Convert-VHD/, 'a VHD disk');
  const none = new SimHost();
  none.disks = [];
  await refuse(none, 'app01', /has no virtual hard disk/, 'a VM without disks');
  await t.rejects(HyperVTracker.open({ name: 'bad name', vm: 'app01', stateDir: dir, shell: new SimHost() }), { code: 'MOB_ERR_HYPERV' });
  t.equal(fs.readdirSync(dir).length, 0, 'nothing was written for a refused open');
});

t.test('the real shell: no PowerShell executable here -> MOB_ERR_HYPERV', async (t) => {
  const prev = process.env.NODE_POWERSHELL;
  process.env.NODE_POWERSHELL = path.join(await tmpDir(t), 'no-such-pwsh');
  t.teardown(() => { if (prev === undefined) delete process.env.NODE_POWERSHELL; else process.env.NODE_POWERSHELL = prev; });
  const shell = await openPowerShellShell(30_000);
  await t.rejects(shell.run('Get-Date'), { code: 'MOB_ERR_HYPERV', message: /no PowerShell executable was found/ });
  await shell.close();
});

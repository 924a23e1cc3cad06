/**
 * VmProtections (src/agent/vm-protection.ts), the host daemon's protection of its VMs, with a
 * protector that stands in for the real one (the seam `create`): what each VM's protector is
 * built with, a failing VM restarted with backoff without touching the others, an assignment
 * change restarting only the VMs it changed, a VM no longer assigned stopped and its state
 * removed, cuts routed by machine id, events sent for the VM's machine.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import winston from 'winston';
import { MobilityError } from '../../src/errors.js';
import type { ProtectEvent, ProtectOptions } from '../../src/agent/protector.js';
import { VmProtections, type VmAssignment, type VmProtector } from '../../src/agent/vm-protection.js';
import type { GroupCutLink } from '../../src/agent/group-member.js';
import { tmpDir, waitFor } from '../helpers.js';

class FakeProtector implements VmProtector {
  cuts: string[] = [];
  groups: string[] = [];
  stopped = false;
  failed = false;
  private end!: (err?: Error) => void;
  private readonly done = new Promise<void>((resolve, reject) => { this.end = (err) => (err ? reject(err) : resolve()); });
  constructor(readonly o: ProtectOptions) {}
  run(): Promise<void> { return this.done; }
  stop(): void { this.stopped = true; this.end(); }
  requestCut(kind: string): void { this.cuts.push(kind); }
  requestGroupCut(link: GroupCutLink): void { this.groups.push(link.point); }
  fail(err: Error): void { this.failed = true; this.end(err); }
  emit(e: ProtectEvent): void { this.o.onEvent?.(e); }
}

const policy = { name: 'p', crashIntervalMs: 60_000, appIntervalMs: 0, compress: true, bandwidthBytes: 0 };
const vm = (name: string, disks: string[], o: Partial<VmAssignment> = {}): VmAssignment => ({
  machineId: `kvm1.${name}`, name, qmpSocket: `/run/qemu-server/${name}.qmp`, guestAgentSocket: null, policy, disks: disks.map((n) => ({ diskId: n, node: n })), ...o,
});

t.test('one protector per VM: isolated failures, restarts only where the assignment changed', async (t) => {
  const stateDir = await tmpDir(t);
  const made: FakeProtector[] = [];
  const sent: Record<string, unknown>[] = [];
  const v = new VmProtections({
    connection: () => ({ serverUrl: 'wss://s:1/v1/replicate', token: '', ca: 'CA', pin: 'PIN', cert: 'CERT', key: 'KEY' }),
    stateDir: () => stateDir, hooksDir: () => undefined,
    log: winston.createLogger({ silent: true }),
    send: (m) => sent.push(m as Record<string, unknown>),
    create: async (o) => { const p = new FakeProtector(o); made.push(p); return p; },
    restartMinMs: 20, restartMaxMs: 200,
  });
  t.teardown(() => v.stop());
  const of = (id: string) => made.filter((p) => p.o.agentId === id);
  const live = (id: string) => of(id).filter((p) => !p.stopped && !p.failed).at(-1);

  await v.apply([vm('a', ['drive-scsi0', 'drive-scsi1'], { guestAgentSocket: '/run/qemu-server/a.qga' }), vm('b', ['disk0'])]);
  t.equal(made.length, 2, 'one protector per VM');
  t.match(made[0].o, {
    agentId: 'kvm1.a', disks: [{ path: 'drive-scsi0', id: 'drive-scsi0' }, { path: 'drive-scsi1', id: 'drive-scsi1' }], stateDir,
    qemu: { qmpSocket: '/run/qemu-server/a.qmp', guestAgentSocket: '/run/qemu-server/a.qga' }, cert: 'CERT', key: 'KEY', crashIntervalMs: 60_000,
  }, 'runs as the VM machine, on its nodes, with the host\'s credentials and the VM\'s sockets');
  t.same(made[1].o.qemu, { qmpSocket: '/run/qemu-server/b.qmp' }, 'no guest agent socket: none passed');
  t.equal(made[0].o.appIntervalMs, 0, 'a policy\'s app interval 0 (none) reaches the protector as 0, not as its 60-minute default');
  t.same([...v.heldSockets()].sort(), ['/run/qemu-server/a.qmp', '/run/qemu-server/b.qmp'], 'both sockets held');

  // events are the VM's machine's
  made[0].emit({ event: 'state', disk: 'drive-scsi0', state: 'continuous', reason: 'x' });
  t.match(sent.at(-1), { type: 'event', machineId: 'kvm1.a', event: { event: 'state', disk: 'drive-scsi0' } });

  // VM a stops (its QMP socket went): reported, restarted after the backoff; b untouched
  made[0].fail(new MobilityError('MOB_ERR_QMP', 'QMP socket /run/qemu-server/a.qmp: ENOENT'));
  await waitFor(() => of('kvm1.a').length === 2, 60_000, 'VM a restarted');
  t.match(sent.find((m) => (m.event as { event?: string })?.event === 'protect-failed'), { machineId: 'kvm1.a', event: { code: 'MOB_ERR_QMP' } }, 'the failure is sent for the VM');
  t.equal(of('kvm1.b').length, 1, 'VM b was not restarted');
  t.notOk(made[1].stopped, 'and still runs');
  // it fails again: the next wait doubles (not observable without a clock: the restart still comes)
  live('kvm1.a')!.fail(new MobilityError('MOB_ERR_QMP', 'again'));
  await waitFor(() => of('kvm1.a').length === 3, 60_000, 'VM a restarted again');

  // cuts by machine id
  t.equal(v.requestCut('kvm1.b', 'app', 60_000), true);
  t.same(made[1].cuts, ['app'], 'the cut reached VM b only');
  t.equal(v.requestCut('kvm1.zzz', 'crash', 60_000), 'unknown');
  v.requestGroupCut('kvm1.a', { point: 'gp1' } as GroupCutLink);
  t.same(live('kvm1.a')!.groups, ['gp1']);
  t.throws(() => v.requestGroupCut('kvm1.zzz', { point: 'gp2' } as GroupCutLink), { code: 'MOB_ERR_NOT_PROTECTING' });

  // an assignment change of a only: a restarts, b does not
  const before = { a: of('kvm1.a').length, b: of('kvm1.b').length };
  await v.apply([vm('a', ['drive-scsi0']), vm('b', ['disk0'])]);
  t.equal(of('kvm1.a').length, before.a + 1, 'a restarted with its new disks');
  t.same(live('kvm1.a')!.o.disks, [{ path: 'drive-scsi0', id: 'drive-scsi0' }]);
  t.equal(of('kvm1.b').length, before.b, 'b kept running');
  await v.apply([vm('a', ['drive-scsi0']), vm('b', ['disk0'], { policy: { ...policy, crashIntervalMs: 30_000 } })]);
  t.equal(of('kvm1.b').length, before.b + 1, 'a policy change of b restarts b');
  t.equal(of('kvm1.a').length, before.a + 1, 'and not a');

  // b is no longer assigned: stopped, its state removed
  fs.mkdirSync(path.join(stateDir, 'kvm1.b'), { recursive: true });
  fs.writeFileSync(path.join(stateDir, 'kvm1.b', 'disk0.map'), 'x');
  await v.apply([vm('a', ['drive-scsi0'])]);
  t.ok(of('kvm1.b').every((p) => p.stopped), 'b stopped');
  t.notOk(fs.existsSync(path.join(stateDir, 'kvm1.b')), 'its state is removed');
  t.same(v.assigned(), ['kvm1.a']);
  t.equal(v.requestCut('kvm1.b', 'crash', 60_000), 'unknown');

  await v.stop();
  t.ok(made.every((p) => p.stopped || p.failed), 'stop() stops every VM still running');
  t.ok(made.filter((p) => !p.failed).length >= 2, 'and there were running ones');
});

t.test('a host the server refused stops every VM, keeps their state, and starts them again when assigned', async (t) => {
  const stateDir = await tmpDir(t);
  const made: FakeProtector[] = [];
  const removed: string[] = [];
  const v = new VmProtections({
    connection: () => ({ serverUrl: 'wss://s:1/v1/replicate', token: '', ca: 'CA', pin: 'PIN', cert: 'CERT', key: 'KEY' }),
    stateDir: () => stateDir, hooksDir: () => undefined,
    log: winston.createLogger({ silent: true }),
    send: () => undefined,
    create: async (o) => { const p = new FakeProtector(o); made.push(p); return p; },
    removeTracking: async (o) => { removed.push(...o.disks.map((d) => d.node)); },
    restartMinMs: 20, restartMaxMs: 200,
  });
  t.teardown(() => v.stop());
  const vms = [vm('a', ['disk0']), vm('b', ['disk0'])];
  await v.apply(vms);
  for (const id of ['kvm1.a', 'kvm1.b']) fs.mkdirSync(path.join(stateDir, id), { recursive: true });
  // one VM is waiting for its restart when the refusal comes: it must not come back either
  made[1].fail(new MobilityError('MOB_ERR_QMP', 'gone'));
  await v.pause();
  t.ok(made.every((p) => p.stopped || p.failed), 'every VM protector stopped');
  t.same(v.assigned(), [], 'no VM assigned any more');
  t.same(removed, [], 'QEMU keeps recording: no bitmap removed');
  t.ok(fs.existsSync(path.join(stateDir, 'kvm1.a')) && fs.existsSync(path.join(stateDir, 'kvm1.b')), 'their tracking state is kept');
  const before = made.length;
  await new Promise((r) => setTimeout(r, 300));
  t.equal(made.length, before, 'no restart after the refusal (the backoff timer was cleared)');
  // the operator acted: the server assigns the VMs again
  await v.apply(vms);
  t.equal(made.length, before + 2, 'both VMs start again');
  t.ok(v.running('kvm1.a') && v.running('kvm1.b'), 'and run');
});

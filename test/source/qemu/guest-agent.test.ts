/**
 * The QEMU guest agent client (src/source/qemu/guest-agent.ts) and GuestAgentQuiescer
 * (src/agent/guest-agent-quiescer.ts) against the real agent, qemu-ga, run on this host in a
 * mount namespace of its own (test/qemu-ga.ts) and freezing only an ext4 on a loop device through
 * guest-fsfreeze-freeze-list (the unbounded guest-fsfreeze-freeze is blocked). Whether the
 * filesystem is frozen is shown by a writer (dd with fsync): it sleeps in the kernel on the
 * frozen filesystem, and finishes after the thaw.
 *
 * Also: a socket that accepts and never answers (a VM without an agent), a missing socket, stale
 * bytes before the sync answer (a proxy in front of qemu-ga injects them, as a virtio-serial
 * channel keeps a previous client's leftovers), a freeze whose answer comes after the bound
 * (the proxy holds it back: the thaw must still be sent and confirmed), qemu-ga killed inside a
 * freeze, and an agent of ours killed inside a freeze (releaseStale).
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { GuestAgentClient, GuestAgentCommandError, GuestAgentStream, guestAgentError, type GuestAgentEvent } from '../../../src/source/qemu/guest-agent.js';
import { GuestAgentQuiescer } from '../../../src/agent/guest-agent-quiescer.js';
import { MobilityError } from '../../../src/errors.js';
import { cleanup } from '../../cleanup.js';
import { tmpDir } from '../../helpers.js';
import { mountExt4 } from '../../mount-helpers.js';
import { silentSocket, startQemuGa } from '../../qemu-ga.js';
import { blockedOnFreeze, startWriter, writerBlocks } from '../../frozen-writer.js';

/** Freezes in these tests are bounded generously: the machine is busy, and a bound hit is not what they test. */
const FREEZE_BOUND_MS = 60_000;

async function setup(t: Test): Promise<{ mnt: string; dir: string; socket: string; ga: Awaited<ReturnType<typeof startQemuGa>> }> {
  const mnt = await mountExt4(t, { sizeMb: 16 });
  const dir = await tmpDir(t, 'qga-');
  const ga = await startQemuGa(t, { dir, mounts: [mnt] });
  return { mnt, dir, socket: ga.socket, ga };
}

async function rejectsCoded(t: Test, p: Promise<unknown>, message: RegExp, what: string): Promise<MobilityError | null> {
  try {
    await p;
    t.fail(`${what}: resolved`);
    return null;
  } catch (err) {
    t.ok(err instanceof MobilityError, `${what}: a MobilityError`);
    t.equal((err as MobilityError).code, 'MOB_ERR_GUEST_AGENT', `${what}: MOB_ERR_GUEST_AGENT`);
    t.match((err as Error).message, message, `${what}: says why`);
    return err as MobilityError;
  }
}

t.test('stream: stale bytes dropped until the sync answer, whatever the chunking', async (t) => {
  const fixture = Buffer.concat([
    Buffer.from('{"return": {}}\n{"retu'), // a previous client's answer, then half of one
    Buffer.from([0xff]), Buffer.from('{"return": 99}\n{"return": "frozen"}\n{"ret'), // a stale sync of someone else, a stale answer
    Buffer.from('{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'), // the agent's answer to our 0xFF, joined to the half line
    Buffer.from([0xff]), Buffer.from('{"return": 7}\n'), // our sync's answer
    Buffer.from('{"return": "thawed"}\n{"error": {"class": "CommandNotFound", "desc": "x é"}}\n'),
  ]);
  const want: GuestAgentEvent[] = [
    { kind: 'synced' },
    { kind: 'answer', message: { return: 'thawed' } },
    { kind: 'answer', message: { error: { class: 'CommandNotFound', desc: 'x é' } } },
  ];
  const fail = (w: string) => guestAgentError(`sent ${w}`);
  const run = (cuts: number[]) => {
    const st = new GuestAgentStream(fail);
    st.expectSync(7);
    const got: GuestAgentEvent[] = [];
    let from = 0;
    for (const c of [...cuts, fixture.length]) { got.push(...st.push(fixture.subarray(from, c))); from = c; }
    return got;
  };
  t.same(run([]), want, 'in one chunk');
  let bad = '';
  for (let i = 0; i <= fixture.length && !bad; i++) {
    for (const j of [i, Math.min(fixture.length, i + 1), Math.min(fixture.length, i + 5)]) {
      if (JSON.stringify(run([i, j])) !== JSON.stringify(want)) { bad = `split at ${i}/${j}`; break; }
    }
  }
  t.equal(bad, '', 'every split gives the same events');
  const bytes = [...Array(fixture.length).keys()];
  t.same(run(bytes), want, 'byte by byte');

  const st = new GuestAgentStream(fail);
  t.throws(() => st.push(Buffer.from('{"return": \n')), { code: 'MOB_ERR_GUEST_AGENT', message: /not JSON/ }, 'outside a sync, a line that is not JSON is a broken stream');
  const small = new GuestAgentStream(fail, 64);
  t.throws(() => small.push(Buffer.alloc(65, 0x61)), { code: 'MOB_ERR_GUEST_AGENT', message: /longer than 64 bytes/ }, 'lines are bounded');
});

/**
 * A scripted agent on a unix socket (a compromised guest answers what it likes): syncs properly,
 * then answers each command with `answers[command]` (raw JSON text of the `return`, or an error).
 */
async function hostileAgent(t: Test, dir: string, answers: Record<string, string>): Promise<{ socket: string; commands: string[] }> {
  const socket = path.join(dir, `hostile-${Math.random().toString(36).slice(2)}.sock`);
  const commands: string[] = [];
  const conns = new Set<net.Socket>();
  const srv = net.createServer((c) => {
    conns.add(c);
    c.on('error', () => undefined);
    c.on('close', () => conns.delete(c));
    let buf = '';
    c.on('data', (d: Buffer) => {
      buf += d.toString('latin1').replace(/\xff/g, '');
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as { execute: string; arguments?: { id?: number } };
        commands.push(cmd.execute);
        if (cmd.execute === 'guest-sync-delimited') c.write(Buffer.concat([Buffer.from([0xff]), Buffer.from(`{"return": ${cmd.arguments?.id}}\n`)]));
        else c.write(`${answers[cmd.execute] ?? '{"error": {"class": "CommandNotFound", "desc": "no"}}'}\n`);
      }
    });
  });
  await new Promise<void>((r) => srv.listen(socket, r));
  t.teardown(() => new Promise<void>((r) => { for (const c of conns) c.destroy(); srv.close(() => r()); }));
  return { socket, commands };
}

t.test('answers a compromised guest could give: checked, bounded, coded', async (t) => {
  const dir = await tmpDir(t, 'qga-hostile-');
  const long = 'x'.repeat(100_000);
  const a = await hostileAgent(t, dir, {
    'guest-fsfreeze-status': '{"return": "thawed"}',
    'guest-get-fsinfo': `{"return": [{"name": "a", "mountpoint": "/ok", "type": "ext4"}, {"mountpoint": "/bad\\nMOBILITY_X=1"}, {"mountpoint": "relative"}, {"mountpoint": 5}, "junk"]}`,
    'guest-fsfreeze-freeze': '{"return": "5"}',
    'guest-fsfreeze-thaw': `{"error": {"class": "GenericError\\u0007", "desc": "${long}"}}`,
    'guest-info': '{"return": {"version": 7}}',
  });
  const c = await GuestAgentClient.connect(a.socket);
  t.teardown(() => c.close());
  t.same((await c.fsInfo()).map((f) => f.mountpoint), ['/ok'], 'only absolute, printable mount points are kept');
  await rejectsCoded(t, c.freeze(), /answered guest-fsfreeze-freeze with something unexpected: "5"/, 'a count that is a string');
  const err = await rejectsCoded(t, c.thaw(), /guest-fsfreeze-thaw failed: GenericError\?: x+\.\.\.$/, 'a huge error text');
  t.ok(err && err.message.length < 700, `the agent's text is bounded in the message (${err?.message.length} characters)`);
  await rejectsCoded(t, c.info(), /answered guest-info with something unexpected/, 'a guest-info of the wrong shape');
  c.close();

  // the quiescer: a freeze answered with nonsense is not taken for a freeze, and is thawed
  const q = new GuestAgentQuiescer({ socket: a.socket });
  await rejectsCoded(t, q.freeze(FREEZE_BOUND_MS), /could not freeze the guest .*something unexpected.*thaw was NOT confirmed/, 'quiescer freeze');
  t.same(q.targets(), ['/ok'], 'targets: the one sane mount point');
  t.ok(a.commands.filter((x) => x === 'guest-fsfreeze-thaw').length >= 2, 'the quiescer sent a thaw after the bad freeze answer');
});

t.test('client against qemu-ga: ping, info, fsinfo, freeze-list blocks writers, status, thaw releases them', async (t) => {
  const { mnt, socket } = await setup(t);
  const c = await GuestAgentClient.connect(socket);
  t.teardown(() => c.close());
  await c.ping();
  const info = await c.info();
  t.match(info.version, /^\d+\.\d+/, `agent version ${info.version}`);
  const cmd = (n: string) => info.supported_commands.find((x) => x.name === n);
  t.equal(cmd('guest-fsfreeze-freeze-list')?.enabled, true, 'freeze-list enabled');
  t.equal(cmd('guest-fsfreeze-freeze')?.enabled, false, 'the unbounded freeze is blocked in this test');
  const fsi = await c.fsInfo();
  t.ok(fsi.some((f) => f.mountpoint === mnt && f.type === 'ext4'), 'guest-get-fsinfo lists the loop ext4');
  t.equal(await c.freezeStatus(), 'thawed');

  const err = await c.freeze().then(() => null, (e: unknown) => e);
  t.ok(err instanceof GuestAgentCommandError, 'a blocked command: the agent\'s refusal, coded');
  t.equal((err as GuestAgentCommandError).code, 'MOB_ERR_GUEST_AGENT');
  t.equal((err as GuestAgentCommandError).qgaClass, 'CommandNotFound');
  t.match((err as Error).message, /guest-fsfreeze-freeze failed: CommandNotFound: .*disabled/);

  t.equal(await c.freeze([mnt]), 1, 'one filesystem frozen');
  const w = startWriter(t, path.join(mnt, 'data'));
  t.equal(await writerBlocks(w), true, 'a writer blocks on the frozen filesystem');
  t.equal(await c.freezeStatus(), 'frozen');
  t.equal(await c.thaw(), 1, 'one filesystem thawed');
  t.equal(await w.done, 0, 'the writer finished after the thaw');
  t.equal(fs.statSync(path.join(mnt, 'data')).size, 16384, 'and its data is there');
  t.equal(await c.freezeStatus(), 'thawed');
});

t.test('a socket that accepts and never answers (no agent in the guest): coded error within the bound', async (t) => {
  const dir = await tmpDir(t, 'qga-silent-');
  const sock = path.join(dir, 'silent.sock');
  await silentSocket(t, sock);
  const t0 = Date.now();
  await rejectsCoded(t, GuestAgentClient.connect(sock, { timeoutMs: 1000 }), /no answer to guest-sync-delimited .*within 1000 ms.*qemu-ga/, 'connect');
  const ms = Date.now() - t0;
  t.ok(ms >= 950, `it waited for the bound (${ms} ms)`);
  t.ok(ms < 1000 + 20_000, `and not much longer (${ms} ms)`);
  const q = new GuestAgentQuiescer({ socket: sock });
  await rejectsCoded(t, q.freeze(1500), /cannot freeze the guest: no answer/, 'quiescer freeze');
  t.same(await q.thaw(), [], 'thaw after a failed freeze: nothing to do');
  await rejectsCoded(t, q.thawStale(1000), /no answer/, 'thawStale');
  await rejectsCoded(t, new GuestAgentQuiescer({ socket: sock, thawTimeoutMs: 1000 }).releaseStale(), /no answer/, 'releaseStale');
  t.same(q.targets(), [`guest agent ${sock}`], 'targets name the agent when it told nothing');
  await rejectsCoded(t, GuestAgentClient.connect(path.join(dir, 'missing.sock')), /ENOENT/, 'a missing socket');
});

interface Proxy { socket: string; connections: number }

/**
 * A unix proxy in front of qemu-ga. `inject` is written to each client first (stale bytes of a
 * previous client). With `holdFrom`, the agent's answers are held back from the moment the client
 * sends a command containing `holdFrom` until it sends one containing `releaseOn`. With `trickle`,
 * the agent's bytes are passed on one at a time (the client must parse chunks of any size).
 */
async function proxy(t: Test, dir: string, upstream: string, o: { inject?: Buffer; holdFrom?: string; releaseOn?: string; trickle?: boolean }): Promise<Proxy> {
  const socket = path.join(dir, `proxy-${Math.random().toString(36).slice(2)}.sock`);
  const res: Proxy = { socket, connections: 0 };
  const open = new Set<net.Socket>();
  const srv = net.createServer((client) => {
    res.connections++;
    const up = net.createConnection({ path: upstream });
    open.add(client); open.add(up);
    if (o.inject) client.write(o.inject);
    let holding = false;
    const held: Buffer[] = [];
    client.on('data', (d: Buffer) => {
      const s = d.toString('latin1');
      if (o.holdFrom && s.includes(o.holdFrom)) holding = true;
      up.write(d);
      if (holding && o.releaseOn && s.includes(o.releaseOn)) {
        holding = false;
        for (const b of held.splice(0)) toClient(b);
      }
    });
    let chain = Promise.resolve();
    const toClient = (d: Buffer) => {
      if (!o.trickle) { client.write(d); return; }
      for (const b of d) chain = chain.then(() => new Promise<void>((r) => setImmediate(() => { if (!client.destroyed) client.write(Buffer.from([b])); r(); })));
    };
    up.on('data', (d: Buffer) => { if (holding) held.push(d); else toClient(d); });
    const end = () => { client.destroy(); up.destroy(); };
    client.on('close', end); up.on('close', end);
    client.on('error', end); up.on('error', end);
  });
  await new Promise<void>((r) => srv.listen(socket, r));
  t.teardown(() => new Promise<void>((r) => { for (const s of open) s.destroy(); srv.close(() => r()); }));
  return res;
}

t.test('stale bytes before the sync answer are discarded', async (t) => {
  const { mnt, dir, socket } = await setup(t);
  // a previous client's leftovers: answers, a stale sentinel with a stale sync answer, half a line
  const stale = Buffer.concat([
    Buffer.from('{"return": {}}\n{"error": {"class": "GenericError", "desc": "old"}}\n'),
    Buffer.from([0xff]), Buffer.from('{"return": 424242}\n{"return": "frozen"}\n{"retu'),
  ]);
  const p = await proxy(t, dir, socket, { inject: stale });
  const c = await GuestAgentClient.connect(p.socket);
  t.teardown(() => c.close());
  t.equal(await c.freezeStatus(), 'thawed', 'the first answer after the sync is the agent\'s, not a stale "frozen"');
  await c.ping();
  t.equal(await c.freeze([mnt]), 1);
  t.equal(await c.freezeStatus(), 'frozen');
  t.equal(await c.thaw(), 1);
  t.equal(p.connections, 1);
  c.close(); // the agent serves one client at a time: the next one waits for this one to go
  await c.closed;

  // the same, the agent's bytes arriving one at a time: its answer to our 0xFF (a parse error)
  // then lands alone, joined to the stale half line
  const slow = await proxy(t, dir, socket, { inject: stale, trickle: true });
  const c2 = await GuestAgentClient.connect(slow.socket);
  t.teardown(() => c2.close());
  t.equal(await c2.freezeStatus(), 'thawed', 'byte by byte: in sync');
  await c2.ping();
});

t.test('quiescer: freeze-list and thaw with a real agent; targets; thaw idempotent', async (t) => {
  const { mnt, socket } = await setup(t);
  const q = new GuestAgentQuiescer({ socket, mountpoints: [mnt] });
  t.same(q.targets(), [mnt]);
  await q.freeze(FREEZE_BOUND_MS);
  const w = startWriter(t, path.join(mnt, 'data'));
  t.equal(await writerBlocks(w), true, 'frozen: the writer blocks');
  t.same(await q.thaw(), [], 'thawed');
  t.equal(await w.done, 0, 'the writer finished');
  t.same(await q.thaw(), [], 'a second thaw: harmless');

  // the whole guest (no list): refused by this test's agent, which blocks that command; what the
  // agent answered is in the error, and nothing is left frozen
  const whole = new GuestAgentQuiescer({ socket });
  await rejectsCoded(t, whole.freeze(FREEZE_BOUND_MS), /could not freeze the guest .*disabled.*thawed/, 'a refused freeze');
  t.ok(whole.targets().includes(mnt) && whole.targets().includes('/'), `targets from guest-get-fsinfo: ${whole.targets().join(' ')}`);
  const w2 = startWriter(t, path.join(mnt, 'data2'));
  t.equal(await writerBlocks(w2), false, 'nothing frozen after the refused freeze');

  // a listed mount point the agent does not know: it freezes the others; we thaw and refuse
  const partial = new GuestAgentQuiescer({ socket, mountpoints: [mnt, path.join(mnt, 'not-a-mount')] });
  await rejectsCoded(t, partial.freeze(FREEZE_BOUND_MS), /froze 1 of the 2 listed mount points.*thawed \(1 filesystem\)/, 'a partial freeze');
  const w3 = startWriter(t, path.join(mnt, 'data3'));
  t.equal(await writerBlocks(w3), false, 'nothing frozen after the partial freeze');
});

t.test('quiescer: a guest already frozen by another client is refused and left frozen', async (t) => {
  const { mnt, socket } = await setup(t);
  const other = await GuestAgentClient.connect(socket);
  t.equal(await other.freeze([mnt]), 1);
  other.close();
  const q = new GuestAgentQuiescer({ socket, mountpoints: [mnt] });
  await rejectsCoded(t, q.freeze(FREEZE_BOUND_MS), /already frozen/, 'freeze of a frozen guest');
  t.same(await q.thaw(), [], 'thaw: not ours, nothing done');
  const c = await GuestAgentClient.connect(socket);
  t.teardown(() => c.close());
  t.equal(await c.freezeStatus(), 'frozen', 'the other client\'s freeze stands');
  t.equal(await c.thaw(), 1);
});

t.test('quiescer: an agent answer that comes after the bound: the thaw is still sent and confirmed', async (t) => {
  const { mnt, dir, socket } = await setup(t);
  // the proxy holds the agent's answers from the freeze until our thaw: the freeze really happens,
  // its answer arrives late, behind the thaw's
  const p = await proxy(t, dir, socket, { holdFrom: 'guest-fsfreeze-freeze-list', releaseOn: 'guest-fsfreeze-thaw' });
  const q = new GuestAgentQuiescer({ socket: p.socket, mountpoints: [mnt] });
  const w = startWriter(t, path.join(mnt, 'data'));
  await w.done;
  await rejectsCoded(t, q.freeze(1500), /freeze-list got no answer .*within .* ms; thawed \(1 filesystem\)/, 'a freeze past its bound');
  const w2 = startWriter(t, path.join(mnt, 'data2'));
  t.equal(await writerBlocks(w2), false, 'thawed: a writer goes through');
  t.same(await q.thaw(), [], 'nothing left to thaw');
});

t.test('qemu-ga killed inside a freeze: coded errors; restarted, releaseStale thaws', async (t) => {
  const { mnt, dir, ga } = await setup(t);
  const q = new GuestAgentQuiescer({ socket: ga.socket, mountpoints: [mnt], thawTimeoutMs: 5000 });
  await q.freeze(FREEZE_BOUND_MS);
  const w = startWriter(t, path.join(mnt, 'data'));
  t.equal(await writerBlocks(w), true, 'frozen');
  await ga.kill();
  const failed = await q.thaw();
  t.equal(failed.length, 1, 'thaw answers its failure (never throws)');
  t.match(failed[0], new RegExp(`guest agent ${ga.socket}: .*(ECONNREFUSED|ENOENT)`));
  const again = new GuestAgentQuiescer({ socket: ga.socket, mountpoints: [mnt] });
  await rejectsCoded(t, again.freeze(5000), /cannot freeze the guest: .*(ECONNREFUSED|ENOENT)/, 'a freeze with the agent gone');
  t.ok(blockedOnFreeze(w.pid), 'the filesystem is still frozen (nobody thawed it)');

  // an agent of ours starting now cannot release the stale freeze: its first freeze that reaches
  // the agent will
  const late = new GuestAgentQuiescer({ socket: ga.socket, mountpoints: [mnt], thawTimeoutMs: 2000 });
  await rejectsCoded(t, late.releaseStale(), /stale freeze .*first freeze that reaches the agent thaws it first/, 'releaseStale with the agent gone');

  // the agent comes back with the same state directory: it knows the guest is frozen
  const ga2 = await startQemuGa(t, { dir, mounts: [mnt] });
  const other = new GuestAgentQuiescer({ socket: ga2.socket, mountpoints: [mnt] });
  await rejectsCoded(t, other.freeze(FREEZE_BOUND_MS), /already frozen/, 'a quiescer without a failed releaseStale leaves the frozen guest alone');
  await late.freeze(FREEZE_BOUND_MS);
  t.same(await late.thaw(), [], 'the late quiescer thawed the stale freeze, froze, and thawed');
  t.equal(await w.done, 0, 'the blocked writer finished');
  const w2 = startWriter(t, path.join(mnt, 'data2'));
  await w2.done;
  // frozen again as by a killed agent: thawStale answers what it found
  const c = await GuestAgentClient.connect(ga2.socket);
  t.equal(await c.freeze([mnt]), 1);
  c.close();
  await c.closed;
  const fresh = new GuestAgentQuiescer({ socket: ga2.socket, mountpoints: [mnt] });
  const r = await fresh.thawStale();
  t.equal(r.wasFrozen, true, 'releaseStale found the guest frozen');
  t.ok(r.thawed >= 1, `and thawed it (${r.thawed})`);
  const w3 = startWriter(t, path.join(mnt, 'data3'));
  t.equal(await writerBlocks(w3), false, 'thawed');
  t.same(await fresh.thawStale(), { wasFrozen: false, thawed: 0 }, 'a second thawStale: nothing to do');
  t.same(await q.thaw(), [], 'the first quiescer\'s retried thaw now succeeds');
});

t.test('an agent of ours killed inside a freeze: releaseStale at the next start thaws the guest', async (t) => {
  const { mnt, socket } = await setup(t);
  const mod = fileURLToPath(new URL('../../../src/agent/guest-agent-quiescer.js', import.meta.url));
  const script = `import { GuestAgentQuiescer } from ${JSON.stringify(mod)};
const q = new GuestAgentQuiescer({ socket: ${JSON.stringify(socket)}, mountpoints: [${JSON.stringify(mnt)}] });
await q.freeze(${FREEZE_BOUND_MS});
process.stdout.write('frozen\\n');
setInterval(() => {}, 1000);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  cleanup(t).process(child);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => { out += d.toString(); if (out.includes('frozen')) resolve(); });
    child.once('exit', (code) => reject(new Error(`the freezing agent exited (${code}) before freezing: ${out}`)));
  });
  child.kill('SIGKILL');
  await exited;
  const w = startWriter(t, path.join(mnt, 'data'));
  t.equal(await writerBlocks(w), true, 'the killed agent left the guest frozen');
  const q = new GuestAgentQuiescer({ socket, mountpoints: [mnt] });
  t.same(await q.thawStale(), { wasFrozen: true, thawed: 1 }, 'thawStale (releaseStale with its report) thawed it');
  t.equal(await w.done, 0, 'the writer finished');
});

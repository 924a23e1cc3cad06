/**
 * The trace-instance lock (src/source/tracker/instance-lock.ts) with real processes: several
 * agents starting at once on a stale lock end with exactly one owner; a live owner makes the
 * others fail with MOB_ERR_TRACKER_BUSY; release removes only this process's own lock.
 * Every case uses its own lock directory (the lockDir parameter), never the machine's.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { acquireInstanceLock, assertInstanceFree, instanceOwner, processStartTime, releaseInstanceLock } from '../../../src/source/tracker/instance-lock.js';
import { cleanup } from '../../cleanup.js';
import { tmpDir } from '../../helpers.js';

const LOCK_MODULE = new URL('../../../src/source/tracker/instance-lock.js', import.meta.url).href;
/** pid_max is at most 2^22: this pid never exists. */
const DEAD = '999999999 1\n';
const NAME = 'mobility-locktest-0123abcd';

/**
 * A contender: imports the lock module, says "ready", and on "go" tries to take the lock. It
 * reports "owner" or "busy <code>"; an owner holds the lock at least 300 ms and until its stdin
 * is closed (so no later contender can see it released), then releases it.
 */
const CONTENDER = `
import { acquireInstanceLock, releaseInstanceLock } from ${JSON.stringify(LOCK_MODULE)};
const [name, dir] = process.argv.slice(2);
let started = false;
let ended = false;
let release = null;
process.stdin.on('data', (d) => {
  if (started || !String(d).includes('go')) return;
  started = true;
  try {
    acquireInstanceLock(name, dir);
  } catch (err) {
    process.stdout.write('busy ' + (err.code ?? err.message) + '\\n');
    process.exit(0);
  }
  process.stdout.write('owner\\n');
  const held = Date.now();
  release = () => setTimeout(() => { releaseInstanceLock(name, dir); process.exit(0); }, Math.max(0, 300 - (Date.now() - held)));
  if (ended) release();
});
process.stdin.on('end', () => { ended = true; if (release) release(); else if (!started) process.exit(0); });
process.stdout.write('ready\\n');
`;

interface Contender { child: ChildProcess; lines: string[]; next: (pred: (l: string) => boolean) => Promise<string>; exited: Promise<void> }

function contender(script: string, dir: string): Contender {
  const child = spawn(process.execPath, [script, NAME, dir], { stdio: ['pipe', 'pipe', 'inherit'] });
  cleanup().process(child);
  const lines: string[] = [];
  const waiters: { pred: (l: string) => boolean; resolve: (l: string) => void }[] = [];
  let buf = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i: number;
    while ((i = buf.indexOf('\n')) >= 0) {
      const l = buf.slice(0, i);
      buf = buf.slice(i + 1);
      lines.push(l);
      for (const w of [...waiters]) if (w.pred(l)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(l); }
    }
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const next = (pred: (l: string) => boolean) => {
    const hit = lines.find(pred);
    if (hit !== undefined) return Promise.resolve(hit);
    return new Promise<string>((resolve, reject) => {
      waiters.push({ pred, resolve });
      child.once('exit', () => setImmediate(() => reject(new Error(`contender ${child.pid} exited; said ${JSON.stringify(lines)}`))));
    });
  };
  return { child, lines, next, exited };
}

t.test('agents starting at once on a stale lock: exactly one owner, every round', async (t) => {
  const dir = await tmpDir(t, 'locks-');
  const script = path.join(dir, 'contender.mjs');
  fs.writeFileSync(script, CONTENDER);
  const lockDir = path.join(dir, 'trace-locks');
  fs.mkdirSync(lockDir);
  const lock = path.join(lockDir, `${NAME}.lock`);
  const N = 6;
  const ROUNDS = 30;
  const rounds: string[][] = [];
  for (let round = 0; round < ROUNDS; round++) {
    fs.writeFileSync(lock, DEAD);
    const cs = Array.from({ length: N }, () => contender(script, lockDir));
    await Promise.all(cs.map((c) => c.next((l) => l === 'ready')));
    for (const c of cs) c.child.stdin!.write('go\n');
    const said = await Promise.all(cs.map((c) => c.next((l) => l === 'owner' || l.startsWith('busy'))));
    // every contender has answered: now the owner may let go
    for (const c of cs) c.child.stdin!.end();
    await Promise.all(cs.map((c) => c.exited));
    rounds.push(said);
    const owners = said.filter((s) => s === 'owner').length;
    if (owners !== 1) t.fail(`round ${round + 1}: ${owners} owners (${said.join(', ')})`);
    const others = said.filter((s) => s !== 'owner');
    if (!others.every((s) => s === 'busy MOB_ERR_TRACKER_BUSY')) t.fail(`round ${round + 1}: unexpected answers ${others.join(', ')}`);
    if (fs.existsSync(lock)) t.fail(`round ${round + 1}: the owner's release left ${fs.readFileSync(lock, 'utf8').trim()}`);
    if (fs.existsSync(`${lock}.takeover`)) t.fail(`round ${round + 1}: a takeover file was left behind`);
  }
  t.equal(rounds.filter((r) => r.filter((s) => s === 'owner').length === 1).length, ROUNDS, `exactly one owner in each of ${ROUNDS} rounds of ${N} contenders`);
});

t.test('a live owner: others get MOB_ERR_TRACKER_BUSY and the lock is untouched', async (t) => {
  const lockDir = path.join(await tmpDir(t, 'locks-'), 'trace-locks');
  fs.mkdirSync(lockDir);
  const owner = cleanup(t).spawn('sleep', ['30']);
  await new Promise((r) => owner.once('spawn', r));
  const start = processStartTime(owner.pid!);
  t.ok(start, 'the owner runs');
  const lock = path.join(lockDir, `${NAME}.lock`);
  const content = `${owner.pid} ${start}\n`;
  fs.writeFileSync(lock, content);
  t.throws(() => acquireInstanceLock(NAME, lockDir), { code: 'MOB_ERR_TRACKER_BUSY', message: new RegExp(`in use by process ${owner.pid}`) });
  t.equal(fs.readFileSync(lock, 'utf8'), content, 'the owner\'s lock is unchanged');
  t.throws(() => assertInstanceFree(NAME, 'remove', lockDir), { code: 'MOB_ERR_TRACKER_BUSY' });
  t.same(instanceOwner(NAME, lockDir), { pid: owner.pid, startTime: start });
  releaseInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), content, 'release by another process leaves it');
  t.notOk(fs.existsSync(`${lock}.takeover`), 'no takeover was attempted');
});

t.test('release removes only this process\'s own lock', async (t) => {
  const lockDir = path.join(await tmpDir(t, 'locks-'), 'trace-locks');
  const lock = path.join(lockDir, `${NAME}.lock`);
  const me = processStartTime(process.pid)!;

  acquireInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), `${process.pid} ${me}\n`, 'a fresh lock names this process');
  acquireInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), `${process.pid} ${me}\n`, 'acquire is idempotent');
  t.doesNotThrow(() => assertInstanceFree(NAME, 'remove', lockDir), 'our own lock does not make us busy');
  releaseInstanceLock(NAME, lockDir);
  t.notOk(fs.existsSync(lock), 'release removes our lock');
  releaseInstanceLock(NAME, lockDir);
  t.notOk(fs.existsSync(lock), 'a second release is harmless');

  // our pid, but another start time: an earlier process that had this pid
  const reused = `${process.pid} ${Number(me) + 1}\n`;
  fs.writeFileSync(lock, reused);
  releaseInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), reused, 'a lock of an earlier process with our pid is not ours to release');
  t.equal(instanceOwner(NAME, lockDir), null, 'and it is stale');
  acquireInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), `${process.pid} ${me}\n`, 'acquire takes it over');
  releaseInstanceLock(NAME, lockDir);

  fs.writeFileSync(lock, DEAD);
  releaseInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), DEAD, 'a stale lock of another process is not released');
  acquireInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), `${process.pid} ${me}\n`, 'a stale lock is taken over');
  t.notOk(fs.existsSync(`${lock}.takeover`), 'the takeover lock is released');
  releaseInstanceLock(NAME, lockDir);
  t.notOk(fs.existsSync(lock));
});

t.test('the takeover lock: a dead holder\'s is removed, a live holder\'s is waited for', async (t) => {
  const lockDir = path.join(await tmpDir(t, 'locks-'), 'trace-locks');
  fs.mkdirSync(lockDir);
  const lock = path.join(lockDir, `${NAME}.lock`);
  const takeover = `${lock}.takeover`;
  const me = processStartTime(process.pid)!;

  fs.writeFileSync(lock, DEAD);
  fs.writeFileSync(takeover, DEAD);
  acquireInstanceLock(NAME, lockDir);
  t.equal(fs.readFileSync(lock, 'utf8'), `${process.pid} ${me}\n`, 'the stale lock is taken over past a takeover lock whose holder died');
  t.notOk(fs.existsSync(takeover), 'and the dead holder\'s takeover lock is gone');
  releaseInstanceLock(NAME, lockDir);

  const holder = cleanup(t).spawn('sleep', ['30']);
  await new Promise((r) => holder.once('spawn', r));
  const held = `${holder.pid} ${processStartTime(holder.pid!)}\n`;
  fs.writeFileSync(lock, DEAD);
  fs.writeFileSync(takeover, held);
  const t0 = Date.now();
  t.throws(() => acquireInstanceLock(NAME, lockDir), { code: 'MOB_ERR_TRACKER_BUSY', message: /taking over its stale lock/ }, 'a takeover held by a live process is not broken');
  t.ok(Date.now() - t0 >= 4000, `it was waited for (${Date.now() - t0} ms)`);
  t.equal(fs.readFileSync(takeover, 'utf8'), held, 'the live holder\'s takeover lock is untouched');
  t.equal(fs.readFileSync(lock, 'utf8'), DEAD, 'and so is the stale lock (only the takeover holder removes it)');
  fs.unlinkSync(takeover);
});

t.test('a zombie owner (dead, not yet reaped) holds nothing: its lock is stale', async (t) => {
  const lockDir = path.join(await tmpDir(t, 'locks-'), 'trace-locks');
  fs.mkdirSync(lockDir);
  // sh starts a short child and execs into sleep, which never reaps it: the child stays a zombie
  const parent = cleanup(t).spawn('sh', ['-c', 'sleep 0.1 & echo $!; exec sleep 30'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const zombie = Number(await new Promise<string>((r) => parent.stdout!.once('data', (d: Buffer) => r(d.toString().trim()))));
  let state = '';
  for (let i = 0; i < 200 && state !== 'Z'; i++) {
    await new Promise((r) => setTimeout(r, 50));
    const stat = fs.readFileSync(`/proc/${zombie}/stat`, 'utf8');
    state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0]!;
  }
  t.equal(state, 'Z', `process ${zombie} is a zombie`);
  const stat = fs.readFileSync(`/proc/${zombie}/stat`, 'utf8');
  const start = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  t.equal(processStartTime(zombie), null, 'a zombie has no start time for the lock');
  fs.writeFileSync(path.join(lockDir, `${NAME}.lock`), `${zombie} ${start}\n`);
  t.equal(instanceOwner(NAME, lockDir), null, 'its lock has no live owner');
  acquireInstanceLock(NAME, lockDir);
  t.match(fs.readFileSync(path.join(lockDir, `${NAME}.lock`), 'utf8'), new RegExp(`^${process.pid} `), 'and is taken over');
  releaseInstanceLock(NAME, lockDir);
});

/**
 * The pull-install bundle and its scripts, run for real: `scripts/package.sh`
 * builds the bundle once, the tests unpack it and run install.sh and
 * uninstall.sh as child processes against empty temporary prefixes. A copy of
 * the bundle with a stub CLI (preflight, register, agent) covers the steps that
 * need the real commands: preflight failure, registration, the detached agent,
 * upgrade restarts and the final machine-readable line.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// compiled to dist/test/install/: the repository is three levels up
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const GOLDEN_DIR = path.join(ROOT, 'test', 'install', 'golden');
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const SERVER = 'wss://appliance.example:8443';

interface Run { code: number | null; stdout: string; stderr: string }

function run(cmd: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env }, cwd: os.tmpdir() });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const lastLine = (s: string) => s.trimEnd().split('\n').at(-1) ?? '';

/** Every path under dir with its type, mode and link target, sorted by path. */
async function listing(dir: string): Promise<string[]> {
  const out: [string, string][] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await fsp.readdir(path.join(dir, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      const st = await fsp.lstat(path.join(dir, r));
      const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
      if (st.isSymbolicLink()) out.push([r, `l ${mode} ${r} -> ${await fsp.readlink(path.join(dir, r))}`]);
      else if (st.isDirectory()) { out.push([r, `d ${mode} ${r}`]); await walk(r); }
      else out.push([r, `f ${mode} ${r}`]);
    }
  };
  await walk('');
  return out.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map((e) => e[1]);
}

// packaging plus some twenty real installs: more than tap's default 300 s on a busy machine
t.setTimeout(10 * 60 * 1000);

const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-install-test-'));
t.teardown(() => fsp.rm(work, { recursive: true, force: true }));

// The test runs from dist/, which `npm run build` just produced: rebuilding
// here would rewrite files that concurrently running test files are loading.
const t0 = Date.now();
const pkg = await run('bash', [path.join(ROOT, 'scripts', 'package.sh'), '--skip-build', '--out-dir', path.join(work, 'out')]);
if (pkg.code !== 0) throw new Error(`package.sh failed (${pkg.code}): ${pkg.stdout}\n${pkg.stderr}`);
const packMs = Date.now() - t0;
const tarball = path.join(work, 'out', `mobility-agent-${VERSION}-linux-${process.arch}.tar.gz`);
await fsp.mkdir(path.join(work, 'unpacked'));
const untar = await run('tar', ['-C', path.join(work, 'unpacked'), '-xzf', tarball]);
if (untar.code !== 0) throw new Error(`tar failed: ${untar.stderr}`);
const BUNDLE = path.join(work, 'unpacked', `mobility-agent-${VERSION}`);
const INSTALL = path.join(BUNDLE, 'install.sh');
const UNINSTALL = path.join(BUNDLE, 'uninstall.sh');

let prefixes = 0;
async function emptyPrefix(): Promise<string> {
  const d = path.join(work, `prefix-${++prefixes}`);
  await fsp.mkdir(d);
  return d;
}

t.test('package.sh writes a self-contained bundle', async (t) => {
  t.match(pkg.stdout, new RegExp(`bundle: .*${path.basename(tarball).replace(/\./g, '\\.')}`), 'prints the bundle path');
  t.match(pkg.stdout, /size: +\d+ bytes/, 'prints the bundle size');
  t.comment(`packaged in ${packMs} ms, ${(fs.statSync(tarball).size / 1048576).toFixed(1)} MiB`);
  t.same((await fsp.readdir(path.join(work, 'unpacked'))), [`mobility-agent-${VERSION}`], 'one top directory named for the version');
  const top = (await fsp.readdir(BUNDLE)).sort();
  t.same(top, ['VERSION', 'bin', 'dist', 'install.sh', 'mobility-agent.service.in', 'node_modules', 'package-lock.json', 'package.json', 'proto', 'uninstall.sh']);
  t.equal((await fsp.readFile(path.join(BUNDLE, 'VERSION'), 'utf8')).trim(), VERSION);
  t.same(await fsp.readdir(path.join(BUNDLE, 'dist')), ['src'], 'dist holds src only (no test, no bench)');
  t.ok(fs.existsSync(path.join(BUNDLE, 'dist', 'src', 'cli', 'main.js')), 'the CLI entry is there');
  const nonJs = (await listing(path.join(BUNDLE, 'dist'))).filter((l) => l.startsWith('f ') && !l.endsWith('.js'));
  t.same(nonJs, [], 'built JS only (no maps, no sources)');
  for (const dev of ['tap', 'typescript', '@types/node']) t.notOk(fs.existsSync(path.join(BUNDLE, 'node_modules', dev)), `no dev dependency ${dev}`);
  for (const prod of ['ws', 'lz4', 'better-sqlite3', 'protobufjs']) t.ok(fs.existsSync(path.join(BUNDLE, 'node_modules', prod)), `production dependency ${prod}`);
  t.equal(fs.statSync(path.join(BUNDLE, 'install.sh')).mode & 0o777, 0o755, 'install.sh is executable');
  t.equal(fs.statSync(path.join(BUNDLE, 'bin', 'mobility.js')).mode & 0o777, 0o755, 'bin/mobility.js is executable');
  const owners = spawnSync('tar', ['-tvzf', tarball, '--numeric-owner'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
  t.same(owners.filter((l) => !/^\S+ 0\/0 /.test(l)), [], 'every entry is owned by 0/0');
  // the bundle's own dependencies load with this node (native modules included)
  const load = spawnSync(process.execPath, ['-e', "require('lz4'); new (require('better-sqlite3'))(':memory:').close(); require('ws')"], { cwd: BUNDLE, encoding: 'utf8' });
  t.equal(load.status, 0, `native modules load from the bundle (${load.stderr})`);
});

t.test('both scripts parse (bash -n; shellcheck when installed)', async (t) => {
  for (const f of [INSTALL, UNINSTALL, path.join(ROOT, 'scripts', 'package.sh')]) {
    const r = await run('bash', ['-n', f]);
    t.equal(r.code, 0, `bash -n ${path.basename(f)} ${r.stderr}`);
  }
  const sc = spawnSync('shellcheck', ['--version'], { encoding: 'utf8' });
  if (sc.error || sc.status !== 0) { t.comment('shellcheck is not installed: skipped'); return; }
  for (const f of [INSTALL, UNINSTALL, path.join(ROOT, 'scripts', 'package.sh')]) {
    const r = await run('shellcheck', ['-S', 'warning', f]);
    t.equal(r.code, 0, `shellcheck ${path.basename(f)}\n${r.stdout}`);
  }
});

t.test('dry run prints the plan and changes nothing (golden)', async (t) => {
  const prefix = await emptyPrefix();
  const r = await run(INSTALL, ['--dry-run', '--server', SERVER, '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(r.code, 0, r.stderr);
  const normal = r.stdout
    .split(prefix).join('<PREFIX>')
    .split(VERSION).join('<VERSION>')
    .replace(/\(found: [^)]*\)/g, '(found: <NODE>)');
  const golden = path.join(GOLDEN_DIR, 'install-dry-run.txt');
  if (process.env.UPDATE_GOLDEN === '1') await fsp.writeFile(golden, normal);
  t.equal(normal, await fsp.readFile(golden, 'utf8'), 'plan equals test/install/golden/install-dry-run.txt (UPDATE_GOLDEN=1 rewrites it)');
  t.equal(lastLine(r.stdout), `MOBILITY-INSTALL dry-run ${VERSION}`);
  t.same(await fsp.readdir(prefix), [], 'the prefix is still empty');

  const again = await run(INSTALL, ['--dry-run', '--server', SERVER, '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(again.stdout, r.stdout, 'deterministic');

  const noServer = await run(INSTALL, ['--dry-run', '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(noServer.code, 2, 'a missing --server is a usage error');
  t.match(noServer.stderr, /--server is required/);
  t.match(lastLine(noServer.stdout), /^MOBILITY-INSTALL fail MOB_ERR_USAGE --server is required/);
  t.same(await fsp.readdir(prefix), [], 'the prefix is still empty');
});

t.test('usage errors exit 2 with a message', async (t) => {
  const prefix = await emptyPrefix();
  const base = ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-start'];
  const cases: [string, string[], RegExp][] = [
    ['unknown option', [...base, '--no-register', '--frobnicate'], /unknown option: --frobnicate/],
    ['both secret files', [...base, '--passphrase-file', '/root/pass', '--token-file', '/root/token'], /mutually exclusive/],
    ['no secret file and no --no-register', base, /--passphrase-file or --token-file is required/],
    ['option without value', [...base, '--no-register', '--pin'], /--pin needs a value/],
    ['server that is not ws(s)://', ['--server', 'http://x', '--prefix', prefix, '--no-register'], /ws:\/\/ or wss:\/\//],
    ['relative prefix', ['--server', SERVER, '--prefix', 'rel/dir', '--no-register'], /--prefix must be an absolute path/],
  ];
  for (const [what, args, msg] of cases) {
    const r = await run(INSTALL, args);
    t.equal(r.code, 2, `${what}: exit 2`);
    t.match(r.stderr, msg, `${what}: message`);
    t.match(lastLine(r.stdout), /^MOBILITY-INSTALL fail MOB_ERR_USAGE /, `${what}: machine-readable line`);
  }
  const u = await run(UNINSTALL, ['--prefix', prefix, '--bogus']);
  t.equal(u.code, 2, 'uninstall: unknown option is exit 2');
  t.same(await fsp.readdir(prefix), [], 'nothing was created');
});

t.test('not root: exit 10 with MOB_ERR_PRE_NOT_ROOT', { skip: process.getuid?.() !== 0 ? 'needs root to drop to nobody' : false }, async (t) => {
  const setpriv = spawnSync('setpriv', ['--version']);
  if (setpriv.error) { t.comment('setpriv is not installed: skipped'); return; }
  const prefix = await emptyPrefix();
  // nobody must be able to read the bundle
  for (const d of [work, path.join(work, 'unpacked')]) await fsp.chmod(d, 0o755);
  const r = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', INSTALL,
    '--server', SERVER, '--prefix', prefix, '--no-register', '--skip-preflight', '--no-start']);
  t.equal(r.code, 10, r.stderr);
  t.match(lastLine(r.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PRE_NOT_ROOT /);
  t.same(await fsp.readdir(prefix), [], 'nothing was created');
});

t.test('install, upgrade and uninstall leave no residue', async (t) => {
  const prefix = await emptyPrefix();
  const args = ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-register', '--no-start'];
  const before = await listing(prefix);

  const r1 = await run(INSTALL, args);
  t.equal(r1.code, 0, r1.stderr);
  t.equal(lastLine(r1.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  const installed = await listing(prefix);
  const has = (line: string) => t.ok(installed.includes(line), line);
  has('d 0755 opt/mobility');
  has('f 0755 opt/mobility/install.sh');
  has('f 0755 opt/mobility/uninstall.sh');
  has('f 0644 opt/mobility/dist/src/cli/main.js');
  has('f 0600 etc/mobility/agent.json');
  has('d 0700 var/lib/mobility');
  has('d 0750 var/log/mobility');
  has('f 0600 var/lib/mobility/install-manifest');
  has('f 0644 etc/systemd/system/mobility-agent.service');
  has('l 0777 usr/local/bin/mobility -> ../../../opt/mobility/bin/mobility.js');
  t.equal(fs.realpathSync(path.join(prefix, 'usr/local/bin/mobility')), path.join(prefix, 'opt/mobility/bin/mobility.js'), 'the CLI link resolves to bin/mobility.js');

  const config = JSON.parse(await fsp.readFile(path.join(prefix, 'etc/mobility/agent.json'), 'utf8')) as unknown;
  t.same(config, { server: SERVER, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log` }, 'agent.json');
  const unit = await fsp.readFile(path.join(prefix, 'etc/systemd/system/mobility-agent.service'), 'utf8');
  t.match(unit, `\nExecStart=${process.execPath} ${prefix}/opt/mobility/dist/src/cli/main.js agent --config ${prefix}/etc/mobility/agent.json\n`);
  for (const line of ['Type=simple', 'ExecReload=/bin/kill -HUP $MAINPID', 'KillSignal=SIGTERM', 'TimeoutStopSec=60', 'Restart=on-failure', 'RestartSec=5',
    'After=network-online.target', 'Wants=network-online.target', 'WantedBy=multi-user.target', 'Environment=NODE_ENV=production', `WorkingDirectory=${prefix}/var/lib/mobility`]) {
    t.ok(unit.split('\n').includes(line), `unit has ${line}`);
  }
  t.notMatch(unit, /@[A-Z]+@/, 'every placeholder substituted');
  const manifest = (await fsp.readFile(path.join(prefix, 'var/lib/mobility/install-manifest'), 'utf8')).trim().split('\n');
  t.same(manifest.map((l) => l.split(' ')[1]).sort(), installed.filter((l) => !l.includes(' opt/mobility/')).map((l) => l.split(' ')[2]).sort(),
    'the manifest lists every path install.sh created (the app as one tree)');

  const keep = path.join(prefix, 'var/lib/mobility/keep.me');
  await fsp.writeFile(keep, 'digest map, say\n');
  await fsp.writeFile(path.join(prefix, 'opt/mobility/stale-file'), 'from the old version\n');
  const r2 = await run(INSTALL, args);
  t.equal(r2.code, 0, r2.stderr);
  t.equal(lastLine(r2.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  const upgraded = await listing(prefix);
  t.same(upgraded.filter((l) => !l.endsWith(' var/lib/mobility/keep.me')), installed, 'upgrade gives the same paths and modes');
  t.equal(await fsp.readFile(keep, 'utf8'), 'digest map, say\n', 'state is kept');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility.new')), 'no opt/mobility.new');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility.old')), 'no opt/mobility.old');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility/stale-file')), 'the app directory was replaced, not merged');
  t.same(JSON.parse(await fsp.readFile(path.join(prefix, 'etc/mobility/agent.json'), 'utf8')), config, 'same config');

  // an upgrade may omit --server: it comes from agent.json; extra keys survive
  const cfgPath = path.join(prefix, 'etc/mobility/agent.json');
  await fsp.writeFile(cfgPath, JSON.stringify({ ...(config as object), agentId: 'web-01' }));
  const r3 = await run(INSTALL, ['--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(r3.code, 0, r3.stderr);
  t.same(JSON.parse(await fsp.readFile(cfgPath, 'utf8')), { ...(config as object), agentId: 'web-01' }, 'extra keys are kept, server taken from the old config');

  const u = await run(path.join(prefix, 'opt/mobility/uninstall.sh'), []);
  t.equal(u.code, 0, u.stderr);
  t.equal(lastLine(u.stdout), 'MOBILITY-UNINSTALL ok');
  t.match(u.stdout, `removed ${prefix}/opt/mobility/`);
  t.same(await listing(prefix), before, 'the installed uninstall.sh (prefix inferred) leaves the prefix as it was');
  const u2 = await run(UNINSTALL, ['--prefix', prefix]);
  t.equal(u2.code, 0, 'a second uninstall is a no-op');
});

t.test('uninstall --keep-state keeps var/lib/mobility and etc/mobility only', async (t) => {
  const prefix = await emptyPrefix();
  const r = await run(INSTALL, ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(r.code, 0, r.stderr);
  await fsp.writeFile(path.join(prefix, 'var/lib/mobility/agent.pem'), 'CERT\n', { mode: 0o600 });
  await fsp.writeFile(path.join(prefix, 'var/log/mobility/agent.log'), 'log\n');
  const dry = await run(UNINSTALL, ['--prefix', prefix, '--keep-state', '--dry-run']);
  t.equal(dry.code, 0, dry.stderr);
  t.equal(lastLine(dry.stdout), 'MOBILITY-UNINSTALL dry-run');
  const u = await run(UNINSTALL, ['--prefix', prefix, '--keep-state']);
  t.equal(u.code, 0, u.stderr);
  const left = await listing(prefix);
  t.same(left, [
    'd 0755 etc',
    'd 0750 etc/mobility',
    'f 0600 etc/mobility/agent.json',
    'd 0755 var',
    'd 0755 var/lib',
    'd 0700 var/lib/mobility',
    'f 0600 var/lib/mobility/agent.pem',
    'f 0600 var/lib/mobility/install-manifest',
  ], 'only the state and the config (and their parents) remain');

  // reinstalling over kept state finds the registration-less state intact; a
  // full uninstall afterwards still removes everything
  const again = await run(INSTALL, ['--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(again.code, 0, again.stderr);
  t.ok(fs.existsSync(path.join(prefix, 'var/lib/mobility/agent.pem')), 'credentials survived');
  const u2 = await run(UNINSTALL, ['--prefix', prefix]);
  t.equal(u2.code, 0, u2.stderr);
  t.same(await listing(prefix), [], 'empty after a full uninstall');
});

const STUB_CLI = `
import fs from 'node:fs';
import path from 'node:path';
const argv = process.argv.slice(2);
const opt = (n) => { const i = argv.indexOf(n); return i >= 0 ? argv[i + 1] : undefined; };
fs.appendFileSync(process.env.STUB_LOG, JSON.stringify(argv) + '\\n');
switch (argv[0]) {
  case 'preflight':
    if (process.env.STUB_PREFLIGHT_FAIL) { console.log('FAIL tracefs: MOB_ERR_PRE_NO_TRACEFS tracefs is not mounted'); process.exit(1); }
    console.log('preflight: all checks passed');
    process.exit(0);
  case 'register': {
    const cfg = JSON.parse(fs.readFileSync(opt('--config'), 'utf8'));
    const secret = fs.readFileSync(opt('--passphrase-file') ?? opt('--token-file'), 'utf8').trim();
    if (secret !== process.env.STUB_SECRET) { console.error('error: registration refused [MOB_ERR_PASSPHRASE]'); process.exit(4); }
    fs.writeFileSync(path.join(cfg.stateDir, 'agent.pem'), 'CERT\\n', { mode: 0o600 });
    console.log('registered as agent stub-1');
    process.exit(0);
  }
  case 'agent': {
    if (process.env.STUB_AGENT_FAIL) { console.error('agent: cannot open the config'); process.exit(3); }
    const pidFile = opt('--pid-file');
    fs.writeFileSync(pidFile, process.pid + '\\n');
    process.on('SIGTERM', () => { fs.rmSync(pidFile, { force: true }); process.exit(0); });
    setInterval(() => {}, 1000);
    break;
  }
  default: process.exit(2);
}
`;

/** The process exists and is not a zombie (a detached agent is reaped by init). */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

t.test('with a stub CLI: preflight, register, detached agent, upgrade restart, uninstall stop', async (t) => {
  const bundle = path.join(work, 'stub-bundle');
  const cp = await run('cp', ['-a', BUNDLE, bundle]);
  t.equal(cp.code, 0, cp.stderr);
  await fsp.writeFile(path.join(bundle, 'dist/src/cli/main.js'), STUB_CLI);
  const install = path.join(bundle, 'install.sh');
  const prefix = await emptyPrefix();
  const pidFile = path.join(prefix, 'var/lib/mobility/agent.pid');
  t.teardown(() => { try { process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL'); } catch { /* not running */ } });
  const log = path.join(work, 'stub-calls.log');
  const secret = 'pass-phrase-NEVER-PRINTED';
  const passFile = path.join(work, 'pass');
  await fsp.writeFile(passFile, `${secret}\n`, { mode: 0o600 });
  const env = { STUB_LOG: log, STUB_SECRET: secret };
  const PIN = 'AB:CD:EF:01';
  const args = ['--server', SERVER, '--passphrase-file', passFile, '--pin', PIN, '--prefix', prefix];
  const calls = async () => (await fsp.readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as string[]);
  const outputs: string[] = [];
  const go = async (a: string[], extraEnv: Record<string, string> = {}) => {
    const r = await run(install, a, { ...env, ...extraEnv });
    outputs.push(r.stdout, r.stderr);
    return r;
  };

  const pf = await go(args, { STUB_PREFLIGHT_FAIL: '1' });
  t.equal(pf.code, 10, 'a failed preflight is exit 10');
  t.match(lastLine(pf.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PRE_NO_TRACEFS preflight against wss:\/\/appliance\.example:8443 failed: /);
  t.match(pf.stderr, /tracefs is not mounted/, 'the preflight report is shown');
  t.same(await fsp.readdir(prefix), [], 'nothing installed after a failed preflight');
  t.same((await calls())[0], ['preflight', '--server', SERVER, '--state-dir', `${prefix}/var/lib/mobility`]);

  const bad = await go(args, { STUB_SECRET: 'another' });
  t.equal(bad.code, 11, 'a refused registration is exit 11');
  t.match(lastLine(bad.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PASSPHRASE registration with /);

  const ok = await go(args);
  t.equal(ok.code, 0, ok.stderr);
  t.equal(lastLine(ok.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  t.match(ok.stdout, /registered as agent stub-1/);
  const conf = `${prefix}/etc/mobility/agent.json`;
  t.same((await calls()).filter((c) => c[0] === 'register').at(-1), ['register', '--config', conf, '--server', SERVER, '--passphrase-file', passFile, '--pin', PIN]);
  t.same(JSON.parse(await fsp.readFile(conf, 'utf8')), { server: SERVER, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log`, pin: PIN });
  const pid1 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.ok(alive(pid1), `the agent runs detached (pid ${pid1})`);
  t.same((await calls()).at(-1), ['agent', '--config', conf, '--pid-file', pidFile]);

  // an upgrade with a secret file registers again (the server keeps the identity) ...
  const reg = await go(args);
  t.equal(reg.code, 0, reg.stderr);
  t.equal((await calls()).filter((c) => c[0] === 'register').length, 3, 'registers again when given a secret');
  // ... and one without a secret keeps the registration
  const noSecret = args.filter((a, i) => a !== '--passphrase-file' && args[i - 1] !== '--passphrase-file');
  const up = await go(noSecret);
  t.equal(up.code, 0, up.stderr);
  t.match(up.stdout, /skip registration \(already registered with wss:\/\/appliance\.example:8443\)/);
  t.equal((await calls()).filter((c) => c[0] === 'register').length, 3, 'no new registration on an upgrade without a secret');
  t.notOk(alive(pid1), 'the old agent was stopped');
  const pid2 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.not(pid2, pid1);
  t.ok(alive(pid2), 'a new agent runs');

  const other = 'wss://other.example:9443';
  const moved = await go(['--server', other, '--passphrase-file', passFile, '--prefix', prefix]);
  t.equal(moved.code, 0, moved.stderr);
  t.same((await calls()).filter((c) => c[0] === 'register').at(-1), ['register', '--config', conf, '--server', other, '--passphrase-file', passFile], 'a new server means a new registration');
  t.same(JSON.parse(await fsp.readFile(conf, 'utf8')), { server: other, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log` }, 'the old pin is dropped with the old server');

  const dead = await go(['--prefix', prefix], { STUB_AGENT_FAIL: '1' });
  t.equal(dead.code, 12, 'an agent that dies at start is exit 12');
  t.match(lastLine(dead.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PUSH_INSTALL_FAILED the agent exited at start: .*cannot open the config/);

  const back = await go(['--prefix', prefix]);
  t.equal(back.code, 0, back.stderr);
  const pid3 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.ok(alive(pid3));
  const u = await run(path.join(prefix, 'opt/mobility/uninstall.sh'), []);
  outputs.push(u.stdout, u.stderr);
  t.equal(u.code, 0, u.stderr);
  t.match(u.stdout, `stopped the agent (pid ${pid3})`);
  t.notOk(alive(pid3), 'uninstall stopped the agent');
  t.same(await listing(prefix), [], 'nothing left');
  t.notOk(outputs.some((o) => o.includes(secret)), 'the passphrase never appears in any output');
});
